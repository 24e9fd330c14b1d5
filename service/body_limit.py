"""Request body size limit (MAX_REQUEST_BYTES), as one pure ASGI middleware.

LitServe's own `max_payload_size` answers `{"detail": ...}` and is off by default, so without this
a client can make the API server hold an arbitrarily large body in memory. A declared
Content-Length over the limit is refused before a byte of the body is read; a chunked body is
counted as it arrives and reading stops at the first chunk that crosses the limit, so at most
`max_bytes` plus one chunk of body is ever held.
"""

from __future__ import annotations

import json

from service.errors import APIError


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._reject(send)

        received = 0
        tripped = False
        started = False  # whether the app began its answer before the limit tripped
        replied = False  # whether our 413 has gone out

        async def counting_receive():
            nonlocal received, tripped
            if tripped:  # never read past the limit, even if the app asks again
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    tripped = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal replied, started
            if not tripped or started:
                started = started or message["type"] == "http.response.start"
                return await send(message)
            # The app may turn our exception into its own answer (FastAPI makes it a 400 "error
            # parsing the body"): whatever it sends is replaced by the 413.
            if message["type"] == "http.response.start" and not replied:
                replied = True
                await self._reject(send)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not tripped or started:
                raise  # too late for a 413: the server drops the connection
        if tripped and not started and not replied:
            await self._reject(send)

    async def _reject(self, send) -> None:
        error = APIError(413, f"Request body is larger than this server's limit of {self.max_bytes} bytes "
                              "(MAX_REQUEST_BYTES).", code="request_too_large")
        body = json.dumps(error.body()).encode()
        # Connection: close, because the unread rest of the body makes the connection unusable.
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects a malformed length itself
    return None
