"""MAX_REQUEST_BYTES: bodies over the limit get a 413 in the OpenAI error shape, and a chunked body
is not read past the limit."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.body_limit import BodyLimitMiddleware
from tests.helpers import free_port

LIMIT = 1000


def _echo_app(calls: list):
    async def echo(request: Request):
        calls.append(request.url.path)
        body = await request.body()
        return JSONResponse({"received": len(body)})

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


class Item(BaseModel):
    text: str


def _fastapi_app():
    """A pydantic-bodied route, like the chat route: FastAPI turns body-read errors into a 400."""
    app = FastAPI()

    @app.post("/item")
    async def item(body: Item):
        return {"length": len(body.text)}

    return app


def _assert_413(status: int, body: dict) -> None:
    assert status == 413
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert str(LIMIT) in error["message"] and "MAX_REQUEST_BYTES" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "request_too_large"


@pytest.fixture()
def calls():
    return []


@pytest.fixture()
def client(calls):
    with TestClient(BodyLimitMiddleware(_echo_app(calls), max_bytes=LIMIT)) as c:  # lifespan passes through
        yield c


def test_body_at_the_limit_passes(client, calls):
    response = client.post("/echo", content=b"x" * LIMIT)
    assert response.status_code == 200 and response.json() == {"received": LIMIT}
    assert calls == ["/echo"]


def test_declared_length_over_the_limit_is_refused_before_the_app_runs(client, calls):
    response = client.post("/echo", content=b"x" * (LIMIT + 1))
    _assert_413(response.status_code, response.json())
    assert response.headers["connection"] == "close"
    assert calls == []


def test_get_without_body_passes(client):
    assert client.get("/echo").status_code == 405  # the app answered, not the middleware


def test_rejects_nonpositive_limit():
    with pytest.raises(ValueError):
        BodyLimitMiddleware(_echo_app([]), max_bytes=0)


# Chunked bodies, driven through raw ASGI so that every receive() is counted ------------------------
def _run_chunked(app, path: str, chunk: bytes, n_chunks: int, max_bytes: int = LIMIT):
    """POST `n_chunks` chunks with no Content-Length; returns (status, json body, chunks read)."""
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled < n_chunks:
            pulled += 1
            return {"type": "http.request", "body": chunk, "more_body": pulled < n_chunks}
        await asyncio.sleep(3600)  # a client that would go on forever: must never be asked

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"transfer-encoding", b"chunked"),
                         (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(asyncio.wait_for(BodyLimitMiddleware(app, max_bytes=max_bytes)(scope, receive, send), 10))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0]["status"], json.loads(body), pulled


def test_chunked_body_stops_being_read_at_the_limit(calls):
    status, body, pulled = _run_chunked(_echo_app(calls), "/echo", b"x" * 300, n_chunks=1000)
    _assert_413(status, body)
    assert pulled == 4  # 1,200 bytes: the first chunk over 1,000; the other 996 are never read


def test_chunked_body_under_the_limit_passes(calls):
    status, body, pulled = _run_chunked(_echo_app(calls), "/echo", b"x" * 100, n_chunks=10)
    assert (status, body, pulled) == (200, {"received": 1000}, 10)


def test_chunked_body_over_the_limit_is_413_even_where_fastapi_would_say_400():
    chunk = b'{"text": "' + b"a" * 400
    status, body, pulled = _run_chunked(_fastapi_app(), "/item", chunk, n_chunks=50)
    _assert_413(status, body)
    assert pulled == 3


def test_chunked_json_under_the_limit_reaches_fastapi():
    status, body, _ = _run_chunked(_fastapi_app(), "/item", b'{"text": "abc"}', n_chunks=1)
    assert (status, body) == (200, {"length": 3})


# Through a real HTTP server on loopback --------------------------------------------------------------
@pytest.fixture()
def live_server():
    port = free_port()
    app = BodyLimitMiddleware(_fastapi_app(), max_bytes=LIMIT)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(10)


def _post_chunked(port: int, chunks: list[bytes]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/item")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        # One write: a server that answers 413 and closes while later chunks are still arriving
        # makes the kernel reset the connection, and the client would never read the 413.
        conn.send(b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_live_chunked_request_over_the_limit(live_server):
    status, body = _post_chunked(live_server, [b'{"text": "'] + [b"a" * 200] * 10 + [b'"}'])
    _assert_413(status, body)


def test_live_chunked_request_under_the_limit(live_server):
    status, body = _post_chunked(live_server, [b'{"text": "', b"a" * 500, b'"}'])
    assert (status, body) == (200, {"length": 500})


@pytest.mark.parametrize("chunks, status", [(10, 200), (11, 413)])
def test_a_chunked_body_of_exactly_the_limit_passes_and_one_chunk_more_does_not(calls, chunks, status):
    # 10 chunks of 100 bytes: exactly LIMIT (1,000); 11 chunks: over it.
    got, body, _ = _run_chunked(_echo_app(calls), "/echo", b"x" * 100, n_chunks=chunks)
    assert got == status
    if status == 200:
        assert body == {"received": LIMIT}


def test_a_chunked_body_one_byte_over_the_limit_is_refused(calls):
    got, _, _ = _run_chunked(_echo_app(calls), "/echo", b"x" * 1001, n_chunks=1)
    assert got == 413
    got, body, _ = _run_chunked(_echo_app(calls), "/echo", b"x" * 1000, n_chunks=1)
    assert got == 200 and body == {"received": LIMIT}
