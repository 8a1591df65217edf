"""One configuration: every engine setting is declared once (EngineConfig, cdserve/config.py), the
server's settings are that plus the HTTP layer, and `cdserve serve` and `cdserve generate` offer
every engine setting under the same flag with the same description."""

from __future__ import annotations

import argparse

import pytest

from cdserve.cli import build_parser
from cdserve.config import EngineConfig, VLLMConfig
from cdserve.config_flags import flag_name, settings
from cdserve.server.settings import ServerSettings


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {flag: a.help for a in parser._actions for flag in a.option_strings}


def test_server_settings_declare_no_engine_setting_again():
    """ServerSettings inherits the engine's fields: the same field objects' contents, none written
    in settings.py (its own annotations are the HTTP layer's only)."""
    assert issubclass(ServerSettings, EngineConfig)
    engine = EngineConfig.model_fields
    assert not set(ServerSettings.__annotations__) & set(engine)
    for name, info in engine.items():
        mine = ServerSettings.model_fields[name]
        assert (mine.annotation, mine.description, mine.default, mine.default_factory, mine.metadata) == (
            info.annotation, info.description, info.default, info.default_factory, info.metadata), name
    assert ServerSettings.model_fields["vllm"].annotation is VLLMConfig


def test_the_engine_part_of_the_settings_is_an_engine_config():
    s = ServerSettings(vllm={"kv_cache_space_gib": 2}, max_model_len=4096)
    cfg = s.engine_config()
    assert type(cfg) is EngineConfig and not hasattr(cfg, "port")
    assert cfg.model_dump() == s.model_dump(include=set(EngineConfig.model_fields))
    assert cfg.vllm.kv_cache_space_gib == 2 and cfg.max_model_len == 4096


@pytest.mark.parametrize("path", [p for p, _ in settings(EngineConfig)], ids=lambda p: ".".join(p))
def test_serve_and_generate_offer_every_engine_setting_with_its_one_description(path):
    commands = subparsers(build_parser())
    serve, generate = helps(commands["serve"]), helps(commands["generate"])
    info = dict(settings(EngineConfig))[path]
    flag = flag_name(path)
    assert flag in serve and flag in generate, flag
    description = info.description or ""
    assert serve[flag].startswith(description) and generate[flag].startswith(description), flag
    assert serve[flag].removeprefix(description).startswith(" [env CDSERVE_")


def test_vllm_settings_are_a_section():
    flags = helps(subparsers(build_parser())["serve"])
    for name in VLLMConfig.model_fields:
        assert flag_name(("vllm", name)) in flags
        assert name not in EngineConfig.model_fields
