"""Connection hygiene for the API servers: a deadline for reading each request, and a connection cap.

uvicorn closes connections that sit idle after a response (keep-alive timeout), but not one that
sends half a header or half a body and then nothing: enough of those exhaust the process's file
descriptors, and probes and good requests get empty replies (slow-loris). Here every request must
arrive whole within REQUEST_READ_TIMEOUT of the connection opening (or of the previous response);
generating the answer is not counted. MAX_CONNECTIONS caps open connections per API server: above
it uvicorn answers 503 (retried by nv-ingest).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def read_deadline_protocol(read_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's own HTTP protocol (httptools, else h11) with a per-request read deadline."""

    class ReadDeadlineProtocol(AutoHTTPProtocol):
        _read_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._read_deadline = self.loop.call_later(read_timeout, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_timed_out(self) -> None:
            self._read_deadline = None
            cycle = self.cycle
            reading = cycle is None or cycle.response_complete or cycle.more_body
            if reading and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.more_body:
                self._disarm()  # the request is in whole: from here on the answer takes what it takes

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets its own deadline

    return ReadDeadlineProtocol


def uvicorn_options(read_timeout: float, max_connections: int) -> dict:
    return {"http": read_deadline_protocol(read_timeout), "limit_concurrency": max_connections}
