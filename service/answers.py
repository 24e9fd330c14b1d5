"""A request's typed outputs -> the OpenAI shapes: one JSON answer, or server-sent events."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from engine.request import FinishReason, RequestOutput
from service.errors import APIError
from service.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Choice,
    DeltaMessage,
    StreamChoice,
    Usage,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """A whole answer, collected from a request's outputs (and what the caption cache keeps)."""

    content: str
    reasoning_content: str | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


async def collect(outputs: AsyncIterator[RequestOutput]) -> Answer:
    content, reasoning, last = [], [], RequestOutput("")
    async for output in outputs:
        content.append(output.content)
        reasoning.append(output.reasoning_content)
        last = output
    return Answer("".join(content), "".join(reasoning) or None, last.finish_reason or "stop", last.prompt_tokens,
                  last.completion_tokens)


def respond(model: str, answer: Answer) -> JSONResponse:
    message = AssistantMessage(content=answer.content, reasoning_content=answer.reasoning_content)
    body = ChatCompletionResponse(model=model, choices=[Choice(message=message, finish_reason=answer.finish_reason)],
                                  usage=usage(answer.prompt_tokens, answer.completion_tokens))
    return JSONResponse(body.model_dump(exclude_none=True))


async def sse(model: str, outputs: AsyncIterator[RequestOutput], include_usage: bool,
              quiet: tuple[type[BaseException], ...] = ()) -> AsyncIterator[str]:
    """Server-sent events of `outputs`, always ending with `data: [DONE]`; an error after the status
    line went out is reported in-band. `quiet` errors (the client left) just end the stream."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    event = _event_writer(chunk_id, created, model)
    yield event([StreamChoice(delta=DeltaMessage(role="assistant", content=""))])
    last = RequestOutput("")
    try:
        async for delta in outputs:
            last = delta
            text, thought = delta.content or None, delta.reasoning_content or None
            if text or thought:
                yield event([StreamChoice(delta=DeltaMessage(content=text, reasoning_content=thought))])
        yield event([StreamChoice(delta=DeltaMessage(), finish_reason=last.finish_reason or "stop")])
        if include_usage:
            yield event([], usage(last.prompt_tokens, last.completion_tokens))
    except quiet:
        return
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception:  # noqa: BLE001 - the status line is gone; report in-band and end cleanly
        logger.exception("stream failed")
        yield f"data: {json.dumps(APIError(500, 'Internal server error.').body())}\n\n"
    yield "data: [DONE]\n\n"


def _event_writer(chunk_id: str, created: int, model: str) -> Callable[..., str]:
    def event(choices: list[StreamChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    return event


def usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
