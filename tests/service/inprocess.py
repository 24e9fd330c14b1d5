"""The whole service in the test process: our LitServer's app over an ASGI transport, and the
worker's `EngineLoop` stepping the mock engine on a thread, wired by in-memory queues the way
LitServe wires them between processes. No process starts, so a test costs milliseconds.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from contextlib import asynccontextmanager

import httpx
from litserve.utils import LitAPIStatus, LoopResponseType, WorkerSetupStatus

import server as server_module
from server import Settings, build_server
from service.state import SharedState


class _Transport:
    """LitServe's worker -> API-server transport, delivering into the spec's response buffer on its loop."""

    def __init__(self, spec, loop: asyncio.AbstractEventLoop):
        self.spec, self.loop = spec, loop

    def send(self, item, consumer_id: int) -> None:
        self.loop.call_soon_threadsafe(self._deliver, item)

    def _deliver(self, item) -> None:
        uid, (data, status, response_type, _worker) = item
        entry = self.spec.response_buffer.get(uid)
        if entry is None or status == LitAPIStatus.START:
            return
        assert response_type == LoopResponseType.STREAMING
        entry.response_queue.append((data, status))
        entry.event.set()


class InProcessService:
    def __init__(self, **settings):
        settings.setdefault("enable_mock_inference", True)
        self.settings = Settings(**settings)
        self.shared = SharedState(self.settings.max_queued_requests)
        self.server = build_server(self.settings, self.shared)
        self.api = self.server.litapi_connector.lit_apis[0]
        self.spec = self.api.spec
        self.server.workers_setup_status = {"inference_0": WorkerSetupStatus.READY}
        self._stop = threading.Event()

    @asynccontextmanager
    async def client(self, headers: dict | None = None):
        """An HTTP client on the app, with the worker thread running for as long as it is open."""
        # This is the test process, not a worker: its signals and logging stay as pytest set them.
        originals = server_module.ignore_stop_signals_in_worker, server_module.configure_logging
        server_module.ignore_stop_signals_in_worker = server_module.configure_logging = lambda *args: None
        try:
            self.api.setup("cpu")
        finally:
            server_module.ignore_stop_signals_in_worker, server_module.configure_logging = originals
        self.spec.response_buffer, self.spec.request_queue, self.spec.response_queue_id = {}, queue.Queue(), 0
        transport = _Transport(self.spec, asyncio.get_running_loop())
        worker = threading.Thread(target=self._work, args=(transport,), daemon=True)
        worker.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.server.app),
                                         base_url="http://service", headers=headers, timeout=30) as client:
                yield client
        finally:
            self._stop.set()
            worker.join(10)

    def _work(self, transport) -> None:
        loop = self.api.loop
        while not self._stop.is_set():
            try:
                loop.run(self.api, "cpu", 0, self.spec.request_queue, transport, {}, None)
            except SystemExit:
                return

    def run(self, scenario, headers: dict | None = None):
        """`await scenario(client)` against this service, with its worker running; what it returns."""
        async def main():
            async with self.client(headers) as client:
                return await scenario(client)

        return asyncio.run(main())

    async def started(self, client, body: dict, count: int = 1) -> list[asyncio.Future]:
        """`count` requests sent and admitted (they hold their places until they finish or are cancelled)."""
        futures = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body)) for _ in range(count)]
        await until(lambda: self.shared.in_flight == count)
        return futures


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
