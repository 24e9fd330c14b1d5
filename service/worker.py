"""What an inference worker does with one LitServe batch, whatever the engine.

Jobs the API server already gave up on are skipped; per-step engine output becomes plain dicts
for LitServe's queues; a GPU out-of-memory error splits the batch and retries instead of failing
every request in it.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Iterator

from model.types import CaptionJob, Delta, Engine
from service import metrics

logger = logging.getLogger(__name__)
Output = dict | None


def run_batch(engine: Engine, jobs: list[CaptionJob]) -> Iterator[list[Output]]:
    """Yield, per step, one encoded delta (or None) per job, aligned with `jobs`."""
    metrics.BATCH_SIZE.observe(len(jobs))
    live = [i for i, job in enumerate(jobs) if not job.cancelled()]
    yield from _generate(engine, jobs, live, batch_size=len(live))
    _record_gpu_memory()


def _generate(engine: Engine, jobs: list[CaptionJob], live: list[int], batch_size: int) -> Iterator[list[Output]]:
    if not live:
        return
    emitted, finished = set(), set()
    try:
        for step in engine.generate([jobs[i] for i in live]):
            out: list[Output] = [None] * len(jobs)
            for i, delta in zip(live, step):
                if delta is None:
                    continue
                emitted.add(i)
                if delta.finish_reason:
                    finished.add(i)
                    _count(jobs[i], delta)
                out[i] = {**delta.__dict__, "batch_size": batch_size}
            yield out
    except Exception as exc:
        if not is_out_of_memory(exc):
            yield from _isolate_failure(engine, jobs, live, emitted, exc)
            return
        _free_gpu_memory()
        logger.warning("out of GPU memory with a batch of %d; splitting it", len(live))
        out = [None] * len(jobs)
        # A job that already streamed text cannot be restarted without repeating it: 503 (retried).
        for i in emitted - finished:
            out[i] = _error(503, "The server ran out of GPU memory while generating; retry the request.",
                            "gpu_out_of_memory")
        untouched = [i for i in live if i not in emitted]
        if len(live) == 1 and untouched:
            out[untouched[0]] = _error(
                400, "This request needs more GPU memory than the server has free: send fewer or smaller "
                     "images, or a smaller max_tokens.", "request_too_large")
            untouched = []
        if any(o is not None for o in out):
            yield out
        half = (len(untouched) + 1) // 2
        for part in (untouched[:half], untouched[half:]):
            yield from _generate(engine, jobs, part, batch_size=len(part))


def _isolate_failure(engine: Engine, jobs: list[CaptionJob], live: list[int], emitted: set[int],
                     exc: Exception) -> Iterator[list[Output]]:
    """An unexpected error before any output: retry halves, so that only the job that fails gets the error."""
    if emitted:
        raise exc  # text already went out for some jobs: they cannot be replayed
    if len(live) == 1:
        logger.error("inference failed for request %s", jobs[live[0]].request_id, exc_info=exc)
        out: list[Output] = [None] * len(jobs)
        out[live[0]] = _error(500, "Inference failed for this request.", "internal_error")
        yield out
        return
    logger.warning("a batch of %d failed (%s); retrying in halves to isolate the request", len(live), exc)
    half = (len(live) + 1) // 2
    for part in (live[:half], live[half:]):
        yield from _generate(engine, jobs, part, batch_size=len(part))


def _count(job: CaptionJob, delta: Delta) -> None:
    metrics.IMAGES.inc(len(job.images))
    metrics.TILES.inc(job.tiles)
    metrics.PROMPT_TOKENS.inc(delta.prompt_tokens)
    metrics.COMPLETION_TOKENS.inc(delta.completion_tokens)


def _error(status: int, message: str, code: str) -> dict:
    return {"error": {"status": status, "message": message, "code": code}}


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_gpu_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record_gpu_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        metrics.GPU_MEMORY.labels(f"cuda:{device}").set(torch.cuda.memory_allocated(device))
