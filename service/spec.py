"""LitServe's OpenAI spec, completed for a caption service.

`litserve.specs.openai.OpenAISpec` gives us the route and the queue plumbing. Where it falls short
we override: requests are validated and their images decoded here, in the API-server process,
before they are queued (so one bad image cannot fail a whole batch); `seed`, `stop` and
`max_completion_tokens` reach the engine; `finish_reason` and `usage` are the engine's own; errors
use the OpenAI shape; a stream always ends with `data: [DONE]`, even after an error; and every
request is bounded: admission (429), deadline (504), worker death (503), client disconnect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.openai import OpenAISpec
from pydantic import ValidationError
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus

from engine.request import EngineRequest, FinishReason, RequestOutput
from service import metrics
from service.cache import CaptionCache
from service.errors import APIError, from_worker
from service.jobs import JobLimits, PromptCheck, QueuedJob, build_job
from service.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    DeltaMessage,
    ModelCard,
    ModelList,
    StreamChoice,
    Usage,
)
from service.state import SharedState

logger = logging.getLogger(__name__)
_POLL_SECONDS = 0.25  # how often a waiting request checks its deadline, its client and the worker


@dataclass(frozen=True)
class ServiceInfo:
    served_model_name: str
    model_root: str
    max_model_len: int
    request_timeout: float
    metadata: dict


class ClientGone(Exception):
    pass


@dataclass(frozen=True)
class Answer:
    """A whole answer, collected from a request's outputs (and what the caption cache keeps)."""

    content: str
    reasoning_content: str | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


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
        self._workers_ready = False

    def __getstate__(self):
        # Workers only need the spec for LitServe's bookkeeping; the shared state travels with the API.
        state = super().__getstate__()
        state["shared"] = state["cache"] = state["prompt_check"] = None
        return state

    def pre_setup(self, lit_api) -> None:
        super().pre_setup(lit_api)
        # Added through the spec so that LitServe applies the API's `authorize` dependency to them;
        # the auth check itself lets health and metrics through.
        self.add_endpoint("/v1/models", self.list_models, ["GET"])
        self.add_endpoint("/v1/health/live", self.live, ["GET"])
        self.add_endpoint("/v1/health/ready", self.ready, ["GET"])
        self.add_endpoint("/v1/metadata", self.metadata, ["GET"])
        self.add_endpoint("/v1/version", self.version, ["GET"])
        self.add_endpoint("/metrics", self.metrics, ["GET"])

    def populate_context(self, context, request) -> None:
        pass  # the job carries everything the worker needs; no per-request context is used

    # Operational routes ------------------------------------------------------------------
    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.info.served_model_name, root=self.info.model_root,
                                         max_model_len=self.info.max_model_len)])

    async def live(self) -> JSONResponse:
        return JSONResponse({"object": "health.response", "message": "Service is live."})

    def is_ready(self) -> bool:
        if self.shared.worker_dead or self.shared.draining:
            return False
        if not self._workers_ready:  # once all workers are up, stop asking LitServe's manager
            statuses = dict(self._server.workers_setup_status) if self._server is not None else {}
            self._workers_ready = bool(statuses) and all(s == WorkerSetupStatus.READY for s in statuses.values())
        return self._workers_ready

    async def ready(self) -> JSONResponse:
        if self.is_ready():
            return JSONResponse({"object": "health.response", "message": "Service is ready."})
        return JSONResponse({"object": "health.response", "message": "Service is not ready."}, status_code=503)

    async def metadata(self) -> JSONResponse:
        # The slot count is settled by the worker at start (from free GPU memory).
        return JSONResponse({**self.info.metadata, "max_running_sequences": self.shared.engine_slots})

    async def version(self) -> JSONResponse:
        return JSONResponse({"release": self.info.metadata.get("version", ""), "api": "1.0.0"})

    async def metrics(self) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # Chat completions --------------------------------------------------------------------
    async def chat_completion(self, raw_request: Request):
        # Parsing and validating a body of up to MAX_REQUEST_BYTES is CPU work: off the event loop, so
        # liveness and other requests never wait behind it.
        request = await asyncio.to_thread(_parse_request, await raw_request.body())
        if request.model and request.model != self.info.served_model_name:
            raise APIError(404, f"The model '{request.model}' does not exist; this server serves "
                                f"'{self.info.served_model_name}'.", param="model", code="model_not_found")
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
            return StreamingResponse(self._sse(first, deltas, include_usage), media_type="text/event-stream")
        if cache_key is not None:
            (metrics.CACHE_HITS if self.cache.is_known(cache_key) else metrics.CACHE_MISSES).inc()
        try:
            result = await self.cache.get_or_compute(
                cache_key, lambda: _collect(self._run(self._admit(job), raw_request, log_fields)))
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; the status is for the log only
        return _respond(self.info.served_model_name, result)

    def _admit(self, job: EngineRequest) -> QueuedJob:
        """Take a place among the requests in flight (released by `_run`), or refuse with 429."""
        if not self.shared.try_admit():
            metrics.REJECTED.labels("queue_full").inc()
            raise APIError(429, f"Too many requests in flight (MAX_QUEUED_REQUESTS={self.shared.max_in_flight}); "
                                "retry shortly.", code="queue_full", headers={"Retry-After": "1"})
        if self.shared.draining or self.shared.worker_dead:
            # SIGTERM (or a worker death) came while this request was being decoded: the drain
            # does not wait for it, so it must not start.
            self.shared.release()
            metrics.REJECTED.labels("not_ready").inc()
            raise _unavailable()
        # The engine's id is unique per queued request (a client's X-Request-ID need not be).
        return QueuedJob(dataclasses.replace(job, request_id=uuid.uuid4().hex), self.shared.new_job_id(),
                         time.monotonic() + self.info.request_timeout)

    def _prepare(self, request: ChatCompletionRequest, request_id: str) -> tuple[EngineRequest, str | None]:
        job = build_job(request, self.limits, request_id)
        if self.prompt_check is not None:
            self.prompt_check(job)
        return job, self.cache.key_for(job)

    async def _run(self, job: QueuedJob, raw_request: Request, log_fields: dict) -> AsyncIterator[RequestOutput]:
        """Queue an admitted job and yield its deltas; its admission is released however this ends."""
        uid = uuid.uuid4()
        queue, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        metrics.IN_FLIGHT.inc()
        metrics.QUEUE_DEPTH.inc()
        started = False
        finished = False
        admitted_at = time.monotonic()
        try:
            self.request_queue.put((self.response_queue_id, uid, admitted_at, job))
            checked_at = time.monotonic()
            while True:
                try:
                    await asyncio.wait_for(event.wait(), _POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
                # Also while tokens flow: a client can leave in the middle of a long generation.
                if time.monotonic() - checked_at >= _POLL_SECONDS:
                    await self._check_waiting(job, raw_request)
                    checked_at = time.monotonic()
                if not event.is_set():
                    continue
                event.clear()
                while queue:
                    data, status = queue.popleft()
                    if status == LitAPIStatus.FINISH_STREAMING:
                        if not finished:  # the worker dropped the job: it passed its deadline
                            finished = True
                            self._raise_if_overdue(job)
                            raise APIError(500, "The model stopped without finishing the answer.",
                                           code="internal_error")
                        return
                    if status == LitAPIStatus.ERROR:
                        finished = True
                        raise from_worker(data)
                    if not isinstance(data, RequestOutput):
                        continue
                    if not started:
                        started = True
                        metrics.QUEUE_DEPTH.dec()
                        metrics.TTFT.observe(time.monotonic() - admitted_at)
                    if data.error is not None:
                        finished = True
                        raise APIError(data.error.status, data.error.message, code=data.error.code)
                    if data.finish_reason:
                        finished = True
                        log_fields.update(prompt_tokens=data.prompt_tokens, completion_tokens=data.completion_tokens,
                                          finish_reason=data.finish_reason)
                    yield data
        finally:
            if not finished:
                self.shared.cancel(job.job_id)  # free the worker from a request nobody will read
            if not started:
                metrics.QUEUE_DEPTH.dec()
            metrics.IN_FLIGHT.dec()
            self.shared.release()
            # LitServe's own spec never frees these entries (upstream #452).
            self.response_buffer.pop(uid, None)

    async def _check_waiting(self, job: QueuedJob, raw_request: Request) -> None:
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

    async def _sse(self, first: RequestOutput | None, deltas: AsyncIterator[RequestOutput], include_usage: bool):
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(choices: list[StreamChoice], usage: Usage | None = None) -> str:
            chunk = ChatCompletionChunk(id=chunk_id, created=created, model=self.info.served_model_name,
                                        choices=choices, usage=usage)
            return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

        yield event([StreamChoice(delta=DeltaMessage(role="assistant", content=""))])
        last = RequestOutput("")
        try:
            pending = [first] if first is not None else []
            async for delta in _chain(pending, deltas):
                last = delta
                text, thought = delta.content or None, delta.reasoning_content or None
                if text or thought:
                    yield event([StreamChoice(delta=DeltaMessage(content=text, reasoning_content=thought))])
            yield event([StreamChoice(delta=DeltaMessage(), finish_reason=last.finish_reason or "stop")])
            if include_usage:
                yield event([], usage=_usage(last.prompt_tokens, last.completion_tokens))
        except ClientGone:
            return
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception:  # noqa: BLE001 - the status line is gone; report in-band and end cleanly
            logger.exception("stream failed")
            yield f"data: {json.dumps(APIError(500, 'Internal server error.').body())}\n\n"
        yield "data: [DONE]\n\n"


def _parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:  # the same 400/422 answers FastAPI's own validation gives
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _unavailable() -> APIError:
    return APIError(503, "The model is loading, or the service is shutting down or restarting; retry shortly.",
                    code="service_unavailable", headers={"Retry-After": "5"})


async def _chain(first: list[RequestOutput], rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    for item in first:
        yield item
    async for item in rest:
        yield item


async def _collect(outputs: AsyncIterator[RequestOutput]) -> Answer:
    """A whole answer from a request's outputs: text, reasoning, finish reason and usage."""
    content, reasoning, last = [], [], RequestOutput("")
    async for output in outputs:
        content.append(output.content)
        reasoning.append(output.reasoning_content)
        last = output
    return Answer("".join(content), "".join(reasoning) or None, last.finish_reason or "stop", last.prompt_tokens,
                  last.completion_tokens)


def _respond(model: str, answer: Answer) -> JSONResponse:
    message = AssistantMessage(content=answer.content, reasoning_content=answer.reasoning_content)
    body = ChatCompletionResponse(model=model, choices=[Choice(message=message, finish_reason=answer.finish_reason)],
                                  usage=_usage(answer.prompt_tokens, answer.completion_tokens))
    return JSONResponse(body.model_dump(exclude_none=True))


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
