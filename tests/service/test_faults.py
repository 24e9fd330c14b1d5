"""Timeouts, overload, a killed worker and SIGTERM, against real server processes.

Tests with the same settings share a server (`@pytest.mark.server`, tests/conftest.py), and the module's
servers start together. A test that kills or stops its server has one of its own (`own=True`): it comes after
the tests that share a server of its settings and takes that one over, so that each server starts once.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from service.lifecycle import WORKER_DIED_EXIT_CODE
from tests.helpers import data_url, nv_ingest_body, png_bytes, wait_in_flight

BODY = nv_ingest_body(data_url(png_bytes()))
CAPTION_WORDS = 15  # the mock caption of this image: one word per MOCK_TOKEN_DELAY


def long_body(tokens: int) -> dict:
    """BODY made to generate exactly `tokens` tokens (a long request without a slower server)."""
    return {**BODY, "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}


def settings(**env) -> dict:
    base = {"ENABLE_MOCK_INFERENCE": "1", "NIM_REQUIRE_AUTH": "0", "MOCK_TOKEN_DELAY": "0.1", "MAX_BATCH_SIZE": "4"}
    return {**base, **{k: str(v) for k, v in env.items()}}


# One request at a time, slow tokens and a short deadline: timeouts.
DEADLINE = settings(REQUEST_TIMEOUT=1.5, MAX_BATCH_SIZE=1, MOCK_TOKEN_DELAY=0.5)
# One place and one slot, a token every 0.2 s: whatever a request leaves behind shows in the next one.
ONE_PLACE = settings(MAX_QUEUED_REQUESTS=1, MAX_BATCH_SIZE=1, MOCK_TOKEN_DELAY=0.2)
# Three places: admission and overload.
THREE_PLACES = settings(MAX_QUEUED_REQUESTS=3)
# A drain that has the time to finish.
DRAIN = settings(SHUTDOWN_GRACE_PERIOD=30)


def in_background(service, n: int, body: dict = BODY) -> tuple[list[threading.Thread], list[requests.Response]]:
    """Start `n` caption requests in threads; the list fills as they are answered."""
    results: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: results.append(requests.post(service.chat_url, json=body, timeout=60)))
               for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


@pytest.mark.server(DEADLINE)
def test_timeout_gets_504_and_the_work_is_dropped(server):
    start = time.monotonic()
    long = requests.post(server.chat_url, json=BODY, timeout=30)  # 7.5 s of generation
    assert long.status_code == 504 and long.json()["error"]["code"] == "timeout"
    assert time.monotonic() - start < 3
    # The worker dropped the long job: a 2-token request right after takes ~1 s, not ~6.
    start = time.monotonic()
    short = requests.post(server.chat_url, json={**BODY, "max_tokens": 2}, timeout=30)
    assert short.status_code == 200 and time.monotonic() - start < 2.5


@pytest.mark.server(DEADLINE)
def test_request_waiting_behind_a_long_one_gets_504_and_is_skipped(server):
    threads, results = in_background(server, 2)  # each needs 7.5 s; the second waits in the queue
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [504, 504]
    start = time.monotonic()  # neither is still occupying the worker
    assert requests.post(server.chat_url, json={**BODY, "max_tokens": 2}, timeout=10).status_code == 200
    assert time.monotonic() - start < 2.5


@pytest.mark.server(THREE_PLACES)
def test_burst_over_the_queue_limit_gets_only_200_and_429(server):
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: requests.post(server.chat_url, json={**BODY, "max_tokens": 10},
                                                          timeout=60), range(48)))
    statuses = {r.status_code for r in responses}
    assert statuses == {200, 429}
    assert all(r.headers["retry-after"] for r in responses if r.status_code == 429)
    assert all(r.json()["error"]["code"] == "queue_full" for r in responses if r.status_code == 429)


@pytest.mark.server(THREE_PLACES)
def test_exactly_the_limit_is_admitted_and_the_next_request_gets_429(server):
    threads, results = in_background(server, 3)
    wait_in_flight(server, 3)
    over = requests.post(server.chat_url, json=BODY, timeout=10)
    assert over.status_code == 429 and over.json()["error"]["code"] == "queue_full"
    gauge = [line for line in requests.get(f"{server.url}/metrics", timeout=5).text.splitlines()
             if line.startswith("caption_requests_in_flight ")]
    assert gauge == ["caption_requests_in_flight 3.0"]
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert requests.post(server.chat_url, json={**BODY, "max_tokens": 2}, timeout=10).status_code == 200


@pytest.mark.server(ONE_PLACE)
def test_client_disconnect_frees_its_place(server):
    try:  # gives up after 1 s of an 8-second generation
        requests.post(server.chat_url, json=long_body(40), timeout=1)
    except requests.Timeout:
        pass
    time.sleep(1.0)  # the server notices within its poll interval and frees the slot and the worker
    start = time.monotonic()
    response = requests.post(server.chat_url, json={**BODY, "max_tokens": 2}, timeout=10)
    assert response.status_code == 200 and time.monotonic() - start < 2.5


@pytest.mark.server(ONE_PLACE)
@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_during_generation_stops_it(server, stream):
    # Tokens flow the whole time (one every 0.2 s): noticing must not wait for a quiet moment.
    try:
        with requests.post(server.chat_url, json={**BODY, "stream": stream}, stream=True, timeout=1) as r:
            next(r.iter_lines())  # generation has started; now hang up
    except requests.Timeout:
        pass
    time.sleep(1.0)
    start = time.monotonic()
    response = requests.post(server.chat_url, json={**BODY, "max_tokens": 2}, timeout=10)
    assert response.status_code == 200 and time.monotonic() - start < 1.5


# ---- Each test below ends its server ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.server(THREE_PLACES, own=True)
def test_killed_worker_fails_in_flight_with_503_and_exits_non_zero(server):
    threads, results = in_background(server, 3, long_body(80))  # 8 s each
    wait_in_flight(server, 3)
    workers = server.pids()["worker"]
    assert len(workers) == 1
    start = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)
    time.sleep(1.0)  # inside the 2 s the service keeps answering before it exits
    assert requests.get(f"{server.url}/v1/health/ready", timeout=5).status_code == 503
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [503, 503, 503]
    assert time.monotonic() - start < 5
    assert results[0].json()["error"]["code"] == "worker_unavailable"
    assert server.proc.wait(60) == WORKER_DIED_EXIT_CODE
    server.stop()


@pytest.mark.slow
@pytest.mark.server(DEADLINE, own=True)
def test_a_killed_api_server_takes_the_service_down_for_its_supervisor(server):
    """An out-of-memory kill of the uvicorn process must not leave a service that holds the port and
    answers nothing: the main process exits non-zero, so Docker, Kubernetes or systemd restart it."""
    started = re.findall(r"Started server process \[(\d+)\]", server.log_path.read_text(errors="replace"))
    assert len(started) == 1, server.log()
    os.kill(int(started[0]), signal.SIGKILL)
    assert server.proc.wait(30) == WORKER_DIED_EXIT_CODE
    assert "API server" in server.log() and "died" in server.log()
    server.stop()


@pytest.mark.server(ONE_PLACE, own=True)
def test_an_idle_service_stops_quickly_and_quietly_on_sigterm(server):
    assert requests.post(server.chat_url, json={**BODY, "max_tokens": 2}, timeout=10).status_code == 200
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 3.0
    assert "Killing (SIGKILL)" not in server.log_path.read_text(errors="replace")
    server.stop()


@pytest.mark.slow
@pytest.mark.server(DRAIN, own=True)
@pytest.mark.parametrize("to_group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_finishes_in_flight_work_then_exits_0(server, to_group):
    # Docker and Kubernetes signal the main process; systemd and `kill -TERM -PGID` the whole group.
    threads, results = in_background(server, 3)
    wait_in_flight(server, 3)
    if to_group:
        os.killpg(server.proc.pid, signal.SIGTERM)
    else:
        server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    if not to_group:  # signalled too, the API servers stop taking connections instead of answering 503
        refused = requests.post(server.chat_url, json=BODY, timeout=10)
        assert refused.status_code == 503
        assert requests.get(f"{server.url}/v1/health/ready", timeout=10).status_code == 503
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == CAPTION_WORDS + 1 for r in results)  # + the end token
    assert server.proc.wait(60) == 0
    server.stop()
