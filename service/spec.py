"""LitServe's OpenAI spec, completed for a caption service: the chat-completions route.

`litserve.specs.openai.OpenAISpec` gives us the route. Where it falls short we override: requests
are validated and their images decoded here, in the API-server process, before they are queued (so
one bad image cannot fail a whole batch); `seed`, `stop` and `max_completion_tokens` reach the
engine; `finish_reason` and `usage` are the engine's own; errors use the OpenAI shape; and every
request is bounded: admission (429), deadline (504), worker death (503), client disconnect.
The queue to the workers is `service/worker_link.py`; the answers' shapes are `service/answers.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from litserve.specs.openai import OpenAISpec
from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import ValidationError

from engine.request import EngineRequest, RequestOutput
from service import metrics, tracing
from service.answers import collect, respond, sse
from service.cache import CaptionCache
from service.errors import APIError, from_worker, shown
from service.jobs import JobLimits, PromptCheck, QueuedJob, build_job
from service.protocol import ChatCompletionRequest
from service.routes import OperationalRoutes, ServiceInfo
from service.state import SharedState
from service.worker_link import StreamEnded, WorkerFailed, WorkerLink

logger = logging.getLogger(__name__)
_POLL_SECONDS = 0.25  # how often a waiting request checks its deadline, its client and the worker


class ClientGone(Exception):
    pass


class CaptionSpec(OpenAISpec):
    def __init__(self, info: ServiceInfo, limits: JobLimits, shared: SharedState, cache_size: int = 0,
                 cache_sampled: bool = False, prompt_check: PromptCheck | None = None):
        super().__init__()
        self.info = info
        self.prompt_check = prompt_check
        self.limits = limits
        self.shared = shared
        # One cache per API-server process; a disconnecting leader must not fail the requests it leads.
        self.cache = CaptionCache(cache_size, cache_sampled, leader_only_errors=(ClientGone,))
        self.link = WorkerLink(self)
        self.routes = OperationalRoutes(info, shared, self.is_ready)

    def __getstate__(self):
        # Workers only need the spec for LitServe's bookkeeping; the shared state travels with the API.
        state = super().__getstate__()
        state["shared"] = state["cache"] = state["prompt_check"] = state["link"] = state["routes"] = None
        return state

    def pre_setup(self, lit_api) -> None:
        super().pre_setup(lit_api)
        # Added through the spec so that LitServe applies the API's `authorize` dependency to them;
        # the auth check itself lets health and metrics through.
        for path, endpoint, methods in self.routes.endpoints():
            self.add_endpoint(path, endpoint, methods)

    def populate_context(self, context, request) -> None:
        pass  # the job carries everything the worker needs; no per-request context is used

    def is_ready(self) -> bool:
        return not (self.shared.worker_dead or self.shared.draining) and self.link.workers_ready()

    async def chat_completion(self, raw_request: Request):
        if self.shared.full:
            # Full: refuse before parsing and decoding, or a flood of refusals takes the CPU and the
            # executor threads from the requests already admitted. (`_admit` decides for the others.)
            raise self._queue_full()
        # Parsing and validating a body of up to MAX_REQUEST_BYTES is CPU work: off the event loop, so
        # liveness and other requests never wait behind it.
        request = await asyncio.to_thread(_parse_request, await raw_request.body())
        if request.model and request.model not in self.info.model_names:
            names = "', '".join(self.info.model_names)
            raise APIError(404, f"The model '{shown(request.model)}' does not exist; this server serves '{names}'.",
                           param="model", code="model_not_found")
        if not self.is_ready():
            metrics.REJECTED.labels("not_ready").inc()
            raise _unavailable()
        request_id = getattr(raw_request.state, "request_id", "") or uuid.uuid4().hex
        # Image decoding and hashing are CPU work: keep them off the event loop.
        job, cache_key = await asyncio.to_thread(self._prepare, request, request_id)
        log_fields = getattr(raw_request.state, "log_fields", {})
        log_fields.update(images=len(job.images))
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            deltas = self._run(self._admit(job), raw_request, log_fields)
            try:  # wait for the first delta, so that an early failure still gets its own status code
                first = await anext(deltas, None)
            except ClientGone:
                return Response(status_code=499)
            return StreamingResponse(sse(self.info.served_model_name, _chain(first, deltas), include_usage,
                                         quiet=(ClientGone,)), media_type="text/event-stream")
        if cache_key is not None:
            (metrics.CACHE_HITS if self.cache.is_known(cache_key) else metrics.CACHE_MISSES).inc()
        try:
            result = await self.cache.get_or_compute(
                cache_key, lambda: collect(self._run(self._admit(job), raw_request, log_fields)))
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; the status is for the log only
        return respond(self.info.served_model_name, result)

    def _admit(self, job: EngineRequest) -> QueuedJob:
        """Take a place among the requests in flight (released by `_run`), or refuse with 429."""
        if not self.shared.try_admit():
            raise self._queue_full()
        if self.shared.draining or self.shared.worker_dead:
            # SIGTERM (or a worker death) came while this request was being decoded: the drain
            # does not wait for it, so it must not start.
            self.shared.release()
            metrics.REJECTED.labels("not_ready").inc()
            raise _unavailable()
        # The engine's id is unique per queued request (a client's X-Request-ID need not be).
        return QueuedJob(dataclasses.replace(job, request_id=uuid.uuid4().hex), self.shared.new_job_id(),
                         time.monotonic() + self.info.request_timeout)

    def _queue_full(self) -> APIError:
        metrics.REJECTED.labels("queue_full").inc()
        return APIError(429, f"Too many requests in flight (MAX_QUEUED_REQUESTS={self.shared.max_in_flight}); "
                             "retry shortly.", code="queue_full", headers={"Retry-After": "1"})

    def _prepare(self, request: ChatCompletionRequest, request_id: str) -> tuple[EngineRequest, str | None]:
        # Runs in a thread that carries the request's context, so the span is the request span's child.
        # No exception event: its message or traceback could quote the request; the status says which error.
        with tracing.tracer().start_as_current_span("images.decode_and_tile", record_exception=False,
                                                    set_status_on_exception=False) as span:
            try:
                job = build_job(request, self.limits, request_id)
            except Exception as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(getattr(exc, "code", None)
                                                                         or type(exc).__name__)))
                raise
            span.set_attributes({"caption.images": len(job.images), "caption.tiles": job.tiles,
                                 "caption.image_pixels": sum(i.width * i.height for i in job.images)})
        if self.prompt_check is not None:
            self.prompt_check(job)
        return job, self.cache.key_for(job)

    async def _run(self, job: QueuedJob, raw_request: Request, log_fields: dict) -> AsyncIterator[RequestOutput]:
        """Queue an admitted job and yield its deltas; its admission is released however this ends."""
        metrics.IN_FLIGHT.inc()
        metrics.QUEUE_DEPTH.inc()
        started = finished = False
        admitted_at = checked_at = time.monotonic()
        # The engine's part, as this process sees it: submitted -> first output (a slot, then prefill), then
        # first -> last output (decoding). Children of the request span.
        spans = _EngineSpans(job.request, otel_context.get_current())
        failure: BaseException | None = None
        try:
            with self.link.submit(job) as mailbox:
                while True:
                    await mailbox.wait(_POLL_SECONDS)
                    # Also while tokens flow: a client can leave in the middle of a long generation.
                    if time.monotonic() - checked_at >= _POLL_SECONDS:
                        await self._check_waiting(job, raw_request)
                        checked_at = time.monotonic()
                    for event in mailbox.take():
                        if isinstance(event, StreamEnded):
                            if not finished:  # the worker dropped the job: it passed its deadline
                                finished = True
                                self._raise_if_overdue(job)
                                raise APIError(500, "The model stopped without finishing the answer.",
                                               code="internal_error")
                            return
                        if isinstance(event, WorkerFailed):
                            finished = True
                            raise from_worker(event.payload)
                        if not started:
                            started = True
                            metrics.QUEUE_DEPTH.dec()
                            metrics.TTFT.observe(time.monotonic() - admitted_at)
                            spans.first_output(event)
                        spans.output(event)
                        if event.error is not None:
                            finished = True
                            raise APIError(event.error.status, event.error.message, code=event.error.code)
                        if event.finish_reason:
                            finished = True
                            log_fields.update(prompt_tokens=event.prompt_tokens,
                                              completion_tokens=event.completion_tokens,
                                              finish_reason=event.finish_reason)
                            spans.finished(event)
                        yield event
        except BaseException as exc:
            failure = exc
            raise
        finally:
            spans.end(failure if failure is not None or finished else ClientGone())
            if not finished:
                self.shared.cancel(job.job_id)  # free the worker from a request nobody will read
            if not started:
                metrics.QUEUE_DEPTH.dec()
            metrics.IN_FLIGHT.dec()
            self.shared.release()

    async def _check_waiting(self, job: QueuedJob, raw_request: Request) -> None:
        if self.shared.aborting:
            raise APIError(503, "The service is stopping now (a second stop signal); retry the request.",
                           code="service_unavailable", headers={"Retry-After": "5"})
        if self.shared.worker_dead:
            raise APIError(503, "The inference worker died; the service is restarting. Retry the request.",
                           code="worker_unavailable", headers={"Retry-After": "5"})
        self._raise_if_overdue(job)
        if await raw_request.is_disconnected():
            raise ClientGone

    def _raise_if_overdue(self, job: QueuedJob) -> None:
        if job.overdue():
            raise APIError(504, f"The request did not finish within REQUEST_TIMEOUT={self.info.request_timeout:g}s.",
                           code="timeout")


class _EngineSpans:
    """`engine.queue`, `engine.prefill` and `engine.decode` of one request (no-ops when tracing is off).

    The engine runs in another process: the queue span starts when the request is queued here, and the
    first output carries how long its prefill took (`prefill_s`, from the prefill's start to the first
    token), which splits the time before the first output into the wait for a slot and the prefill."""

    def __init__(self, request: EngineRequest, parent):
        self.parent = parent
        self.waiting = tracing.tracer().start_span("engine.queue", context=parent, attributes={
            "caption.images": len(request.images), "caption.tiles": request.tiles,
            "caption.max_tokens": request.params.max_tokens, "caption.priority": request.priority})
        self.decoding = None
        self.batches: list[int] = []  # the decoding batch of each output

    def first_output(self, event: RequestOutput) -> None:
        now = time.time_ns()
        prefill_ns = max(0, int((event.prefill_s or 0.0) * 1e9))
        prefill_start = now - prefill_ns
        if self.waiting.is_recording():
            prefill_start = max(prefill_start, self.waiting.start_time or prefill_start)
        self.waiting.end(end_time=prefill_start)
        self.waiting = None
        prefill = tracing.tracer().start_span("engine.prefill", context=self.parent, start_time=prefill_start,
                                              attributes={"caption.prompt_tokens": event.prompt_tokens})
        prefill.end(end_time=now)
        self.decoding = tracing.tracer().start_span("engine.decode", context=self.parent, start_time=now)

    def output(self, event: RequestOutput) -> None:
        if event.step_rows:
            self.batches.append(event.step_rows)

    def finished(self, event: RequestOutput) -> None:
        if self.decoding is not None:
            self.decoding.set_attributes({"caption.prompt_tokens": event.prompt_tokens,
                                          "caption.completion_tokens": event.completion_tokens,
                                          "caption.finish_reason": event.finish_reason})
            if self.batches:  # the batch it decoded in: rows sampled together per step, over its steps
                self.decoding.set_attributes({"caption.decode_batch_min": min(self.batches),
                                              "caption.decode_batch_max": max(self.batches),
                                              "caption.decode_batch_mean": round(sum(self.batches) / len(self.batches),
                                                                                 2)})

    def end(self, error: BaseException | None) -> None:
        for span in (self.waiting, self.decoding):
            if span is None or not span.is_recording():
                continue
            if error is not None:  # the kind of failure only: a message could quote the request
                gone = isinstance(error, (ClientGone, GeneratorExit, asyncio.CancelledError))
                code = "client_gone" if gone else getattr(error, "code", None) or type(error).__name__
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(code)))
            span.end()


def _parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:  # the same 400/422 answers FastAPI's own validation gives
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _unavailable() -> APIError:
    return APIError(503, "The model is loading, or the service is shutting down or restarting; retry shortly.",
                    code="service_unavailable", headers={"Retry-After": "5"})


async def _chain(first: RequestOutput | None, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    if first is not None:
        yield first
    async for item in rest:
        yield item
