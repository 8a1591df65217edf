"""Flags and environment variables generated from the typed configs, one rule for every setting.

A field `max_model_len` is the flag `--max-model-len` and the variable `CDSERVE_MAX_MODEL_LEN`. A
section (a field that is itself a model: control, rewards, vllm) is a JSON flag for the whole
(`--vllm '{"enforce_eager": true}'`, `CDSERVE_VLLM`) and one flag per field
(`--vllm-kv-cache-space-gib 2`, `CDSERVE_VLLM__KV_CACHE_SPACE_GIB`). `cdserve serve` and
`cdserve generate` both build their flags here, so a description is written once, in the model.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Mapping
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

ENV_PREFIX = "CDSERVE_"

SettingPath = tuple[str, ...]  # a setting's place: ("port",) or ("vllm", "kv_cache_space_gib")


def flag_name(path: SettingPath) -> str:
    return "--" + "-".join(path).replace("_", "-")


def env_name(path: SettingPath) -> str:
    return ENV_PREFIX + "__".join(path).upper()


def sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Fields of `model` that are models themselves."""
    return {name: info.annotation for name, info in model.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)}


def settings(model: type[BaseModel]) -> Iterator[tuple[SettingPath, FieldInfo]]:
    """Every setting of `model`: top-level fields (sections included, as a whole), then each
    section's fields."""
    nested = sections(model)
    for name, info in model.model_fields.items():
        yield (name,), info
        for sub, sub_info in nested[name].model_fields.items() if name in nested else ():
            yield (name, sub), sub_info


def env_names(model: type[BaseModel]) -> set[str]:
    return {env_name(path) for path, _ in settings(model)}


def _json_or_str(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "computed"
    return "none" if info.default is None else str(info.default)


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *, env: bool,
              renamed: Mapping[str, SettingPath] = {}) -> None:
    """One flag per setting of `model` (see the module docstring); flags not given are absent from
    the parsed namespace, so the environment and the defaults apply. `renamed`: old top-level names
    that are refused with the new name."""
    nested = sections(model)
    for path, info in settings(model):
        about = [f"env {env_name(path)}"] if env else []
        if path[0] in nested and len(path) == 1:
            parser.add_argument(flag_name(path), dest=path[0], metavar="JSON", type=_json_or_str,
                                default=argparse.SUPPRESS, help=_help(info, about))
            continue
        about.append(f"default {_default(info)}")
        dest = "__".join(path)
        if info.annotation is bool:
            parser.add_argument(flag_name(path), dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=_help(info, about))
            continue
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
        parser.add_argument(flag_name(path), dest=dest, default=argparse.SUPPRESS,
                            type=_json_or_str if len(path) > 1 else str,
                            metavar="{" + ",".join(choices) + "}" if choices else path[-1].upper(),
                            help=_help(info, about))
    fields = dict(settings(model))
    for old, new in renamed.items():
        note = f" (environment: {env_name(new)})" if env else ""
        pairs = [(flag_name((old,)), flag_name(new))]
        if fields[new].annotation is bool:
            pairs.append(("--no-" + flag_name((old,))[2:], "--no-" + flag_name(new)[2:]))
        for flag, replacement in pairs:
            parser.add_argument(flag, nargs="?", action=_Renamed, help=argparse.SUPPRESS,
                                message=f"{flag} was renamed {replacement}{note}")


def _help(info: FieldInfo, about: list[str]) -> str:
    # argparse formats help with %: a literal % in a description must be doubled
    return f"{(info.description or '').replace('%', '%%')} [{'; '.join(about)}]"


class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, message: str, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(self.message)


def flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict:
    """The settings given as flags, nested as `model` expects them: a section's JSON flag merged
    with its per-field flags (these win)."""
    given = {k: v for k, v in vars(args).items() if k in model.model_fields}
    for name in sections(model):
        whole = given.pop(name, None) or {}
        if not isinstance(whole, dict):
            raise TypeError(f"{flag_name((name,))} must be a JSON object, got {whole!r}")
        fields = {**whole, **{k.split("__", 1)[1]: v for k, v in vars(args).items()
                              if k.startswith(f"{name}__")}}
        if fields:
            given[name] = fields
    return given


def renamed_env(environ: Mapping[str, str], renamed: Mapping[str, SettingPath]) -> list[str]:
    """A message for each environment variable set under an old name."""
    return [f"{env_name((old,))} was renamed {env_name(new)} (flag {flag_name(new)})"
            for old, new in renamed.items() if env_name((old,)) in environ]


def describe_error(err: ValidationError, model: type[BaseModel], *, env: bool) -> str:
    """One line per bad setting, naming its flag (and, with `env`, its environment variable)."""
    nested = sections(model)
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:
            lines.append(f"invalid configuration: {msg}")
            continue
        depth = 2 if loc[0] in nested and len(loc) > 1 else 1
        path, rest = loc[:depth], loc[depth:]
        if e["type"] == "extra_forbidden" and not rest:
            known = nested[path[0]].model_fields if depth == 2 else model.model_fields
            lines.append(f"unknown setting {'.'.join(path)} (known: {', '.join(known)})")
            continue
        where = flag_name(path) + (f" / {env_name(path)}" if env else "")
        key = f" at {'.'.join(rest)}" if rest else ""
        lines.append(f"invalid setting {where}{key}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)
