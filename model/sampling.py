"""Per-job next-token choice: greedy for temperature 0, otherwise temperature + top-p with the job's own RNG."""

from __future__ import annotations

import secrets

import torch

from model.types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """`logits`: one row (vocab,), float32 on CPU."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest head of the distribution whose mass reaches top_p (the top token always stays).
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < params.top_p
        keep[0] = True
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        probs = filtered / filtered.sum()
    return int(torch.multinomial(probs, 1, generator=generator))
