"""Mock engine: deterministic captions that depend on the image content, no weights, no GPU.

Tokens are counted as whitespace-separated words: a caption's words are its completion tokens,
and the prompt's tokens are its text words plus `IMAGE_TOKENS` per 512x512 tile, with tiles
counted as the real model would cut the image.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import numpy as np
from PIL import Image

from model.stops import StopMatcher
from model.types import CaptionJob, Delta

IMAGE_TOKENS = 256


def describe(image: Image.Image) -> str:
    pixels = np.asarray(image, dtype=np.uint8)
    r, g, b = (int(round(c)) for c in pixels.reshape(-1, 3).mean(axis=0))
    digest = hashlib.sha256(pixels.tobytes() + f"{image.size}".encode()).hexdigest()[:10]
    brightness = "bright" if (r + g + b) / 3 >= 128 else "dark"
    shape = "wide" if image.width > image.height else "tall" if image.height > image.width else "square"
    return (f"A {brightness} {shape} image of {image.width}x{image.height} pixels with mean colour "
            f"#{r:02x}{g:02x}{b:02x} and content hash {digest}.")


def mock_caption(job: CaptionJob) -> str:
    images = job.images
    if not images:
        words = sum(len(m.text.split()) for m in job.messages if m.role == "user")
        return f"No image was given; the prompt has {words} words."
    return " ".join(describe(image) for image in images)


def prompt_tokens(job: CaptionJob) -> int:
    return sum(len(m.text.split()) for m in job.messages) + IMAGE_TOKENS * job.tiles


class MockEngine:
    """Streams the mock caption word by word, one word per step for every job of the batch.

    `step_delay` (seconds, MOCK_TOKEN_DELAY) imitates a model's decoding time, for tests of
    timeouts, overload and shutdown that need requests to stay in flight.
    """

    def __init__(self, step_delay: float = 0.0):
        self.step_delay = step_delay

    def generate(self, jobs: list[CaptionJob]) -> Iterator[list[Delta | None]]:
        states = [_MockState(job) for job in jobs]
        while not all(s.done for s in states):
            if self.step_delay:
                time.sleep(self.step_delay)
            yield [s.step() for s in states]


class _MockState:
    def __init__(self, job: CaptionJob):
        self.job = job
        self.words = mock_caption(job).split()
        self.limit = job.params.max_tokens
        self.prompt_tokens = prompt_tokens(job)
        self.stops = StopMatcher(job.params.stop)
        self.emitted = 0
        self.done = False

    def step(self) -> Delta | None:
        if self.done:
            return None
        if self.job.cancelled():
            self.done = True
            return None
        word = self.words[self.emitted]
        self.emitted += 1
        text, stopped = self.stops.feed(word if self.emitted == 1 else " " + word)
        finish = None
        if stopped:
            finish = "stop"
        elif self.emitted >= self.limit:
            finish = "length"
        elif self.emitted == len(self.words):
            finish = "stop"
        if finish:
            text += "" if stopped else self.stops.flush()
            self.done = True
        return Delta(content=text, finish_reason=finish, prompt_tokens=self.prompt_tokens,
                     completion_tokens=self.emitted)
