"""Request builders and stream collectors for the engine tests."""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from engine.request import EngineRequest, ImagePart, Message, RequestOutput, SamplingParams, TextPart
from service.jobs import to_input

_ids = itertools.count()


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A per-seed colour gradient plus noise: distinct seeds look different to the tiny model."""
    rng = np.random.default_rng(seed)
    start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]
    base = start * (1 - ramp) + end * ramp
    pixels = base + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_job(images, text: str, system: str | None = "/no_think", priority: int = 0, **params) -> EngineRequest:
    params.setdefault("max_tokens", 16)
    params.setdefault("temperature", 0.0)
    messages = []
    if system is not None:
        messages.append(Message("system", [TextPart(system)]))
    messages.append(Message("user", [ImagePart(to_input(i, 12)) for i in images] + [TextPart(text)]))
    return EngineRequest(f"req-{next(_ids)}", messages, SamplingParams(**params), priority=priority)


def collect(engine, outputs_by_id: dict[str, list[RequestOutput]], max_steps: int = 20_000) -> None:
    """Step the engine until it is idle, appending each output under its request id; an engine that is
    still busy after `max_steps` steps fails the test instead of hanging it."""
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        for out in engine.step():
            seen = outputs_by_id.setdefault(out.request_id, [])
            assert not seen or not seen[-1].finished, "output after the last one"
            seen.append(out)
    raise AssertionError(f"the engine still had work after {max_steps} steps")


def run(engine, jobs):
    """Run jobs together: per job (content, reasoning, last output, number of outputs)."""
    for job in jobs:
        engine.add_request(job)
    outputs: dict[str, list[RequestOutput]] = {}
    collect(engine, outputs)
    results = []
    for job in jobs:
        outs = outputs[job.request_id]
        assert outs[-1].error is None, outs[-1].error
        assert outs[-1].finish_reason in ("stop", "length")
        results.append(("".join(o.content for o in outs), "".join(o.reasoning_content for o in outs), outs[-1],
                        len(outs)))
    return results
