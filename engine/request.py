"""What crosses the boundary between the service and the engine.

An `EngineRequest` goes in with an id: messages whose images are already tiled (uint8, in the
API-server process), the sampling settings and a priority. `RequestOutput`s come back per id, one
per step while text flows; the last one carries `finish_reason` (or `error`). Service bookkeeping
(deadline, admission, cancellation) stays on the service side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Union

import numpy as np

FinishReason = Literal["stop", "length"]
GREEDY_BELOW = 1e-5


@dataclass
class TextPart:
    text: str


@dataclass
class ImageInput:
    """One image as the vision encoder needs it: its tiles, uint8 (tiles, side, side, 3), RGB."""

    tiles: np.ndarray
    width: int  # the decoded image's size, before tiling
    height: int

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the pixels the model sees (kept once computed, and pickled along)."""
        return hashlib.sha256(np.ascontiguousarray(self.tiles).tobytes() + f"{self.width}x{self.height}".encode()
                              ).hexdigest()


@dataclass
class ImagePart:
    image: ImageInput


Part = Union[TextPart, ImagePart]


@dataclass
class Message:
    role: Literal["system", "user", "assistant"]
    content: list[Part]

    @property
    def text(self) -> str:
        # Several text parts of one message are joined with a newline, as vLLM's chat code does.
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImageInput]:
        return [p.image for p in self.content if isinstance(p, ImagePart)]


@dataclass
class SamplingParams:
    """Per-request settings; None means the checkpoint's generation_config.json default (else 1.0)."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0  # EOS is not accepted before this many tokens
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)

    def with_defaults(self, temperature: float, top_p: float) -> SamplingParams:
        return SamplingParams(self.max_tokens, temperature if self.temperature is None else self.temperature,
                              top_p if self.top_p is None else self.top_p, self.seed, list(self.stop),
                              self.min_tokens, self.ignore_eos)

    @property
    def greedy(self) -> bool:
        # Below this, temperature scaling overflows float32 logits; the answer is the argmax anyway.
        return self.temperature is not None and self.temperature < GREEDY_BELOW


@dataclass
class EngineRequest:
    request_id: str
    messages: list[Message]
    params: SamplingParams
    priority: int = 0  # lower runs sooner, as vLLM defines it
    enable_thinking: bool | None = None  # chat_template_kwargs.enable_thinking; None: the system prompt decides

    @property
    def images(self) -> list[ImageInput]:
        return [img for m in self.messages for img in m.images]

    @property
    def tiles(self) -> int:
        return sum(img.num_tiles for img in self.images)

    @property
    def system_prompt(self) -> str | None:
        """The system messages' text, or None when the request has none."""
        system = [m.text for m in self.messages if m.role == "system"]
        return "\n".join(system) if system else None


@dataclass(frozen=True)
class EngineError:
    status: int
    message: str
    code: str


@dataclass
class RequestOutput:
    """New text for one request at one step. Token counts are running totals, so the last output
    holds the request's exact usage."""

    request_id: str
    content: str = ""
    reasoning_content: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: EngineError | None = None
    step_rows: int = 0  # the rows sampled together in the step that made this output (its decoding batch)
    prefill_s: float | None = None  # on a request's first output: seconds from its prefill's start to its first token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None
