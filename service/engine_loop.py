"""The inference worker's loop: LitServe's request queue in, one engine step at a time, outputs out.

A loop of our own on LitServe's hooks (instead of its batched loops): every pass takes the
requests that arrived, aborts those whose client left or whose deadline passed, and runs one
engine step, so a request joins the running batch at the next step and leaves the moment it is done.
Each output goes back typed, to the API server that queued its request: all of a step's outputs
for one API server as one message (service/transport.py).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from litserve.loops.base import LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType

from engine.request import EngineError, RequestOutput
from service import metrics
from service.jobs import QueuedJob

logger = logging.getLogger(__name__)
IDLE_WAIT = 0.05  # seconds an idle worker blocks on the queue before checking again


@dataclass
class _Live:
    job: QueuedJob
    queue_id: int  # which API server's response queue
    uid: object  # LitServe's id for the request on that queue
    images: int
    tiles: int


class EngineLoop(LitLoop):
    def __init__(self):
        super().__init__()
        self._live: dict[str, _Live] = {}

    def pre_setup(self, lit_api, spec=None) -> None:
        pass  # none of LitServe's batching checks apply: this loop calls the API's own hooks

    def run(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner):
        """One pass; LitServe calls it forever."""
        if lit_api.should_stop():
            raise SystemExit(0)  # the service is shutting down after its drain
        engine = lit_api.engine
        self._take_requests(lit_api, request_queue, block=not engine.has_unfinished())
        self._abort_abandoned(lit_api, lit_api.cancelled_jobs())
        if not engine.has_unfinished():
            return
        stepped = False
        try:
            outputs = list(lit_api.encode_response(lit_api.predict()))
            stepped = True
        except Exception:  # noqa: BLE001 - a bug must cost the requests in flight, not the worker
            logger.exception("engine step failed; ending the %d requests in flight", len(self._live))
            outputs = []
            for request_id in list(self._live):
                lit_api.engine.abort(request_id)
                outputs.append(RequestOutput(request_id, error=EngineError(500, "Inference failed for this request.",
                                                                           "internal_error")))
        self._send(transport, outputs)
        stats = engine.stats
        step_log = getattr(lit_api, "step_log", None)  # STEP_LOG
        if stepped and step_log is not None:
            step_log.write(stats)
        metrics.RUNNING.set(stats.running)
        metrics.WAITING.set(stats.waiting)
        metrics.STEP_SECONDS.observe(stats.seconds)
        if stats.decode_rows:
            metrics.BATCH_SIZE.observe(stats.decode_rows)
        if stats.prefill_tokens:
            metrics.PREFILL_TOKENS.observe(stats.prefill_tokens)

    def _take_requests(self, lit_api, request_queue, block: bool) -> None:
        while True:
            item = self.get_request(request_queue, block=block, timeout=IDLE_WAIT if block else None)
            if item is None:
                return
            block = False
            queue_id, uid, _, job = item
            request = job.request
            self._live[request.request_id] = _Live(job, queue_id, uid, len(request.images), request.tiles)
            lit_api.engine.add_request(lit_api.decode_request(job))

    def _abort_abandoned(self, lit_api, cancelled: set[int]) -> None:
        """Requests nobody waits for any more (client gone, deadline passed) leave the engine at once."""
        now = time.monotonic()
        for request_id, live in list(self._live.items()):
            if live.job.overdue(now) or live.job.job_id in cancelled:
                lit_api.engine.abort(request_id)
                self._live.pop(request_id)

    def _send(self, transport, outputs: list[RequestOutput]) -> None:
        by_server: dict[int, list] = {}
        for output in outputs:
            live = self._live.get(output.request_id)
            if live is None:
                continue
            items = by_server.setdefault(live.queue_id, [])
            items.append(self._item(live, output, LitAPIStatus.OK))
            if output.finished:
                self._live.pop(output.request_id)
                if output.error is None:
                    _count(live, output)
                items.append(self._item(live, None, LitAPIStatus.FINISH_STREAMING))
        send_many = getattr(transport, "send_many", None)
        for queue_id, items in by_server.items():
            if send_many is not None:
                send_many(items, queue_id)
            else:  # LitServe's own transports take one item at a time
                for item in items:
                    transport.send(item, consumer_id=queue_id)

    def _item(self, live: _Live, data, status: LitAPIStatus) -> tuple:
        """What LitServe's `put_response` would send; its response task on the API server reads it."""
        return live.uid, (data, status, LoopResponseType.STREAMING, self.worker_id)


def _count(live: _Live, output: RequestOutput) -> None:
    metrics.IMAGES.inc(live.images)
    metrics.TILES.inc(live.tiles)
    metrics.PROMPT_TOKENS.inc(output.prompt_tokens)
    metrics.COMPLETION_TOKENS.inc(output.completion_tokens)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        metrics.GPU_MEMORY.labels(f"cuda:{device}").set(torch.cuda.memory_allocated(device))
