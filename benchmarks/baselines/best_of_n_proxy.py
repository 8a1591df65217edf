"""Client-side best-of-N: what a user does without cdserve's best_of_n or block modes. For each
chat request it sends N independent, non-controlled requests (`control.mode = "none"`) to an
upstream cdserve at once, waits for all of them, and keeps the one with the highest combined
value that cdserve reports with every choice (`choices[0].control.combined`, same weights).

It sits in front of the upstream as a small OpenAI-compatible server only so the same load
tool drives it. The answer cannot be streamed before all N are done (the best is not known
until then): a streamed request gets the chosen answer as one chunk, so its time to first
token is its end-to-end latency, as for a real client doing best-of-N.

    python -m benchmarks.baselines.best_of_n_proxy --upstream http://127.0.0.1:8000 --n 4 --port 8101
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request

from benchmarks.baselines import openai_api as api


def build_app(upstream: str, n: int, model_name: str) -> FastAPI:
    app = FastAPI(title=f"client-side best-of-{n}")
    api.add_probes(app, model_name)
    client = httpx.AsyncClient(base_url=upstream, timeout=None,
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    async def best(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The best of n upstream answers, and the summed usage of all n."""
        control = {"mode": "none"}
        if (body.get("control") or {}).get("weights"):
            control["weights"] = body["control"]["weights"]
        one = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "control")}
        one["control"] = control

        async def ask() -> dict[str, Any]:
            r = await client.post("/v1/chat/completions", json=one)
            r.raise_for_status()
            return r.json()

        answers = await asyncio.gather(*(ask() for _ in range(n)))
        chosen = max(answers, key=lambda a: a["choices"][0]["control"]["combined"])
        return chosen, answers

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        try:
            chosen, answers = await best(body)
        except httpx.HTTPStatusError as e:
            return api.JSONResponse(e.response.json(), status_code=e.response.status_code)
        choice, usage = chosen["choices"][0], chosen["usage"]
        text = choice["message"]["content"]
        extra = {"control": choice["control"],
                 "candidates_completion_tokens": sum(a["usage"]["completion_tokens"] for a in answers)}
        cid = api.completion_id()
        if not body.get("stream"):
            return api.response(cid, model_name, text, choice["finish_reason"], usage["prompt_tokens"],
                                usage["completion_tokens"], extra)

        async def events() -> AsyncIterator[str]:
            yield api.chunk(cid, model_name, text, choice["finish_reason"], extra)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield api.usage_chunk(cid, model_name, usage["prompt_tokens"], usage["completion_tokens"])
            yield api.DONE

        return api.stream(events())

    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8101)
    ap.add_argument("--upstream", required=True, help="base URL of a cdserve server")
    ap.add_argument("--n", type=int, default=4, help="independent requests per request")
    args = ap.parse_args(argv)
    model_name = httpx.get(args.upstream + "/v1/models", timeout=30).json()["data"][0]["id"]
    uvicorn.run(build_app(args.upstream, args.n, model_name), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
