"""`GET /openapi.json`: FastAPI's document of the routes, with the request bodies, the stream
chunks and the errors taken from the models the server validates and answers with.

The generation routes read their bodies themselves (the models depend on the loaded engine:
model name, vocabulary, heads), so their `requestBody` comes from `ServerState.models`, the very
classes `parse_request` validates with. Until the engine has loaded the document is built from
the settings alone and is not cached.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from cdserve.server import protocol as p

GENERATION = {  # path -> (request, stream chunk)
    "/v1/completions": ("CompletionRequest", "CompletionStreamResponse"),
    "/v1/chat/completions": ("ChatCompletionRequest", "ChatCompletionStreamResponse"),
}
_REF = "#/components/schemas/{model}"


def _sse(chunk: str) -> dict[str, Any]:
    """A `text/event-stream` body, described by its events (OpenAPI 3.2's itemSchema, as FastAPI
    writes it): each `data` is a chunk, an error, or the final `[DONE]`."""
    json_data = {"contentMediaType": "application/json", "contentSchema": {"oneOf": [
        {"$ref": _REF.format(model=chunk)}, {"$ref": _REF.format(model="ErrorResponse")}]}}
    return {"itemSchema": {
        "type": "object", "required": ["data"],
        "description": f"With stream=true: one event per delta ({chunk}); with "
        "stream_options.include_usage a last chunk with `usage` and no choices; then `[DONE]`. A "
        "failure after the stream started is one ErrorResponse event, then `[DONE]`.",
        "properties": {
            "data": {"type": "string", "anyOf": [{"const": "[DONE]"}, json_data]},
            "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}}}}


def _name_control_unions(schemas: dict[str, Any]) -> None:
    """Give the control unions OpenAPI discriminators. pydantic writes a callable discriminator
    as a plain oneOf, with block/best_of_n's union on `selection` inline: those become
    components (BlockControl, BestOfNControl) so that `mode` maps to one schema each."""
    modes = {"NoneControl": "none", "TokenControl": "token", "BlockControl": "block",
             "BestOfNControl": "best_of_n"}

    def ref_name(item: dict) -> str:
        return item.get("$ref", "").rsplit("/", 1)[-1]

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for value in node:
                visit(value)
            return
        if not isinstance(node, dict):
            return
        options = node.get("oneOf")
        if options and any(ref_name(o) in modes for o in options):
            for i, option in enumerate(options):
                inner = [ref_name(o) for o in option.get("oneOf", [])]
                if inner and all(n.endswith(("ArgmaxControl", "SampleControl")) for n in inner):
                    name = inner[0].replace("Argmax", "").replace("Sample", "")
                    schemas[name] = {"title": name, "description": f"mode {modes[name]}: a union on "
                                     "`selection`.", **option}
                    schemas[name]["discriminator"] = {"propertyName": "selection", "mapping": {
                        ("argmax" if "Argmax" in n else "sample"): _REF.format(model=n) for n in inner}}
                    options[i] = {"$ref": _REF.format(model=name)}
            node["discriminator"] = {"propertyName": "mode", "mapping": {
                modes[ref_name(o)]: o["$ref"] for o in options if ref_name(o) in modes}}
        for value in node.values():
            visit(value)

    for name in ("CompletionRequest", "ChatCompletionRequest"):
        visit(schemas[name])


def build_document(app: FastAPI, models: p.RequestModels, api_key: bool) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema(
        [(models.completion, "validation"), (models.chat, "validation"),
         (p.CompletionStreamResponse, "serialization"), (p.ChatCompletionStreamResponse, "serialization"),
         (p.ErrorResponse, "serialization")], ref_template=_REF)
    for name, schema in defs["$defs"].items():
        schemas.setdefault(name, schema)
    _name_control_unions(schemas)
    for path, (request, chunk) in GENERATION.items():
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": _REF.format(model=request)}}}}
        op["responses"]["200"]["content"]["text/event-stream"] = _sse(chunk)
    for item in doc["paths"].values():
        for op in item.values():
            op.get("responses", {}).pop("422", None)  # never sent: validation errors are 400
            if not api_key:  # no key configured: no Authorization needed, never a 401
                op.get("responses", {}).pop("401", None)
                op.pop("security", None)
    if not api_key:
        doc["components"].pop("securitySchemes", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve `build_document` as the app's OpenAPI document (cached once the engine has loaded)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        state = app.state.cdserve
        models = state.models or p.RequestModels.build(state.limits(loaded=False))
        doc = build_document(app, models, api_key=state.settings.api_key is not None)
        if state.models is not None:
            app.openapi_schema = doc
        return doc

    app.openapi = openapi
