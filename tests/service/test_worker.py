"""service.worker.run_batch: skipping abandoned jobs and splitting a batch on GPU out-of-memory."""

from __future__ import annotations

import time

import torch

from model.types import CaptionJob, Delta, Message, SamplingParams, TextPart
from service.worker import run_batch


def job(name: str, **kwargs) -> CaptionJob:
    return CaptionJob([Message("user", [TextPart(name)])], SamplingParams(max_tokens=4), request_id=name, **kwargs)


class FakeEngine:
    """Two steps per job; raises CUDA OOM for any batch larger than `fits`, at prefill or mid-decode."""

    def __init__(self, fits: int, fail_after_first_step: bool = False):
        self.fits = fits
        self.fail_after_first_step = fail_after_first_step
        self.batches: list[list[str]] = []

    def generate(self, jobs):
        self.batches.append([j.request_id for j in jobs])
        too_big = len(jobs) > self.fits
        if too_big and not self.fail_after_first_step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield [Delta(content=j.request_id, prompt_tokens=1, completion_tokens=1) for j in jobs]
        if too_big:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        yield [Delta(content="!", finish_reason="stop", prompt_tokens=1, completion_tokens=2) for j in jobs]


def collect(steps, n):
    text, finish, errors = [""] * n, [None] * n, [None] * n
    for step in steps:
        assert len(step) == n
        for i, out in enumerate(step):
            if out is None:
                continue
            if "error" in out:
                errors[i] = out["error"]
                continue
            text[i] += out["content"]
            finish[i] = out["finish_reason"] or finish[i]
    return text, finish, errors


def test_oom_at_prefill_splits_until_batches_fit():
    engine = FakeEngine(fits=2)
    jobs = [job(c) for c in "abcde"]
    text, finish, errors = collect(run_batch(engine, jobs), 5)
    assert text == ["a!", "b!", "c!", "d!", "e!"] and finish == ["stop"] * 5 and errors == [None] * 5
    assert engine.batches == [list("abcde"), list("abc"), list("ab"), ["c"], list("de")]


def test_single_request_that_cannot_fit_gets_a_4xx():
    text, finish, errors = collect(run_batch(FakeEngine(fits=0), [job("a")]), 1)
    assert errors[0]["status"] == 400 and "GPU memory" in errors[0]["message"]


def test_oom_mid_decode_fails_started_jobs_with_retryable_503():
    text, finish, errors = collect(run_batch(FakeEngine(fits=1, fail_after_first_step=True), [job("a"), job("b")]), 2)
    assert [e["status"] for e in errors] == [503, 503]


class PoisonedEngine(FakeEngine):
    """Fails any batch holding the job named "bad", before or after its first step."""

    def __init__(self, after_first_step: bool = False):
        super().__init__(fits=99)
        self.after_first_step = after_first_step

    def generate(self, jobs):
        inner = super().generate(jobs)
        if not self.after_first_step and any(j.request_id == "bad" for j in jobs):
            raise ValueError("tokenizer choked")
        yield next(inner)
        if any(j.request_id == "bad" for j in jobs):
            raise ValueError("tokenizer choked")
        yield from inner


def test_a_failing_request_is_isolated_from_its_batch():
    engine = PoisonedEngine()
    text, finish, errors = collect(run_batch(engine, [job("a"), job("bad"), job("c"), job("d")]), 4)
    assert text[0] == "a!" and text[2] == "c!" and text[3] == "d!"
    assert errors[1]["status"] == 500 and errors[0] is None and errors[2] is None


def test_an_error_after_output_fails_the_batch():
    try:
        list(run_batch(PoisonedEngine(after_first_step=True), [job("a"), job("bad")]))
    except ValueError:
        pass
    else:
        raise AssertionError("jobs that already streamed text cannot be replayed: the error must propagate")


def test_abandoned_jobs_are_not_generated():
    engine = FakeEngine(fits=8)
    expired = job("late", deadline=time.monotonic() - 1)
    cancelled = job("gone", job_id=7, cancel_check=lambda job_id: job_id == 7)
    text, finish, errors = collect(run_batch(engine, [job("a"), expired, cancelled]), 3)
    assert engine.batches == [["a"]]
    assert text == ["a!", "", ""]
