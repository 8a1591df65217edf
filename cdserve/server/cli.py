"""`cdserve serve`: flags generated from ServerSettings (so flags, env vars and docs never drift),
uvicorn, and a SIGTERM drain that exits 0."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from pydantic import ValidationError

from cdserve.config import RENAMED
from cdserve.config_flags import ENV_PREFIX, add_flags, env_names, flag_values
from cdserve.server.settings import ServerSettings, describe_error

log = logging.getLogger("cdserve.server")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="Serve the OpenAI-compatible HTTP API.",
        description="Serve the OpenAI-compatible HTTP API. Every flag also reads an environment "
        f"variable ({ENV_PREFIX}<NAME>, e.g. {ENV_PREFIX}PORT; a section's fields as "
        f"{ENV_PREFIX}CONTROL__STRENGTH or {ENV_PREFIX}VLLM__ENFORCE_EAGER, or the section as JSON, "
        f"{ENV_PREFIX}CONTROL); flags win.")
    add_flags(parser, ServerSettings, env=True, renamed=RENAMED)
    parser.set_defaults(func=run_serve)
    return parser


def load_settings(args: argparse.Namespace) -> ServerSettings:
    """Flags over environment over defaults. Raises ValidationError naming the bad setting."""
    return ServerSettings(**flag_values(args, ServerSettings))


def _unknown_env() -> list[str]:
    known = env_names(ServerSettings)
    return sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k not in known)


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
