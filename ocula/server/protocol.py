"""OpenAI chat-completions schemas: the request the server accepts and the objects it returns.

Notable features:
- message content is a string or a list of parts: `text`, `image_url` (http(s), `data:` or allowed
  `file://` URLs) and `video_url` (vLLM's extension, same URL rules);
- `max_completion_tokens` (current name) wins over `max_tokens` (deprecated name), as in OpenAI's API;
- `to_sampling_params` maps the request onto the engine's `SamplingParams` (`logprobs` + `top_logprobs`
  -> `logprobs=k`); options ocula cannot honour (tools, penalties other than 0, a JSON `response_format`)
  are refused with a 400 rather than silently ignored;
- vLLM's extensions `ignore_eos`, `min_tokens` and `top_k` (sent by the openai client as `extra_body`);
- unknown top-level fields are ignored, as OpenAI's own server does, for forward compatibility.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ocula.engine.sampling_params import SamplingParams
from ocula.errors import UnsupportedFeatureError

MAX_N = 16
MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class VideoURL(_Strict):
    url: str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1 - MAX_N)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    # vLLM's extensions (the openai client sends them through `extra_body`)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    top_k: int | None = Field(default=None, ge=-1)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        if self.tools:
            raise UnsupportedFeatureError("tools / function calling is not supported by this server yet.")
        if self.presence_penalty or self.frequency_penalty:
            raise UnsupportedFeatureError("presence_penalty and frequency_penalty are not supported; use 0.")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise UnsupportedFeatureError(
                f"response_format {self.response_format.get('type')!r} (constrained JSON output) is not "
                "supported; leave it unset or use {'type': 'text'}."
            )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=[s for s in stop if s],
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            top_k=self.top_k or 0,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


# ---- responses ---------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "ocula"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
