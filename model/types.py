"""Types shared by the HTTP layer and the engines.

A `CaptionJob` is what the API-server process hands to an inference worker: messages with images
already decoded to RGB, plus the request's own sampling settings. An engine turns a list of jobs
(one LitServe batch) into a stream of per-step `Delta` lists aligned with that batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, Union

from PIL import Image

FinishReason = Literal["stop", "length"]
GREEDY_BELOW = 1e-5


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    image: Image.Image  # RGB, decoded and validated by the API server


Part = Union[TextPart, ImagePart]


@dataclass
class Message:
    role: Literal["system", "user", "assistant"]
    content: list[Part]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[Image.Image]:
        return [p.image for p in self.content if isinstance(p, ImagePart)]


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        # Below this, temperature scaling overflows float32 logits; the answer is the argmax anyway.
        return self.temperature < GREEDY_BELOW


@dataclass
class CaptionJob:
    messages: list[Message]
    params: SamplingParams
    request_id: str = ""
    tiles: int = 0  # 512x512 tiles its images become (counted in the API server, for metrics and mock usage)
    job_id: int = 0
    deadline: float = math.inf  # time.monotonic() after which nobody waits for the answer
    # Set inside the inference worker: tells whether the API server gave up on this job.
    cancel_check: Callable[[int], bool] | None = field(default=None, repr=False, compare=False)

    def cancelled(self) -> bool:
        """Engines call this once per step and stop working on a job for which it is true."""
        if time.monotonic() > self.deadline:
            return True
        return self.cancel_check is not None and self.cancel_check(self.job_id)

    @property
    def images(self) -> list[Image.Image]:
        return [img for m in self.messages for img in m.images]

    @property
    def system_prompt(self) -> str:
        return "".join(m.text for m in self.messages if m.role == "system")


@dataclass
class Delta:
    """New text for one job at one step; the last delta of a job carries `finish_reason`.

    Token counts are running totals, so the last delta holds the job's exact usage.
    """

    content: str = ""
    reasoning_content: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(Protocol):
    def generate(self, jobs: list[CaptionJob]) -> Iterator[list[Delta | None]]:
        """Yield, per decoding step, one entry per job: a Delta, or None when that job has nothing new."""
        ...
