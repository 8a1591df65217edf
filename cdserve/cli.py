"""`cdserve generate` (one request, printed) and `cdserve serve` (the HTTP server)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid

from pydantic import ValidationError

from cdserve.config import RENAMED, EngineConfig
from cdserve.config_flags import add_flags, describe_error, flag_values
from cdserve.errors import InvalidRequestError


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate once and print the text and the scorer's values",
        description="Generate once and print the text and the scorer's values. The engine's flags are "
        "`cdserve serve`'s (without environment variables). The request has no control of its own: it "
        "gets the engine's default control (--control JSON, or --control-mode, --control-weights, ...), "
        "and its random numbers come from the engine's generator (--seed).")
    request = p.add_argument_group("the request")
    request.add_argument("--prompt", required=True)
    request.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    request.add_argument("--max-tokens", type=int, default=64)
    request.add_argument("--temperature", type=float, default=0.7)
    request.add_argument("--top-p", type=float, default=1.0)
    request.add_argument("--stop", action="append", default=[])
    request.add_argument("-n", type=int, default=1)
    request.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_flags(p.add_argument_group("the engine"), EngineConfig, env=False, renamed=RENAMED)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's flags of `cdserve generate`; raises ValidationError (describe_error names the flag)."""
    return EngineConfig(**flag_values(args, EngineConfig))


async def _generate(args: argparse.Namespace, config: EngineConfig) -> int:
    from cdserve.control.request import resolve_control
    from cdserve.engine_factory import build_engine
    from cdserve.outputs import GenerationRequest
    from cdserve.sampling import SamplingParams

    engine = build_engine(config)
    await engine.start()
    try:
        control = resolve_control(None, engine.config.control, engine.head_names)
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  stop=tuple(args.stop), n=args.n)
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


def build_parser() -> argparse.ArgumentParser:
    """`cdserve generate` and `cdserve serve`, their engine flags generated from the same models."""
    from cdserve.server.cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="cdserve", description="Controlled-decoding inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cdserve.server.cli import run_serve

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        try:
            config = engine_config(args)
        except ValidationError as e:
            print(describe_error(e, EngineConfig, env=False), file=sys.stderr)
            return 2
        except TypeError as e:  # a section's flag that is not a JSON object
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            return asyncio.run(_generate(args, config))
        except (InvalidRequestError, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
