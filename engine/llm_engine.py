"""The engine: `add_request`, `step`, `abort`, with typed outputs per request id.

One `step` runs the scheduler's plan: prefill chunks (the vision encoder sees every image that
joins in this step at once), then one decoding step for every prefilled sequence, then one sampling
call for all rows. A sequence leaves at once when it finishes, and its slot goes to the next waiting
request. Errors take the same channel as text: an output with `error` set ends its request.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from engine.request import EngineError, EngineRequest, RequestOutput
from engine.runner import ModelRunner, PrefillChunk, PromptRefused, PromptTooLong
from engine.sampler import Sampler
from engine.scheduler import Scheduler
from engine.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    running: int = 0
    waiting: int = 0
    prefill_tokens: int = 0
    decode_rows: int = 0
    seconds: float = 0.0  # the whole step
    prefill_rows: int = 0
    model_seconds: float = 0.0  # encoder, prefill, decode and sampling, up to the ids on the host
    host_seconds: float = 0.0  # end of the previous step's model work to the start of this one's (0 after idle)
    ended_at: float = 0.0  # unix time


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _error_for(exc: Exception) -> EngineError:
    if is_out_of_memory(exc):
        return EngineError(503, "The server ran out of GPU memory for this request; retry it.", "gpu_out_of_memory")
    return EngineError(500, "Inference failed for this request.", "internal_error")


class LLMEngine:
    def __init__(self, runner: ModelRunner, max_running: int, max_prefill_tokens: int):
        self.runner = runner
        self.scheduler = Scheduler(min(max_running, runner.num_slots), max_prefill_tokens)
        self.sampler = Sampler()
        self.stats = StepStats()
        self._arrivals = itertools.count()
        self._outputs: list[RequestOutput] = []  # produced between steps: refusals
        self._model_done: float | None = None  # when the last step's model work ended, while work remained

    # ---- requests in -------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        try:
            prompt = self.runner.prepare(request)
        except PromptRefused as exc:
            self._refuse(request, str(exc), exc.code)
            return
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the engine
            log.exception("preparing request %s failed", request.request_id)
            self._outputs.append(RequestOutput(request.request_id, error=_error_for(exc)))
            return
        params = request.params.with_defaults(*self.runner.sampling_defaults)
        if prompt.length + params.max_tokens > self.runner.max_seq_len:
            self._refuse(request, f"this request needs {prompt.length} prompt tokens plus max_tokens="
                                  f"{params.max_tokens}, over the {self.runner.max_seq_len} tokens one sequence may "
                                  "hold here (MAX_MODEL_LEN): send fewer or smaller images, or a smaller max_tokens",
                         PromptTooLong.code)
            return
        self.scheduler.add(Sequence(request, params, prompt, next(self._arrivals)))

    def _refuse(self, request: EngineRequest, message: str, code: str) -> None:
        self._outputs.append(RequestOutput(request.request_id, error=EngineError(400, message, code)))

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; True when it was still here. It gets no further output."""
        seq = self.scheduler.remove(request_id)
        if seq is not None and seq.slot is not None:
            self.runner.release(seq.slot)
        return seq is not None

    def has_unfinished(self) -> bool:
        return bool(self._outputs) or self.scheduler.has_work()

    # ---- one step -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        outputs, self._outputs = self._outputs, []
        plan = self.scheduler.schedule()
        model_started = time.perf_counter()
        rows: list[Sequence] = []
        logits: list[torch.Tensor] = []
        if plan.prefill:
            done, prefill_logits = self._prefill(plan.prefill, outputs)
            rows += done
            logits += prefill_logits
        if plan.decode:
            try:
                logits.append(self.runner.decode([s.slot for s in plan.decode], [s.last_token for s in plan.decode]))
                rows += plan.decode
            except Exception as exc:  # noqa: BLE001 - every decoding sequence shares the failed call
                log.exception("decoding step failed for %d sequences", len(plan.decode))
                for seq in plan.decode:
                    self._fail(seq, exc, outputs)
        tokens = self.sampler(torch.cat(logits), rows) if rows else []
        model_done = time.perf_counter()
        sampled_at = time.monotonic()
        for seq, token in zip(rows, tokens):
            if seq.prefill_started is not None:  # its first token: the end of its prefill
                seq.prefill_s, seq.prefill_started = sampled_at - seq.prefill_started, None
            out = seq.accept(token)
            if out is not None:
                out.step_rows = len(rows)
                out.prefill_s, seq.prefill_s = seq.prefill_s, None
                outputs.append(out)
            if seq.done:
                self._finish(seq)
        host = model_started - self._model_done if self._model_done is not None else 0.0
        self._model_done = model_done if self.scheduler.has_work() else None
        self.stats = StepStats(self.scheduler.num_running, self.scheduler.num_waiting, plan.prefill_tokens,
                               len(plan.decode), time.perf_counter() - started, len(plan.prefill),
                               model_done - model_started, host, time.time())
        return outputs

    def _prefill(self, work: list[tuple[Sequence, PrefillChunk]], outputs: list[RequestOutput]):
        """Encode the new images together, then prefill every chunk in one pass; a failure (out of
        memory, say) costs only the requests it must: never a sequence that is already decoding."""
        starting = [seq for seq, chunk in work if chunk.start == 0]
        now = time.monotonic()
        for seq in starting:
            seq.prefill_started = now
        if starting:
            try:
                self.runner.encode_images([seq.prompt for seq in starting])
            except Exception:  # noqa: BLE001 - find who failed: encode them one by one
                for seq in starting:
                    try:
                        self.runner.encode_images([seq.prompt])
                    except Exception as exc:  # noqa: BLE001
                        log.error("vision encoder failed for request %s", seq.request_id, exc_info=exc)
                        self._fail(seq, exc, outputs)
        work = [(seq, chunk) for seq, chunk in work if not seq.done]
        return self._run_chunks(work, outputs) if work else ([], [])

    def _run_chunks(self, work: list[tuple[Sequence, PrefillChunk]], outputs: list[RequestOutput]):
        """All chunks in one pass; if that fails, prompts that were just starting retry alone (their
        slots start afresh), and the others fail: their slot state may be half-written."""
        try:
            logits = self.runner.prefill([chunk for _, chunk in work])
        except Exception as exc:  # noqa: BLE001
            if len(work) == 1:
                log.error("prefill failed for request %s", work[0][0].request_id, exc_info=exc)
                self._fail(work[0][0], exc, outputs)
                return [], []
            log.warning("a prefill of %d requests failed (%s); retrying the new ones one by one", len(work), exc)
            done, rows = [], []
            for seq, chunk in work:
                if chunk.start > 0:
                    self._fail(seq, exc, outputs)
                    continue
                d, r = self._run_chunks([(seq, chunk)], outputs)
                done += d
                rows += r
            return done, rows
        done, rows = [], []
        for row, (seq, chunk) in enumerate(work):
            seq.num_prefilled = chunk.end
            if chunk.completes:
                done.append(seq)
                rows.append(logits[row:row + 1])
        return done, rows

    def _fail(self, seq: Sequence, exc: Exception, outputs: list[RequestOutput]) -> None:
        seq.finish_reason = "stop"
        outputs.append(RequestOutput(seq.request_id, error=_error_for(exc), prompt_tokens=seq.prompt.length,
                                     completion_tokens=seq.completion_tokens))
        self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.slot is not None:
            self.runner.release(seq.slot)
