"""Job builders and stream collectors for the engine tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

from model.types import CaptionJob, ImagePart, Message, SamplingParams, TextPart


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A per-seed colour gradient plus noise: distinct seeds look different to the tiny model."""
    rng = np.random.default_rng(seed)
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]
    base = start * (1 - ramp) + end * ramp
    pixels = base + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_job(images, text: str, system: str | None = "/no_think", **params) -> CaptionJob:
    params.setdefault("max_tokens", 16)
    params.setdefault("temperature", 0.0)
    messages = []
    if system is not None:
        messages.append(Message("system", [TextPart(system)]))
    messages.append(Message("user", [ImagePart(i) for i in images] + [TextPart(text)]))
    return CaptionJob(messages, SamplingParams(**params))


def run(engine, jobs):
    """Collect every job's stream: (content, reasoning, last delta, number of non-empty steps)."""
    deltas = [[] for _ in jobs]
    for step in engine.generate(jobs):
        assert len(step) == len(jobs)
        for i, d in enumerate(step):
            if d is not None:
                assert not deltas[i] or deltas[i][-1].finish_reason is None, "delta after finish"
                deltas[i].append(d)
    out = []
    for ds in deltas:
        assert ds and ds[-1].finish_reason in ("stop", "length")
        out.append(("".join(d.content for d in ds), "".join(d.reasoning_content for d in ds), ds[-1], len(ds)))
    return out
