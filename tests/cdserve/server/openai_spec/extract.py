"""Extract the component schemas cdserve's responses must validate against from OpenAI's published
OpenAPI document (openai/openai-openapi `openapi.yaml`, commit in openai-schemas.json's `source`),
with everything they reference, into openai-schemas.json. Verbatim: no schema is edited here.

    .venv/bin/python tests/cdserve/server/openai_spec/extract.py ../shared/specs/openai-openapi.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOTS = ["CreateCompletionResponse", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
         "ListModelsResponse", "Model", "ErrorResponse"]
SOURCE = "openai/openai-openapi openapi.yaml at commit f85dbe22 (copied 2026-11-28)"
OUT = Path(__file__).with_name("openai-schemas.json")


def referenced(schemas: dict, roots: list[str]) -> dict:
    keep: dict = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]
        stack = [schemas[name]]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                    todo.append(ref.rsplit("/", 1)[-1])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    return dict(sorted(keep.items()))


def main(spec_path: str) -> None:
    spec = yaml.load(Path(spec_path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    subset = referenced(spec["components"]["schemas"], ROOTS)
    OUT.write_text(json.dumps({"source": SOURCE, "openapi": spec["openapi"],
                               "components": {"schemas": subset}}, indent=1, sort_keys=False) + "\n")
    print(f"{len(subset)} schemas -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/specs/openai-openapi.yaml")
