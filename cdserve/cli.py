"""`cdserve generate` (one request, printed) and `cdserve serve` (the HTTP server)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid

from cdserve.config import EngineConfig
from cdserve.errors import InvalidRequestError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local HF model folder")
    p.add_argument("--scorer", default="default", help="'default', 'untrained' or a scorer checkpoint dir")
    p.add_argument("--backend", default="hf", choices=["auto", "hf", "vllm"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--cache-dir", default=None, help="where converted models are kept")


def _engine_config(args) -> EngineConfig:
    fields = {"model": args.model, "scorer": args.scorer, "backend": args.backend,
              "device": args.device, "dtype": args.dtype}
    if args.cache_dir:
        fields["cache_dir"] = args.cache_dir
    if getattr(args, "enforce_eager", False):
        fields["enforce_eager"] = True
    return EngineConfig(**fields)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate once and print the text and the scorer's values")
    _add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("--control", default="{}", help='JSON, e.g. \'{"mode": "token", "weights": {"positive": 1}}\'')
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("-n", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--enforce-eager", action="store_true", help="vllm backend: skip compilation")


async def _generate(args) -> int:
    from cdserve.control.request import resolve_control
    from cdserve.engine_factory import build_engine
    from cdserve.outputs import GenerationRequest
    from cdserve.sampling import SamplingParams

    engine = build_engine(_engine_config(args))
    await engine.start()
    try:
        control = resolve_control(json.loads(args.control), engine.config.control, engine.head_names)
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  seed=args.seed, stop=tuple(args.stop), n=args.n)
        sampling.validate(engine.config.max_tokens_limit, engine.config.max_n)
        tok = engine.tokenizer
        if args.chat:
            prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                             add_generation_prompt=True, tokenize=False)
        else:
            prompt = args.prompt
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        request = GenerationRequest(request_id=str(uuid.uuid4()), prompt_token_ids=ids,
                                    sampling=sampling, control=control)
        texts: dict[int, str] = {}
        finals = {}
        async for out in engine.generate(request):
            for d in out.choices:
                texts[d.index] = texts.get(d.index, "") + d.text
                if d.finish_reason:
                    finals[d.index] = d
    finally:
        await engine.shutdown()
    if args.json:
        print(json.dumps({"scorer": str(getattr(engine, "scorer_dir", "")), "choices": [
            {"index": i, "text": texts[i], "finish_reason": finals[i].finish_reason,
             "control": finals[i].control.to_dict() if finals[i].control else None} for i in sorted(texts)]}))
        return 0
    for i in sorted(texts):
        c = finals[i].control
        print(f"--- choice {i} ({finals[i].finish_reason}, mode {control.mode})")
        print(texts[i])
        if c is not None:
            vals = "  ".join(f"{h}={v:+.3f}" for h, v in c.values.items())
            print(f"values: {vals}  combined={c.combined:+.3f}  kl={c.kl:.3f}  "
                  f"tokens_generated={c.tokens_generated}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cdserve", description="Controlled-decoding inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    try:
        from cdserve.server.cli import add_serve_parser, run_serve
    except ImportError:
        add_serve_parser = run_serve = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        try:
            return asyncio.run(_generate(args))
        except (InvalidRequestError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
