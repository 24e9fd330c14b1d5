"""Caption cache for the API-server process: LRU of finished results plus single-flight.

Settings (environment): `CAPTION_CACHE_SIZE` entries, 0 = off (the default); `CAPTION_CACHE_SAMPLED=1`
also caches sampled requests (temperature > 0). Greedy requests are deterministic, so a cached answer
is the answer. A sampled answer is one draw of many: serving it again is only right when the operator
accepts that (nv-ingest always sends temperature 1.0, so without it the cache never hits for nv-ingest).

Key: SHA-256 over every message in order (role, text, and for each image its mode, size and decoded
pixels) plus the settings that change the output. Pixels rather than the base64 payload, so the same
image re-encoded (another PNG compressor, a data-URL line wrap) still hits. For greedy requests
`top_p` and `seed` are left out: greedy decoding never reads them (engine/sampler.py).

Single-flight: the first caller of a key starts `compute()` in its own task; identical requests that
arrive while it runs await that task instead of queueing a second generation. On failure every waiter
gets the same exception and nothing is stored (the next request tries afresh): retrying in each waiter
would run a failing generation once per waiter, one after another. Exceptions listed in
`leader_only_errors` (e.g. "my client disconnected") belong to the caller that started the work:
that caller gets them and the waiters start over, one of them becoming the new leader. A caller that
is cancelled stops waiting; the shared task is cancelled only when nobody waits for it any more.

Wiring (in the spec, per request):

    key = cache.key_for(job)                     # CPU work: call it where the image is decoded
    result = await cache.get_or_compute(key, lambda: generate(job))
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from engine.request import EngineRequest, ImagePart, TextPart

Result = TypeVar("Result")


def job_digest(job: EngineRequest, include_sampling: bool) -> str:
    """Hex SHA-256 of everything that determines a job's output."""
    h = hashlib.sha256()

    def field(tag: bytes, data: bytes) -> None:
        # Length-prefixed fields: ("ab", "c") and ("a", "bc") must not collide.
        h.update(tag + struct.pack("<Q", len(data)) + data)

    for message in job.messages:
        field(b"R", message.role.encode())
        for part in message.content:
            if isinstance(part, TextPart):
                field(b"T", part.text.encode("utf-8"))
            elif isinstance(part, ImagePart):
                field(b"I", part.image.digest.encode())
    if job.enable_thinking is not None:  # left out when unset, so older keys stay as they were
        field(b"K", str(job.enable_thinking).encode())
    p = job.params
    field(b"N", str(p.max_tokens).encode())
    field(b"S", "\x00".join(sorted(set(p.stop))).encode("utf-8"))  # matching ignores order and repeats
    field(b"E", f"{p.min_tokens}:{p.ignore_eos}".encode())
    if include_sampling:
        field(b"t", repr(p.temperature).encode())
        field(b"p", repr(p.top_p).encode())
        field(b"s", repr(p.seed).encode())
    else:
        field(b"t", b"greedy")
    return h.hexdigest()


class _Flight:
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task):
        self.task = task
        self.waiters = 0


class CaptionCache(Generic[Result]):
    """LRU cache + single-flight, for one asyncio event loop (not thread-safe: call from the loop only)."""

    def __init__(self, size: int = 0, cache_sampled: bool = False,
                 leader_only_errors: tuple[type[BaseException], ...] = ()):
        if size < 0:
            raise ValueError("CAPTION_CACHE_SIZE must be >= 0")
        self.size = size
        self.cache_sampled = cache_sampled
        self.leader_only_errors = leader_only_errors
        self._entries: OrderedDict[str, Result] = OrderedDict()
        self._flights: dict[str, _Flight] = {}

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def key_for(self, job: EngineRequest) -> str | None:
        """The job's cache key, or None when the policy says not to cache it (or the cache is off)."""
        if not self.enabled:
            return None
        greedy = job.params.greedy
        if not greedy and not self.cache_sampled:
            return None
        return job_digest(job, include_sampling=not greedy)

    def is_known(self, key: str | None) -> bool:
        """Whether a request with this key would be answered without a new generation."""
        return key is not None and (key in self._entries or key in self._flights)

    async def get_or_compute(self, key: str | None, compute: Callable[[], Awaitable[Result]]) -> Result:
        if key is None or not self.enabled:
            return await compute()
        while True:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = _Flight(asyncio.ensure_future(self._run(key, compute)))
                self._flights[key] = flight
            flight.waiters += 1
            try:
                # shield: one caller's cancellation must not cancel the work others wait for.
                return await asyncio.shield(flight.task)
            except asyncio.CancelledError:
                if flight.task.cancelled() and not _current_task_cancelling():
                    # The shared work was cancelled by someone else while we still wanted it: start over.
                    continue
                raise
            except self.leader_only_errors:
                if leader:
                    raise
                continue  # the leader's own trouble: try again, possibly as the new leader
            finally:
                flight.waiters -= 1
                if flight.waiters == 0 and not flight.task.done():
                    # Nobody wants the result any more: stop the generation (frees the worker).
                    flight.task.cancel()
                    self._flights.pop(key, None)

    async def _run(self, key: str, compute: Callable[[], Awaitable[Result]]) -> Result:
        try:
            result = await compute()
        finally:
            if self._flights.get(key) is not None and self._flights[key].task is asyncio.current_task():
                del self._flights[key]
        self._store(key, result)
        return result

    def _store(self, key: str, result: Result) -> None:
        self._entries[key] = result
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
