"""Worker -> API server: one ZeroMQ message per engine step and API server, not one per token.

LitServe's default transport is a multiprocessing Manager queue: every output is a round trip
through the manager process, which capped the service far below what a GPU produces. Its ZeroMQ
transport (`fast_queue=True`) is not wired in 0.2.19 (the flag never reaches the transport
config), and it is PUB/SUB through a broker thread, which drops messages under load. This one
keeps LitServe's `MessageTransport` hooks (`send`, `areceive`) and adds `send_many`: each API
server binds one PULL socket; a worker keeps one PUSH socket per API server and sends a step's
items for that server as one pickled list. `areceive` hands the items out one at a time, as
LitServe's response task expects. PUSH/PULL never drops: it queues until the peer reads.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import tempfile
import uuid
from collections import deque
from typing import Any

import zmq
import zmq.asyncio
from litserve.transport.base import MessageTransport


class StepTransport(MessageTransport):
    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self._pid = None  # sockets belong to the process that made them: forked children make their own
        self._push: dict[int, zmq.Socket] = {}
        self._pull: zmq.asyncio.Socket | None = None
        self._received: deque = deque()

    @classmethod
    def create(cls, consumers: int) -> StepTransport:
        base = os.path.join(tempfile.gettempdir(), f"caption-{uuid.uuid4().hex[:12]}")
        return cls([f"ipc://{base}-{i}" for i in range(consumers)])

    def __reduce__(self):
        return StepTransport, (self.addresses,)

    def _own(self) -> None:
        if self._pid != os.getpid():
            self._pid, self._push, self._pull, self._received = os.getpid(), {}, None, deque()

    # ---- worker side ------------------------------------------------------------------------------

    def _socket(self, consumer_id: int) -> zmq.Socket:
        self._own()
        sock = self._push.get(consumer_id)
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.PUSH)
            # No high-water mark: the engine never blocks on a slow API server (it is bounded by the
            # requests in flight, each of which ends).
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.addresses[consumer_id])
            self._push[consumer_id] = sock
        return sock

    def send(self, item: Any, consumer_id: int) -> None:
        self.send_many([item], consumer_id)

    def send_many(self, items: list, consumer_id: int) -> None:
        # Copied into ZeroMQ: a zero-copy send would have pyzmq's garbage thread take the GIL for every message.
        self._socket(consumer_id).send(pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL))

    # ---- API-server side ----------------------------------------------------------------------------

    async def areceive(self, consumer_id: int | None = None, timeout: float | None = None, block: bool = True):
        self._own()
        if not self._received:
            if self._pull is None:
                self._pull = zmq.asyncio.Context.instance().socket(zmq.PULL)
                self._pull.setsockopt(zmq.RCVHWM, 0)
                self._pull.setsockopt(zmq.LINGER, 0)
                self._pull.bind(self.addresses[consumer_id or 0])
            try:
                raw = await (asyncio.wait_for(self._pull.recv(copy=False), timeout) if timeout is not None
                             else self._pull.recv(copy=False))
            except asyncio.TimeoutError:
                return None
            self._received.extend(pickle.loads(raw.buffer))
        return self._received.popleft()

    def close(self, **kwargs) -> None:
        """LitServe calls this in the main process at shutdown: the socket files go."""
        if self._pid == os.getpid():
            for sock in self._push.values():
                sock.close(linger=0)
            if self._pull is not None:
                self._pull.close(linger=0)
            self._push, self._pull = {}, None
        for address in self.addresses:
            try:
                os.unlink(address.removeprefix("ipc://"))
            except OSError:
                pass
