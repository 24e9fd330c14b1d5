"""The one place that touches LitServe's internals on the API-server side.

LitServe hands each spec a request queue to the inference workers, a response buffer that its
own task fills from the workers' replies, and the workers' setup statuses. `WorkerLink` wraps the
three, so the rest of the service speaks only of jobs in and typed events out.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus

from engine.request import RequestOutput
from service.jobs import QueuedJob


@dataclass(frozen=True)
class StreamEnded:
    """The worker closed the job's stream (after its last output, or when it dropped the job)."""


@dataclass(frozen=True)
class WorkerFailed:
    """The worker sent an error instead of outputs; `payload` is what it raised."""

    payload: object


Event = RequestOutput | StreamEnded | WorkerFailed


class Mailbox:
    """Where the outputs of one queued job arrive, in order."""

    def __init__(self):
        self._items: deque = deque()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Until something arrives or `timeout` seconds pass."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def take(self) -> Iterator[Event]:
        self._event.clear()
        while self._items:
            data, status = self._items.popleft()
            if status == LitAPIStatus.FINISH_STREAMING:
                yield StreamEnded()
            elif status == LitAPIStatus.ERROR:
                yield WorkerFailed(data)
            elif isinstance(data, RequestOutput):
                yield data


class WorkerLink:
    def __init__(self, spec):
        self._spec = spec  # LitServe sets its request_queue, response_buffer and _server at start
        self._all_ready = False

    def workers_ready(self) -> bool:
        if not self._all_ready:  # once every worker is up, stop asking LitServe's manager process
            server = self._spec._server
            statuses = dict(server.workers_setup_status) if server is not None else {}
            self._all_ready = bool(statuses) and all(s == WorkerSetupStatus.READY for s in statuses.values())
        return self._all_ready

    @contextmanager
    def submit(self, job: QueuedJob) -> Iterator[Mailbox]:
        """Queue `job` for the workers; its mailbox is open until the block ends."""
        uid, mailbox = uuid.uuid4(), Mailbox()
        buffer = self._spec.response_buffer
        buffer[uid] = ResponseBufferItem(response_queue=mailbox._items, event=mailbox._event)
        try:
            self._spec.request_queue.put((self._spec.response_queue_id, uid, time.monotonic(), job))
            yield mailbox
        finally:
            buffer.pop(uid, None)  # LitServe's own spec never frees these entries (upstream #452)
