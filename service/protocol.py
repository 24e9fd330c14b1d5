"""OpenAI chat-completions types, declared once.

The request model accepts exactly what nv-ingest and the `openai` client send; fields we do not
act on (`frequency_penalty`, `user`, `media_options`, whatever a client's `extra_body` adds, ...)
are ignored rather than refused, as OpenAI-compatible servers do. Of vLLM's per-request extensions,
`chat_template_kwargs.enable_thinking` and `mm_processor_kwargs.max_num_tiles` are honoured; their
other keys are ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator


# Fixed bounds on the shape of a request (a caption request has two messages and two parts): a body
# of hundreds of thousands of empty messages fits the size limit but would cost seconds to process.
MAX_MESSAGES = 1024
MAX_PARTS = 1024


class TextContent(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Optional[str] = None


class ImageContent(BaseModel):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Union[TextContent, ImageContent], Field(discriminator="type")]


class ChatMessage(BaseModel):
    # "developer" is the newer OpenAI name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[ContentPart], Field(max_length=MAX_PARTS)]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    """vLLM's `chat_template_kwargs`: only `enable_thinking` is read."""

    model_config = ConfigDict(extra="ignore")

    # Strict: "false" or 0 is refused (422) rather than read as a boolean.
    enable_thinking: Optional[StrictBool] = None


class MMProcessorKwargs(BaseModel):
    """vLLM's `mm_processor_kwargs`: only `max_num_tiles` is read (its upper bound, the server's
    MAX_NUM_TILES, is checked in service/jobs.py)."""

    model_config = ConfigDict(extra="ignore")

    max_num_tiles: Optional[StrictInt] = Field(None, ge=1)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = ""
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    # Absent or null: the checkpoint's generation_config.json default, else 1.0 (as vLLM does).
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is generated.")
    # vLLM's extensions: scheduling order (lower runs sooner) and fixed-length outputs for benchmarks.
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # Sent by nv-ingest's newer caption client: the reasoning switch and a per-request tile budget.
    chat_template_kwargs: Optional[ChatTemplateKwargs] = None
    mm_processor_kwargs: Optional[MMProcessorKwargs] = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def enable_thinking(self) -> Optional[bool]:
        return self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None

    @property
    def max_num_tiles(self) -> Optional[int]:
        return self.mm_processor_kwargs.max_num_tiles if self.mm_processor_kwargs else None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: Optional[str] = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None


class StreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nvidia"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
