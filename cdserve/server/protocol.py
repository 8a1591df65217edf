"""OpenAI API request and response models, in the order of OpenAI's spec.

Each request model has three blocks: the OpenAI parameters cdserve implements, the OpenAI
parameters it does not (accepted only at their neutral value, otherwise refused with 400 naming
them, never silently ignored), and the cdserve extension (`control`). Unknown fields are refused
and types are strict, as OpenAI's are (`"max_tokens": true` or `"stream": "yes"` is a 400).

The module-level request models carry OpenAI's own ranges. `RequestModels.build(limits)` derives
the models one server validates with, adding its limits (the served model name, max_tokens, n,
the vocabulary, the scorer's heads, the control ranges, and the control shape of each mode as a
union on `mode`). The same classes produce `/openapi.json` (cdserve/server/openapi.py), so
every limit the server enforces is in its schema. `to_sampling_params()` is the one conversion
into the engine's types.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, create_model

from cdserve.control.request import _FIELDS_BY_MODE, ControlConfig, ControlRequest
from cdserve.errors import InvalidRequestError
from cdserve.outputs import ControlValues
from cdserve.sampling import MAX_STOP_STRINGS, SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 2.0 (JSON has one number type); strict int refuses it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**constraints: Any) -> Any:
    """An integer as JSON Schema means it: 2 or 2.0, never true or "2" (constraints first, so
    that they stay in the JSON schema)."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


Int64 = integer(ge=-(2**63), le=2**63 - 1)


class OpenAIModel(BaseModel):
    # strict: no "1" for 1, no "yes" for true; a JSON integer is still a valid number
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# Not implemented: the values a client may still send because they change nothing.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "echo": (None, False), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "logprobs": (None, False, 0), "presence_penalty": (None, 0, 0.0),
    "suffix": (None, ""), "audio": (None,), "function_call": (None, "none"), "functions": (None, []),
    "metadata": (None, {}), "modalities": (None, ["text"]), "parallel_tool_calls": (None, True, False),
    "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "tool_choice": (None, "none"), "tools": (None, []),
    "top_logprobs": (None, 0), "web_search_options": (None,), "response_format": (None, {"type": "text"}),
}
UNSUPPORTED = frozenset(_NEUTRAL)


def neutral_values(name: str) -> str:
    """The values an unsupported parameter may take, in words (for error messages)."""
    shown = [json.dumps(v) for v in _NEUTRAL[name] if v is not None and not isinstance(v, float)]
    return ", ".join(shown + ["null"])


def _unsupported(name: str, description: str = "") -> Any:
    return Field(None, description=f"Not supported by cdserve: only {neutral_values(name)} "
                 f"(400 otherwise). " + description)


def _boolean(value: Any) -> Any:
    if not isinstance(value, bool):  # Literal[False] alone would take 0 (0 == False)
        raise ValueError("Input should be a valid boolean")  # noqa: TRY004  (pydantic: ValueError is a 400)
    return value


# The neutral values as types: the schema says exactly what is accepted.
OnlyFalse = Annotated[Literal[False], BeforeValidator(_boolean)]
Zero = Annotated[float, Field(ge=0, le=0)]
NoEntries = Annotated[dict[str, Any], Field(max_length=0)]
NoItems = Annotated[list[Any], Field(max_length=0)]
NonEmptyText = Annotated[str, Field(min_length=1)]
Stop = NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_STRINGS)] | None


class StreamOptions(OpenAIModel):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and no choices).")


class TextResponseFormat(OpenAIModel):
    type: Literal["text"]


class _GenerationRequest(OpenAIModel):
    """Fields and checks shared by completions and chat completions."""

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The max_tokens the client asked for (None: the default) and the parameter it used."""
        return self.max_tokens, "max_tokens"

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def control_request(self) -> ControlRequest | None:
        """The control object as `resolve_control` reads it (what the client sent, nothing added)."""
        if self.control is None:
            return None
        return ControlRequest.model_validate(self.control.model_dump(exclude_unset=True))

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens, _ = self.requested_max_tokens()
        return SamplingParams(
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed, stop=self.stop_strings(), n=1 if self.n is None else self.n)


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    # --- OpenAI parameters, in the spec's order ---
    model: str = Field(description="Served model name (see GET /v1/models).")
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | Annotated[list[integer(ge=0)], Field(min_length=1)] | Annotated[list[Annotated[list[integer(ge=0)], Field(min_length=1)]], Field(min_length=1)] = Field(
        description="Text, a list of texts, token ids, or a list of token-id lists. A list of "
        "prompts gives n choices per prompt, prompt i's at indices i*n ... i*n+n-1. Each prompt "
        "plus max_tokens must fit the model's context (400 context_length_exceeded).")
    best_of: integer(ge=1, le=1) | None = _unsupported(
        "best_of", "Use control.mode='best_of_n' instead.")
    echo: OnlyFalse | None = _unsupported("echo")
    frequency_penalty: Zero | None = _unsupported("frequency_penalty")
    logit_bias: NoEntries | None = _unsupported("logit_bias")
    logprobs: integer(ge=0, le=0) | None = _unsupported("logprobs")
    max_tokens: integer(ge=1) | None = Field(
        None, description="Tokens to generate per choice (default 16; at most the server's "
        "max_tokens_limit and the context left).")
    n: integer(ge=1) | None = Field(1, description="Choices per prompt (at most the "
                                                  "server's max_n).")
    presence_penalty: Zero | None = _unsupported("presence_penalty")
    seed: Int64 | None = Field(None, description="Same seed, same request, same output.")
    stop: Stop = Field(None, description="Up to 4 non-empty strings that end a choice (not "
                       "included in the text).")
    stream: bool | None = Field(False, description="Stream Server-Sent Events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    suffix: Annotated[str, Field(max_length=0)] | None = _unsupported("suffix")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(
        None, description="0 to 2 (default 1); 0 is greedy.")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="Nucleus sampling, (0, 1] (default 1).")
    user: str | None = Field(None, description="End-user id (logged, not used otherwise).")

    # --- cdserve extension ---
    control: ControlRequest | None = Field(None, description="Controlled decoding for this request "
                                           "(send with the openai client as extra_body={'control': {...}}). "
                                           "Omitted fields take the server's defaults (GET /v1/scorers).")


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions. The prompt is built with the model's chat template."""

    model_config = ConfigDict(json_schema_extra={
        "not": {"required": ["max_tokens", "max_completion_tokens"],
                "properties": {"max_tokens": {"type": "integer"},
                               "max_completion_tokens": {"type": "integer"}}},
        "description": "POST /v1/chat/completions. The prompt is built with the model's chat "
        "template. Send max_completion_tokens or max_tokens, not both."})

    # --- OpenAI parameters, in the spec's order ---
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far "
                                        "(text content only). With the prompt the chat template "
                                        "builds, it must fit the model's context.")
    model: str = Field(description="Served model name (see GET /v1/models).")
    audio: None = _unsupported("audio")
    frequency_penalty: Zero | None = _unsupported("frequency_penalty")
    function_call: Literal["none"] | None = _unsupported("function_call")
    functions: NoItems | None = _unsupported("functions")
    logit_bias: NoEntries | None = _unsupported("logit_bias")
    logprobs: OnlyFalse | None = _unsupported("logprobs")
    max_completion_tokens: integer(ge=1) | None = Field(
        None, description="Tokens to generate per choice (default: as many as the context and the "
        "server's max_tokens_limit allow).")
    max_tokens: integer(ge=1) | None = Field(
        None, description="Deprecated alias of max_completion_tokens.")
    metadata: NoEntries | None = _unsupported("metadata")
    modalities: Annotated[list[Literal["text"]], Field(min_length=1, max_length=1)] | None = \
        _unsupported("modalities")
    n: integer(ge=1) | None = Field(1, description="Choices (at most the server's max_n).")
    parallel_tool_calls: bool | None = _unsupported(  # without tools, either value changes nothing
        "parallel_tool_calls", "Without tools (none are supported) it changes nothing.")
    prediction: None = _unsupported("prediction")
    presence_penalty: Zero | None = _unsupported("presence_penalty")
    reasoning_effort: None = _unsupported("reasoning_effort")
    response_format: TextResponseFormat | None = _unsupported("response_format")
    seed: Int64 | None = Field(None, description="Same seed, same request, same output.")
    service_tier: Literal["auto", "default"] | None = _unsupported("service_tier")
    stop: Stop = Field(None, description="Up to 4 non-empty strings that end a choice (not "
                       "included in the text).")
    store: OnlyFalse | None = _unsupported("store")
    stream: bool | None = Field(False, description="Stream Server-Sent Events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(
        None, description="0 to 2 (default 1); 0 is greedy.")
    tool_choice: Literal["none"] | None = _unsupported("tool_choice")
    tools: NoItems | None = _unsupported("tools")
    top_logprobs: integer(ge=0, le=0) | None = _unsupported("top_logprobs")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="Nucleus sampling, (0, 1] (default 1).")
    user: str | None = Field(None, description="End-user id (logged, not used otherwise).")
    web_search_options: None = _unsupported("web_search_options")

    # --- cdserve extension ---
    control: ControlRequest | None = Field(None, description="Controlled decoding for this request "
                                           "(send with the openai client as extra_body={'control': {...}}). "
                                           "Omitted fields take the server's defaults (GET /v1/scorers).")

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None:
                raise InvalidRequestError("max_tokens", "send max_completion_tokens or max_tokens, not both")
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template expects them ('developer' is OpenAI's new 'system')."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


# ---------------------------------------------------------------- one server's request models


@dataclass(frozen=True)
class Limits:
    """What one server enforces beyond OpenAI's ranges. The model's facts (name, vocabulary,
    context, heads) are None until the engine has loaded."""

    max_tokens_limit: int
    max_n: int
    control: ControlConfig
    max_model_len: int
    model: str | None = None
    vocab_size: int | None = None
    heads: tuple[str, ...] | None = None
    rewards: tuple[str, ...] | None = None  # what control.rewards may name (GET /v1/rewards)


class _Control(OpenAIModel):
    """Per-request steering; fields left out take the server's defaults (GET /v1/scorers)."""


_MODE_DOCS = {
    "none": "plain decoding; the weights define the combined value reported",
    "token": "logits + strength * sum_h w_h Qnorm_h over the base model's top_k tokens",
    "block": "keep the best of num_candidates blocks of block_size tokens",
    "best_of_n": "keep the best of num_candidates whole answers",
}


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _control_union(limits: Limits) -> Any:
    """`control` as a union on `mode` (and, for block/best_of_n, on `selection`): each mode
    carries only its own fields (control/request.py's `_FIELDS_BY_MODE`; `strength` only with
    selection sample), with the server's ranges, the scorer's heads and the server's rewards. The
    server's default mode may omit `mode`; its default selection may omit `selection`. Fields
    and descriptions come from `ControlRequest`, so a new control field appears here by itself."""
    cfg = limits.control
    head = Literal[limits.heads] if limits.heads else str  # type: ignore[valid-type]
    reward = Literal[limits.rewards] if limits.rewards else str  # type: ignore[valid-type]
    weight = Annotated[float, Field(ge=-cfg.max_abs_weight, le=cfg.max_abs_weight)]
    narrower = {  # the server's limits, where it has them
        "weights": dict[head, weight],
        "rewards": dict[reward, weight],
        "strength": Annotated[float, Field(ge=0, le=cfg.max_strength)],
        "top_k": integer(ge=0, le=cfg.max_top_k),
        "block_size": integer(ge=1, le=cfg.max_block_size),
        "num_candidates": integer(ge=1, le=cfg.max_num_candidates),
        "prune_every": integer(ge=0, le=getattr(cfg, "max_prune_every", None)),
        "keep_fraction": Annotated[float, Field(gt=0, le=1)],
        "entropy_threshold": Annotated[float, Field(gt=0)],
        "risk": Annotated[float, Field(ge=-1, le=1)],
        "plausibility": Annotated[float, Field(ge=0, lt=1)],
    }

    def field(name: str) -> tuple[Any, Any]:
        info = ControlRequest.model_fields[name]
        annotation = narrower[name] | None if name in narrower else info.annotation
        return annotation, Field(None, description=info.description)

    def tag_field(value: str, default: str) -> tuple[Any, Any]:
        # the default may be left out, never null: OpenAPI's discriminator wants a string if present
        if value == default:
            return Literal[value], Field(None, description=f"'{value}' (the server's default: may be "  # type: ignore[valid-type]
                                         "omitted).", json_schema_extra=_no_default)
        return Literal[value], Field(description=f"'{value}'.")  # type: ignore[valid-type]

    def model(name: str, mode: str, selection: str | None = None) -> type[_Control]:
        names = sorted(_FIELDS_BY_MODE[mode] - {"selection"})
        doc = f"mode {mode}: {_MODE_DOCS[mode]}."
        extra = {}
        if selection is not None:
            doc = f"mode {mode}, selection {selection}: " + (
                _MODE_DOCS[mode] if selection == "argmax" else "pick by softmax(strength * value)") + "."
            extra["selection"] = tag_field(selection, cfg.selection)
            if selection == "argmax":
                names.remove("strength")
        return create_model(name, __base__=_Control, __doc__=doc, mode=tag_field(mode, cfg.mode), **extra,
                            **{n: field(n) for n in names})

    def by(key: str, default: str) -> Discriminator:
        def tag(value: Any) -> str:
            got = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
            return got if got is not None else default
        return Discriminator(tag)

    def on_selection(mode: str, name: str) -> Any:
        argmax, sample = model(f"{name}ArgmaxControl", mode, "argmax"), model(f"{name}SampleControl", mode, "sample")
        return Annotated[Annotated[argmax, Tag("argmax")] | Annotated[sample, Tag("sample")],
                         by("selection", cfg.selection)]

    return Annotated[
        Annotated[model("NoneControl", "none"), Tag("none")]
        | Annotated[model("TokenControl", "token"), Tag("token")]
        | Annotated[on_selection("block", "Block"), Tag("block")]
        | Annotated[on_selection("best_of_n", "BestOfN"), Tag("best_of_n")],
        by("mode", cfg.mode)]


def _like(base: type[BaseModel], name: str, annotation: Any) -> tuple[Any, Any]:
    """`name` of `base` with a narrower type (same default and description)."""
    info = base.model_fields[name]
    default = ... if info.is_required() else info.default
    return annotation, Field(default, description=info.description)


@dataclass(frozen=True)
class RequestModels:
    """The request models one server validates with (and documents)."""

    completion: type[CompletionRequest]
    chat: type[ChatCompletionRequest]

    @classmethod
    def build(cls, limits: Limits) -> RequestModels:
        served = Literal[limits.model] if limits.model else str  # type: ignore[valid-type]
        max_tokens = integer(ge=1, le=limits.max_tokens_limit) | None
        n = integer(ge=1, le=limits.max_n) | None
        token_id = integer(ge=0, le=limits.vocab_size - 1 if limits.vocab_size else None)
        ids = Annotated[list[token_id], Field(min_length=1, max_length=limits.max_model_len - 1)]
        prompt = (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | ids
                  | Annotated[list[ids], Field(min_length=1)])
        control = _control_union(limits) | None
        C, H = CompletionRequest, ChatCompletionRequest
        completion = create_model(
            "CompletionRequest", __base__=C, __doc__=C.__doc__, model=_like(C, "model", served),
            prompt=_like(C, "prompt", prompt), max_tokens=_like(C, "max_tokens", max_tokens),
            n=_like(C, "n", n), control=_like(C, "control", control))
        chat = create_model(
            "ChatCompletionRequest", __base__=H, __doc__=H.__doc__, model=_like(H, "model", served),
            max_completion_tokens=_like(H, "max_completion_tokens", max_tokens),
            max_tokens=_like(H, "max_tokens", max_tokens), n=_like(H, "n", n),
            control=_like(H, "control", control))
        return cls(completion, chat)


def lone_surrogate_at(value: Any, path: tuple = ()) -> tuple | None:
    """Where a string (or an object key) holds a lone UTF-16 surrogate ("\ud800" in JSON): text
    no tokenizer or UTF-8 encoder takes. None if there is none."""
    if isinstance(value, str):
        return None if _is_unicode(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            if not _is_unicode(key):
                return path
            found = lone_surrogate_at(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate_at(item, (*path, i))
            if found is not None:
                return found
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_request(model: type[OpenAIModel], raw: bytes, served_model: str | None,
                  content_type: str | None = None) -> Any:
    """A request body as `model`, or the error that refuses it: not JSON, or sent as another
    media type (curl -d's form encoding, say; 400 invalid_json),
    a lone surrogate in any string (400 naming where), an unknown model (404), or the first
    field that fails validation (RequestValidationError, 400 naming the field)."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise RequestValidationError([{"type": "model_type", "loc": ("body",), "msg": "not JSON",
                                       "input": media}])
    try:
        body = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "invalid JSON",
                                       "input": None}]) from None
    where = lone_surrogate_at(body)
    if where is not None:
        raise InvalidRequestError(".".join(str(p) for p in where) or "body", "strings must be valid "
                                  "Unicode: this one holds a lone UTF-16 surrogate (\\ud800-\\udfff)",
                                  code="invalid_unicode")
    if served_model is not None and isinstance(body, dict) and isinstance(body.get("model"), str) \
            and body["model"] != served_model:
        raise InvalidRequestError("model", f"the model '{body['model']}' does not exist; this server "
                                  f"serves '{served_model}'", 404, "model_not_found")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


# ---------------------------------------------------------------- responses


def _omit_if_none() -> Any:
    return Field(None, exclude_if=lambda v: v is None)


# No `system_fingerprint`: OpenAI's schemas allow it absent or a string, never null.


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


KL_DESCRIPTION = (
    "Sum over the answer's tokens of KL(pi || p): pi is the distribution the token was sampled from "
    "(token mode's steering and top_k, the temperature, top_p truncation), p the base model's "
    "whole-vocabulary distribution at the request's temperature; so plain decoding with top_p < 1 "
    "reports top-p's own cost. block/best_of_n add, per selection, the bound log K - (K-1)/K on "
    "KL(best of K || the candidates' sampler). Greedy requests (temperature 0) compare point "
    "masses: 0 while steering keeps the base model's greedy tokens; null (infinite) once it changes one.")


class ChoiceControl(BaseModel):
    """cdserve extension on each finished choice: what the steering did."""

    mode: str = Field(description="The control mode that ran.")
    values: dict[str, float] = Field(description="The scorer's value of the output, per head "
                                     "(reward units).")
    combined: float = Field(description="sum_h weight_h * normalised value_h (value_h + risk * spread_h "
                            "with control.risk).")
    kl: float | None = Field(0.0, description=KL_DESCRIPTION)
    selections: int = Field(0, description="block/best_of_n: selections made.")
    tokens_generated: int = Field(0, description="Tokens the base model sampled for this choice: "
                                  "every candidate's, and the EOS that ended a sequence (usage."
                                  "completion_tokens counts the answer's tokens, without the EOS).")
    rewards: dict[str, float] | None = Field(None, description="block/best_of_n with control.rewards: each "
                                             "named reward of the kept answer (text so far at the last "
                                             "selection).")
    spread: dict[str, float] | None = Field(None, exclude_if=lambda v: v is None, description="Scorers with "
                                            "ensemble heads (absent otherwise): per head, the "
                                            "standard deviation of its ensemble's values (reward units; "
                                            "`values` holds their mean). How unsure the scorer is.")

    @classmethod
    def from_values(cls, values: ControlValues | None) -> ChoiceControl | None:
        return None if values is None else cls(**values.to_dict())


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None
    # --- cdserve extension ---
    control: ChoiceControl | None = _omit_if_none()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk of /v1/completions (same object name as the full response, as OpenAI does).
    `usage` comes only in the last chunk, with no choices, when stream_options.include_usage."""

    usage: UsageInfo | None = _omit_if_none()


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: None = Field(None, description="Always null: cdserve never refuses in-band.")


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None
    # --- cdserve extension ---
    control: ChoiceControl | None = _omit_if_none()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = _omit_if_none()
    content: str | None = _omit_if_none()


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None
    # --- cdserve extension ---
    control: ChoiceControl | None = _omit_if_none()


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = _omit_if_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cdserve"
    # --- cdserve extension ---
    max_model_len: int
    backend: str
    scorer: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HeadInfo(BaseModel):
    name: str
    description: str
    reward: str
    reward_range: tuple[float, float]
    default_weight: float
    uncertainty: bool = Field(False, description="The head is an ensemble: responses report its spread "
                              "and control.risk acts on it.")
    ensemble_size: int = Field(1, description="Value projections the head averages (1: no ensemble).")


class Range(BaseModel):
    min: int | float
    max: int | float


class ScorerInfo(BaseModel):
    """GET /v1/scorers: what a client may put in `control`, and the server's defaults."""

    id: str = Field(description="The scorer the server loaded.")
    trained: bool = Field(description="False for an untrained stand-in: its steering is random.")
    base_model: str
    heads: list[HeadInfo]
    defaults: dict[str, Any] = Field(description="The control the server applies when a request "
                                     "omits a field.")
    ranges: dict[str, Range] = Field(description="Allowed range of each numeric control field "
                                     "(top_k 0 means the whole vocabulary).")
    modes: list[str]
    provenance: dict[str, Any]


class ScorerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ScorerInfo]


class RewardInfo(BaseModel):
    """GET /v1/rewards: a reward `control.rewards` may name."""

    name: str
    description: str
    kind: Literal["python", "http"] = Field(description="A Python reward of the server's registry, or "
                                            "an HTTP reward model configured at start-up.")
    range: tuple[float | None, float | None] = Field(description="Declared [min, max] of its scores "
                                                     "(null: unbounded).")


class RewardList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RewardInfo]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
