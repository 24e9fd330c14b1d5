"""Slow-loris protection and the connection cap (service/connections.py), against a real server."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from tests.conftest import stop_later
from tests.helpers import Service, data_url, nv_ingest_body, png_bytes


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    service = Service({"ENABLE_MOCK_INFERENCE": "1", "NIM_REQUIRE_AUTH": "0", "REQUEST_READ_TIMEOUT": "1",
                       "MAX_CONNECTIONS": "8", "MOCK_TOKEN_DELAY": "0.1"},
                      tmp_path_factory.mktemp("logs") / "connections.log")
    yield service
    stop_later(service)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("partial", [b"", HEAD, HEAD + b"Content-Length: 1000\r\n\r\n{\"a"])
def test_a_connection_that_does_not_send_its_request_in_time_is_closed(service, partial):
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(partial)
        assert closed_by_server(sock, within=4.0)


def test_a_long_generation_is_not_cut_by_the_read_deadline(service):
    # 24 tokens: 23 decoding steps of 0.1 s, at least 2.3 s, more than twice the 1 s deadline.
    body = nv_ingest_body(data_url(png_bytes()), max_tokens=24, min_tokens=24, ignore_eos=True)
    started = time.monotonic()
    response = requests.post(service.chat_url, json=body, timeout=30)
    assert response.status_code == 200 and time.monotonic() - started > 2.0
    assert response.json()["usage"]["completion_tokens"] == 24


def test_keep_alive_connections_get_a_new_deadline_per_request(service):
    with requests.Session() as session:
        assert session.get(f"{service.url}/v1/health/live", timeout=5).status_code == 200
        for _ in range(2):
            time.sleep(0.6)  # under the deadline each time, over it in total
            assert session.get(f"{service.url}/v1/health/live", timeout=5).status_code == 200


def test_connections_over_the_cap_get_503(service):
    idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(8)]
    try:
        time.sleep(0.2)
        assert requests.get(f"{service.url}/v1/health/live", timeout=5).status_code == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert requests.get(f"{service.url}/v1/health/live", timeout=5).status_code == 200
