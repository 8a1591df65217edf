"""`cdserve serve`: flags generated from ServerSettings (so flags, env vars and docs never drift),
uvicorn, and a SIGTERM drain that exits 0."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Literal, get_args, get_origin

from pydantic import ValidationError

from cdserve.control.request import ControlConfig
from cdserve.rewards import RewardConfig
from cdserve.server.settings import ENV_PREFIX, ServerSettings, describe_error

log = logging.getLogger("cdserve.server")

# Settings that are objects: a JSON flag for the whole, and one flag per field (--control-strength).
NESTED = {"control": ControlConfig, "rewards": RewardConfig}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _json_or_str(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="Serve the OpenAI-compatible HTTP API.",
        description="Serve the OpenAI-compatible HTTP API. Every flag also reads an environment "
        f"variable ({ENV_PREFIX}<NAME>, e.g. {ENV_PREFIX}PORT; control fields as "
        f"{ENV_PREFIX}CONTROL__STRENGTH or a JSON {ENV_PREFIX}CONTROL, rewards likewise); flags win.")
    for name, info in ServerSettings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        if name in NESTED:
            parser.add_argument(_flag(name), metavar="JSON", type=_json_or_str, default=argparse.SUPPRESS,
                                help=f"{info.description} [env {env}]")
            for cname, cinfo in NESTED[name].model_fields.items():
                parser.add_argument(_flag(f"{name}_{cname}"), dest=f"{name}__{cname}", type=_json_or_str,
                                    default=argparse.SUPPRESS, metavar=cname.upper(),
                                    help=f"{cinfo.description or ''} [env {env}__{cname.upper()}]")
            continue
        if info.annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{info.description} [env {env}]")
            continue
        default = "computed" if info.default_factory else info.default
        if name == "api_key":
            default = "none"
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
        parser.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS,
                            metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
                            help=f"{info.description} [env {env}; default {default}]")
    parser.set_defaults(func=run_serve)
    return parser


def load_settings(args: argparse.Namespace) -> ServerSettings:
    """Flags over environment over defaults. Raises ValidationError naming the bad setting."""
    given = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    for name in NESTED:
        whole = given.pop(name, None) or {}
        if not isinstance(whole, dict):
            raise TypeError(f"--{name} must be a JSON object, got {whole!r}")
        fields = {**whole, **{k.split("__", 1)[1]: v for k, v in vars(args).items()
                              if k.startswith(f"{name}__")}}
        if fields:
            given[name] = fields
    return ServerSettings(**given)


def _unknown_env() -> list[str]:
    known = {ENV_PREFIX + name.upper() for name in ServerSettings.model_fields}
    nested = tuple(f"{ENV_PREFIX}{name.upper()}__" for name in NESTED)
    return sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known
                  and not k.startswith(nested))


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cdserve.server.app import build_app

    try:
        settings = load_settings(args)
    except ValidationError as e:
        print(describe_error(e), file=sys.stderr)
        return 2
    except (ValueError, TypeError) as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in _unknown_env():
        log.warning("ignoring unknown environment variable %s", name)
    try:
        app = build_app(settings)
    except Exception as e:  # noqa: BLE001  (the engine refused its configuration: say why, exit 2)
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    state = app.state.cdserve

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # uvicorn stops accepting connections; in-flight requests get the grace period
            state.begin_drain()
            super().handle_exit(sig, frame)

    # uvicorn's own timeout is only a backstop: the serving layer ends requests at the deadline
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_seconds + 5.0,
                            lifespan="on", access_log=settings.log_level == "debug")
    server = Server(config)
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it caught once it has shut down; these handlers make that a
    # no-op, so a drained server exits 0 rather than dying of its own SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started or state.status == "failed":
        print("cdserve: start-up failed (see the log above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cdserve.server [flags]`: the serve command on its own."""
    parser = argparse.ArgumentParser(prog="cdserve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
