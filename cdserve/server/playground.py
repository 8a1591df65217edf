"""The playground: `GET /playground`, one page that steers by sliders and streams a plain and a
steered answer side by side through the server's own /v1 API. Its files ship inside the package
(`cdserve/server/static/playground/`) and nothing is fetched from anywhere else: the
Content-Security-Policy below lets the page load only this server's scripts and styles, so a
stray CDN link would fail loudly in the browser instead of working only when online.

The page itself needs no API key (it holds no data); the /v1 calls it makes carry the key the
user types in, which stays in the browser tab's memory."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static" / "playground"
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/playground")
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_HEADERS)


@router.get("/")
async def index() -> HTMLResponse:
    """A landing page for whoever opens the server's address in a browser."""
    return HTMLResponse(_INDEX, headers=_HEADERS)


class _Static(StaticFiles):
    """The page's scripts and styles, with the same headers as the page."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def install_playground(app) -> None:
    app.include_router(router)
    app.mount("/playground/static", _Static(directory=STATIC_DIR), name="playground-static")


_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cdserve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/playground/static/playground.css"></head>
<body class="index">
<h1>cdserve</h1>
<p>An OpenAI-compatible server for controlled decoding.</p>
<ul>
<li><a href="/playground">Playground</a>: steer with sliders, plain and steered answers side by side</li>
<li><a href="/openapi.json">/openapi.json</a>: the API's schema</li>
<li><a href="/v1/scorers">/v1/scorers</a>: the scorer's heads, defaults and allowed ranges</li>
<li><a href="/ready">/ready</a>, <a href="/metrics">/metrics</a></li>
</ul>
</body></html>
"""
