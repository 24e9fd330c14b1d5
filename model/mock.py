"""Mock model: deterministic captions that depend on the image content, no weights, no GPU.

`MockRunner` implements the engine's `ModelRunner` interface, so mock mode runs the real scheduler,
sampler and text handling. Its tokens are whitespace words: token id k is the k-th word of the
request's answer and id 0 is EOS. Prompt tokens are the prompt's words plus `IMAGE_TOKENS_PER_TILE` per tile.
With reasoning on (as the real template decides it: the system prompt lacks `/no_think`), the answer
starts with a short reasoning, returned as `reasoning_content`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.llm_engine import LLMEngine
from engine.request import EngineRequest, ImageInput
from engine.runner import PrefillChunk, Prompt
from model.tiling import IMAGE_TOKENS_PER_TILE

EOS = 0
VOCAB = 1024  # every caption is far shorter (at most 4 images of 16 words)
_CHOSEN, _OTHER = 0.0, -1e4  # logits that make every sampler choose the intended word


def describe(image: ImageInput) -> str:
    """A caption from what the engine receives: the tiles and the decoded image's size."""
    # The last tile is the whole-image thumbnail (or the only tile): its mean colour is the image's.
    r, g, b = (int(round(c)) for c in image.tiles[-1].reshape(-1, 3).mean(axis=0, dtype=np.float64))
    brightness = "bright" if (r + g + b) / 3 >= 128 else "dark"
    shape = "wide" if image.width > image.height else "tall" if image.height > image.width else "square"
    return (f"A {brightness} {shape} image of {image.width}x{image.height} pixels with mean colour "
            f"#{r:02x}{g:02x}{b:02x} and content hash {image.digest[:10]}.")


def mock_caption(request: EngineRequest) -> str:
    images = request.images
    if not images:
        words = sum(len(m.text.split()) for m in request.messages if m.role == "user")
        return f"No image was given; the prompt has {words} words."
    return " ".join(describe(image) for image in images)


def mock_reasoning(request: EngineRequest) -> str:
    """The mock's reasoning, when the request turns reasoning on ('' otherwise)."""
    from model.prompt import NO_THINK, chat_messages

    if NO_THINK in chat_messages(request)[0]["content"]:
        return ""
    return f"The request holds {len(request.images)} image(s); I describe each in one sentence."


def prompt_tokens(request: EngineRequest) -> int:
    return sum(len(m.text.split()) for m in request.messages) + IMAGE_TOKENS_PER_TILE * request.tiles


class WordText:
    """The mock's text stream: token k is word k of the answer; the first `reasoning` words are reasoning."""

    def __init__(self, words: list[str], reasoning: int = 0):
        self.words = words
        self.reasoning = reasoning
        self.started: set[str] = set()

    def push(self, token_id: int) -> list[tuple[str, str]]:
        index = (token_id - 1) % len(self.words)
        stream = "reasoning" if index < self.reasoning else "content"
        word = " " + self.words[index] if stream in self.started else self.words[index]
        self.started.add(stream)
        return [(stream, word)]

    def flush(self) -> list[tuple[str, str]]:
        return []


class MockRunner:
    """Every step costs `step_delay` seconds (MOCK_TOKEN_DELAY), to imitate a model's decoding time."""

    sampling_defaults = (1.0, 1.0)

    def __init__(self, num_slots: int, max_seq_len: int, step_delay: float = 0.0):
        self.num_slots, self.max_seq_len, self.step_delay = num_slots, max_seq_len, step_delay
        self.device, self.dtype = "cpu", "float32"  # its logits
        self._words: dict[int, int] = {}  # slot -> caption length in words

    def prepare(self, request: EngineRequest) -> Prompt:
        reasoning = mock_reasoning(request).split()
        words = (reasoning + mock_caption(request).split())[:VOCAB - 1]
        return Prompt(max(1, prompt_tokens(request)), frozenset({EOS}), WordText(words, len(reasoning)), len(words))

    def encode_images(self, prompts: list[Prompt]) -> None:
        pass

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        for chunk in chunks:
            self._words[chunk.slot] = chunk.prompt.payload
        return self._logits([(chunk.slot, EOS) for chunk in chunks])  # after the prompt comes word 1

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        if self.step_delay:
            time.sleep(self.step_delay)
        return self._logits(list(zip(slots, tokens)))

    def _logits(self, rows: list[tuple[int, int]]) -> torch.Tensor:
        """After word k comes word k + 1, then EOS (after EOS, when EOS is masked: the caption again)."""
        logits = torch.full((len(rows), VOCAB), _OTHER)
        for row, (slot, last) in enumerate(rows):
            length = self._words[slot]
            logits[row, EOS if last == length else last % length + 1] = _CHOSEN
        return logits

    def release(self, slot: int) -> None:
        self._words.pop(slot, None)


def mock_engine(max_running: int, max_seq_len: int, max_prefill_tokens: int, step_delay: float = 0.0) -> LLMEngine:
    return LLMEngine(MockRunner(max_running, max_seq_len, step_delay), max_running, max_prefill_tokens)
