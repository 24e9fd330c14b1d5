"""What the engine needs from a model: the interface that the real network and the mock both implement.

The engine owns scheduling, slots, sampling and text; a runner owns the network and the per-slot
state it keeps between steps (for the real model: Mamba conv/SSM states and attention KV).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.request import EngineRequest

if TYPE_CHECKING:  # the API servers import this module for its exceptions: no torch there
    import torch


class PromptRefused(ValueError):
    """The request cannot run, whatever the load: it gets 400 with this message and code."""

    code = "invalid_prompt"


class PromptTooLong(PromptRefused):
    """The request can never fit in one slot."""

    code = "request_too_large"


class SpecialTokenInText(PromptRefused):
    """Client text would forge one of the model's special tokens (an image placeholder, a turn marker)."""

    code = "special_token_in_text"


class TextStream(Protocol):
    """Turns generated ids into text, split into ('reasoning' | 'content', text) pieces."""

    def push(self, token_id: int) -> list[tuple[str, str]]: ...

    def flush(self) -> list[tuple[str, str]]: ...


@dataclass
class Prompt:
    length: int  # prompt tokens, image tokens included
    eos_ids: frozenset[int]
    text: TextStream
    payload: Any  # the runner's own: token ids, image tiles, embeddings once computed


@dataclass
class PrefillChunk:
    slot: int
    prompt: Prompt
    start: int  # prompt positions [start, end) run in this step
    end: int

    @property
    def completes(self) -> bool:
        return self.end >= self.prompt.length


class ModelRunner(Protocol):
    num_slots: int
    max_seq_len: int  # prompt plus output tokens one slot holds
    sampling_defaults: tuple[float, float]  # temperature, top_p when a request gives none
    device: object  # where it runs and in which dtype (reported by /v1/metadata)
    dtype: object

    def prepare(self, request: EngineRequest) -> Prompt: ...

    def encode_images(self, prompts: list[Prompt]) -> None:
        """Run the vision encoder once over the images of every prompt given (those starting their prefill)."""
        ...

    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Run the chunks together, each into its slot; return the next-token logits at each chunk's last
        position, (len(chunks), vocab), float32 (meaningful for the chunks that complete their prompt)."""
        ...

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One token per slot; return next-token logits (len(slots), vocab), float32."""
        ...

    def release(self, slot: int) -> None:
        """The sequence in this slot is gone; its state may be overwritten."""
        ...
