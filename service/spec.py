"""LitServe's OpenAI spec, completed for a caption service.

`litserve.specs.openai.OpenAISpec` gives us the route and the queue plumbing. Where it falls short
we override: requests are validated and their images decoded here, in the API-server process,
before they are queued (so one bad image cannot fail a whole batch); `seed`, `stop` and
`max_completion_tokens` reach the engine; `finish_reason` and `usage` are the engine's own; errors
use the OpenAI shape; and a stream always ends with `data: [DONE]`, even after an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from litserve.specs.openai import OpenAISpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from service.errors import APIError, from_worker
from service.jobs import JobLimits, build_job
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

logger = logging.getLogger(__name__)


class CaptionSpec(OpenAISpec):
    def __init__(self, served_model_name: str, model_root: str, max_model_len: int, limits: JobLimits):
        super().__init__()
        self.served_model_name = served_model_name
        self.model_root = model_root
        self.max_model_len = max_model_len
        self.limits = limits

    def pre_setup(self, lit_api) -> None:
        super().pre_setup(lit_api)
        # Added through the spec so that LitServe applies the API's `authorize` dependency to it.
        self.add_endpoint("/v1/models", self.list_models, ["GET"])

    def populate_context(self, context, request) -> None:
        pass  # the job carries everything the worker needs; no per-request context is used

    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.served_model_name, root=self.model_root,
                                         max_model_len=self.max_model_len)])

    async def chat_completion(self, request: ChatCompletionRequest, raw_request: Request):
        if request.model and request.model != self.served_model_name:
            raise APIError(404, f"The model '{request.model}' does not exist; this server serves "
                                f"'{self.served_model_name}'.", param="model", code="model_not_found")
        request_id = raw_request.headers.get("x-request-id") or uuid.uuid4().hex
        # Image decoding is CPU work: keep it off the event loop.
        job = await asyncio.to_thread(build_job, request, self.limits, request_id)
        deltas = self._submit(job)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            # Wait for the first delta so that an early failure still gets its own status code.
            first = await anext(deltas, None)
            return StreamingResponse(self._sse(first, deltas, include_usage), media_type="text/event-stream")
        return await self._collect(deltas)

    async def _submit(self, job) -> AsyncIterator[dict]:
        uid = uuid.uuid4()
        queue, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        try:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
            async for data, status in self.data_streamer(queue, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise from_worker(data)
                if data:
                    yield json.loads(data)
        finally:
            # LitServe's own spec never frees these entries (upstream #452).
            self.response_buffer.pop(uid, None)

    async def _collect(self, deltas: AsyncIterator[dict]) -> ChatCompletionResponse:
        content, reasoning, last = [], [], {}
        async for delta in deltas:
            content.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning_content") or "")
            last = delta
        message = AssistantMessage(content="".join(content), reasoning_content="".join(reasoning) or None)
        return ChatCompletionResponse(
            model=self.served_model_name,
            choices=[Choice(message=message, finish_reason=last.get("finish_reason") or "stop")],
            usage=_usage(last),
        )

    async def _sse(self, first: dict | None, deltas: AsyncIterator[dict], include_usage: bool):
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(choices: list[StreamChoice], usage: Usage | None = None) -> str:
            chunk = ChatCompletionChunk(id=chunk_id, created=created, model=self.served_model_name,
                                        choices=choices, usage=usage)
            return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

        yield event([StreamChoice(delta=DeltaMessage(role="assistant", content=""))])
        last = {}
        try:
            pending = [first] if first is not None else []
            async for delta in _chain(pending, deltas):
                last = delta
                text, thought = delta.get("content") or None, delta.get("reasoning_content") or None
                if text or thought:
                    yield event([StreamChoice(delta=DeltaMessage(content=text, reasoning_content=thought))])
            yield event([StreamChoice(delta=DeltaMessage(), finish_reason=last.get("finish_reason") or "stop")])
            if include_usage:
                yield event([], usage=_usage(last))
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception:  # noqa: BLE001 - the status line is gone; report in-band and end cleanly
            logger.exception("stream failed")
            yield f"data: {json.dumps(APIError(500, 'Internal server error.').body())}\n\n"
        yield "data: [DONE]\n\n"


async def _chain(first: list[dict], rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    for item in first:
        yield item
    async for item in rest:
        yield item


def _usage(delta: dict) -> Usage:
    prompt, completion = int(delta.get("prompt_tokens", 0)), int(delta.get("completion_tokens", 0))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
