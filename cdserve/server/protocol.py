"""OpenAI API request and response models, in the order of OpenAI's spec.

Each request model has three blocks: the OpenAI parameters cdserve implements, the OpenAI
parameters it does not (accepted only at their neutral value, otherwise refused with 400 naming
them, never silently ignored), and the cdserve extension (`control`). Unknown fields are refused.
`to_sampling_params()` is the one conversion into the engine's types.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cdserve.control.request import ControlRequest
from cdserve.errors import InvalidRequestError
from cdserve.outputs import ControlValues
from cdserve.sampling import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Not implemented: the values a client may still send because they change nothing.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "echo": (None, False), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "logprobs": (None, False), "presence_penalty": (None, 0, 0.0),
    "suffix": (None, ""), "audio": (None,), "function_call": (None, "none"), "functions": (None, []),
    "metadata": (None, {}), "modalities": (None, ["text"]), "parallel_tool_calls": (None,),
    "prediction": (None,), "reasoning_effort": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "tool_choice": (None, "none"), "tools": (None, []),
    "top_logprobs": (None, 0), "web_search_options": (None,),
}


def _unsupported(name: str, description: str = "") -> Any:
    neutral = ", ".join(repr(v) for v in _NEUTRAL[name] if v is not None) or "unset"
    return Field(None, description=f"Not supported by cdserve: refused with 400 unless {neutral}. "
                 + description)


class StreamOptions(OpenAIModel):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and no choices).")


class _GenerationRequest(OpenAIModel):
    """Fields and checks shared by completions and chat completions."""

    def refuse_unsupported(self) -> None:
        """Raise InvalidRequestError naming the first unsupported parameter given a non-neutral value."""
        for name, neutral in _NEUTRAL.items():
            if name in type(self).model_fields and getattr(self, name) not in neutral:
                raise InvalidRequestError(name, "not supported by this server", code="unsupported_parameter")

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The max_tokens the client asked for (None: the default) and the parameter it used."""
        return self.max_tokens, "max_tokens"

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

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
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a list of texts, token ids, or a list of token-id lists. A list of "
        "prompts gives n choices per prompt, prompt i's at indices i*n ... i*n+n-1.")
    best_of: int | None = _unsupported("best_of", "Use control.mode='best_of_n' instead.")
    echo: bool | None = _unsupported("echo")
    frequency_penalty: float | None = _unsupported("frequency_penalty")
    logit_bias: dict[str, float] | None = _unsupported("logit_bias")
    logprobs: int | None = _unsupported("logprobs")
    max_tokens: int | None = Field(None, description="Tokens to generate per choice (default 16; "
                                   "at most the server's max_tokens_limit and the context left).")
    n: int | None = Field(1, description="Choices per prompt (at most the server's max_n).")
    presence_penalty: float | None = _unsupported("presence_penalty")
    seed: int | None = Field(None, description="Same seed, same request, same output.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end a choice "
                                         "(not included in the text).")
    stream: bool | None = Field(False, description="Stream Server-Sent Events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    suffix: str | None = _unsupported("suffix")
    temperature: float | None = Field(None, description="0 to 2 (default 1); 0 is greedy.")
    top_p: float | None = Field(None, description="Nucleus sampling, (0, 1] (default 1).")
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

    # --- OpenAI parameters, in the spec's order ---
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far "
                                        "(text content only).")
    model: str = Field(description="Served model name (see GET /v1/models).")
    audio: Any | None = _unsupported("audio")
    frequency_penalty: float | None = _unsupported("frequency_penalty")
    function_call: Any | None = _unsupported("function_call")
    functions: list[Any] | None = _unsupported("functions")
    logit_bias: dict[str, float] | None = _unsupported("logit_bias")
    logprobs: bool | None = _unsupported("logprobs")
    max_completion_tokens: int | None = Field(None, description="Tokens to generate per choice "
                                              "(default: as many as the context and the server's "
                                              "max_tokens_limit allow).")
    max_tokens: int | None = Field(None, description="Deprecated alias of max_completion_tokens.")
    metadata: dict[str, str] | None = _unsupported("metadata")
    modalities: list[str] | None = _unsupported("modalities")
    n: int | None = Field(1, description="Choices (at most the server's max_n).")
    parallel_tool_calls: bool | None = _unsupported("parallel_tool_calls")
    prediction: Any | None = _unsupported("prediction")
    presence_penalty: float | None = _unsupported("presence_penalty")
    reasoning_effort: str | None = _unsupported("reasoning_effort")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'} is "
                                                   "supported; anything else is refused with 400.")
    seed: int | None = Field(None, description="Same seed, same request, same output.")
    service_tier: str | None = _unsupported("service_tier")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end a choice "
                                         "(not included in the text).")
    store: bool | None = _unsupported("store")
    stream: bool | None = Field(False, description="Stream Server-Sent Events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, description="0 to 2 (default 1); 0 is greedy.")
    tool_choice: Any | None = _unsupported("tool_choice")
    tools: list[Any] | None = _unsupported("tools")
    top_logprobs: int | None = _unsupported("top_logprobs")
    top_p: float | None = Field(None, description="Nucleus sampling, (0, 1] (default 1).")
    user: str | None = Field(None, description="End-user id (logged, not used otherwise).")
    web_search_options: Any | None = _unsupported("web_search_options")

    # --- cdserve extension ---
    control: ControlRequest | None = Field(None, description="Controlled decoding for this request "
                                           "(send with the openai client as extra_body={'control': {...}}). "
                                           "Omitted fields take the server's defaults (GET /v1/scorers).")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.response_format not in (None, {"type": "text"}):
            raise InvalidRequestError("response_format", "only {'type': 'text'} is supported",
                                      code="unsupported_parameter")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidRequestError("max_tokens", "send max_completion_tokens or max_tokens, not both")

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template expects them ('developer' is OpenAI's new 'system')."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


# ---------------------------------------------------------------- responses


def _omit_if_none() -> Any:
    return Field(None, exclude_if=lambda v: v is None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChoiceControl(BaseModel):
    """cdserve extension on each finished choice: what the steering did."""

    mode: str = Field(description="The control mode that ran.")
    values: dict[str, float] = Field(description="The scorer's value of the output, per head "
                                     "(reward units).")
    combined: float = Field(description="sum_h weight_h * normalised value_h.")
    kl: float = Field(0.0, description="token: sum over steps of KL(steered || base); "
                      "block/best_of_n: the bound log K - (K-1)/K per selection.")
    selections: int = Field(0, description="block/best_of_n: selections made.")
    tokens_generated: int = Field(0, description="Tokens the base model sampled for this choice, "
                                  "candidates included.")

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
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk of /v1/completions (same object name as the full response, as OpenAI does).
    `usage` comes only in the last chunk, with no choices, when stream_options.include_usage."""

    usage: UsageInfo | None = _omit_if_none()


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


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
    system_fingerprint: str | None = None
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
    system_fingerprint: str | None = None
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


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
