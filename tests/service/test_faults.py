"""Timeouts, overload, a killed worker and SIGTERM, against real server processes."""

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
from tests.helpers import Service, data_url, nv_ingest_body, png_bytes

BODY = nv_ingest_body(data_url(png_bytes()))
CAPTION_WORDS = 15  # the mock caption of this image: one word per MOCK_TOKEN_DELAY


def slow_service(tmp_path, name, **env):
    settings = {"ENABLE_MOCK_INFERENCE": "1", "NIM_REQUIRE_AUTH": "0", "MOCK_TOKEN_DELAY": "0.1",
                "MAX_BATCH_SIZE": "4"}
    settings.update({k: str(v) for k, v in env.items()})
    return Service(settings, tmp_path / f"{name}.log")


def wait_in_flight(service, n: int, timeout: float = 10.0) -> None:
    """Wait until `n` requests are admitted (from /metrics), so that a signal finds them in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in requests.get(f"{service.url}/metrics", timeout=5).text.splitlines():
            if line.startswith("caption_requests_in_flight ") and float(line.split()[1]) >= n:
                return
        time.sleep(0.05)
    raise AssertionError(f"{n} requests never got in flight")


def in_background(service, n: int) -> tuple[list[threading.Thread], list[requests.Response]]:
    """Start `n` caption requests in threads; the list fills as they are answered."""
    results: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: results.append(requests.post(service.chat_url, json=BODY, timeout=60)))
               for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_timeout_gets_504_and_the_work_is_dropped(tmp_path):
    service = slow_service(tmp_path, "timeout", REQUEST_TIMEOUT=1.5, MAX_BATCH_SIZE=1, MOCK_TOKEN_DELAY=0.5)
    try:
        start = time.monotonic()
        long = requests.post(service.chat_url, json=BODY, timeout=30)  # 7.5 s of generation
        assert long.status_code == 504 and long.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 3
        # The worker dropped the long job: a 2-token request right after takes ~1 s, not ~6.
        start = time.monotonic()
        short = requests.post(service.chat_url, json={**BODY, "max_tokens": 2}, timeout=30)
        assert short.status_code == 200 and time.monotonic() - start < 2.5
    finally:
        service.stop()


def test_burst_over_the_queue_limit_gets_only_200_and_429(tmp_path):
    service = slow_service(tmp_path, "queue", MAX_QUEUED_REQUESTS=4, MOCK_TOKEN_DELAY=0.05)
    try:
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda _: requests.post(service.chat_url, json={**BODY, "max_tokens": 10},
                                                              timeout=60), range(48)))
        statuses = {r.status_code for r in responses}
        assert statuses == {200, 429}
        assert all(r.headers["retry-after"] for r in responses if r.status_code == 429)
        assert all(r.json()["error"]["code"] == "queue_full" for r in responses if r.status_code == 429)
    finally:
        service.stop()


def test_exactly_the_limit_is_admitted_and_the_next_request_gets_429(tmp_path):
    service = slow_service(tmp_path, "admission", MAX_QUEUED_REQUESTS=3)
    try:
        threads, results = in_background(service, 3)
        wait_in_flight(service, 3)
        over = requests.post(service.chat_url, json=BODY, timeout=10)
        assert over.status_code == 429 and over.json()["error"]["code"] == "queue_full"
        gauge = [line for line in requests.get(f"{service.url}/metrics", timeout=5).text.splitlines()
                 if line.startswith("caption_requests_in_flight ")]
        assert gauge == ["caption_requests_in_flight 3.0"]
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert requests.post(service.chat_url, json={**BODY, "max_tokens": 2}, timeout=10).status_code == 200
    finally:
        service.stop()


def test_client_disconnect_frees_its_place(tmp_path):
    service = slow_service(tmp_path, "disconnect", MAX_QUEUED_REQUESTS=1, MAX_BATCH_SIZE=1, MOCK_TOKEN_DELAY=0.5)
    try:
        try:  # gives up after 1 s of a 7.5-second generation
            requests.post(service.chat_url, json=BODY, timeout=1)
        except requests.Timeout:
            pass
        time.sleep(1.0)  # the server notices within its poll interval and frees the slot and the worker
        start = time.monotonic()
        response = requests.post(service.chat_url, json={**BODY, "max_tokens": 2}, timeout=10)
        assert response.status_code == 200 and time.monotonic() - start < 2.5
    finally:
        service.stop()


def test_killed_worker_fails_in_flight_with_503_and_exits_non_zero(tmp_path):
    service = slow_service(tmp_path, "kill", MOCK_TOKEN_DELAY=0.5)
    threads, results = in_background(service, 3)
    wait_in_flight(service, 3)
    workers = service.pids()["worker"]
    assert len(workers) == 1
    start = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)
    time.sleep(1.0)  # inside the 2 s the service keeps answering before it exits
    assert requests.get(f"{service.url}/v1/health/ready", timeout=5).status_code == 503
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [503, 503, 503]
    assert time.monotonic() - start < 5
    assert results[0].json()["error"]["code"] == "worker_unavailable"
    assert service.proc.wait(60) == WORKER_DIED_EXIT_CODE
    service.stop()


def test_a_killed_api_server_takes_the_service_down_for_its_supervisor(tmp_path):
    """An out-of-memory kill of the uvicorn process must not leave a service that holds the port and
    answers nothing: the main process exits non-zero, so Docker, Kubernetes or systemd restart it."""
    service = slow_service(tmp_path, "kill-api")
    started = re.findall(r"Started server process \[(\d+)\]", service.log())
    assert len(started) == 1, service.log()
    os.kill(int(started[0]), signal.SIGKILL)
    assert service.proc.wait(30) == WORKER_DIED_EXIT_CODE
    assert "API server" in service.log() and "died" in service.log()
    service.stop()


def test_an_idle_service_stops_quickly_and_quietly_on_sigterm(tmp_path):
    service = slow_service(tmp_path, "idle-stop")
    assert requests.post(service.chat_url, json={**BODY, "max_tokens": 2}, timeout=10).status_code == 200
    started = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(30) == 0
    assert time.monotonic() - started < 3.0
    assert "Killing (SIGKILL)" not in service.log()
    service.stop()


@pytest.mark.parametrize("to_group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_finishes_in_flight_work_then_exits_0(tmp_path, to_group):
    # Docker and Kubernetes signal the main process; systemd and `kill -TERM -PGID` the whole group.
    service = slow_service(tmp_path, f"sigterm-{to_group}", SHUTDOWN_GRACE_PERIOD=30)
    threads, results = in_background(service, 3)
    wait_in_flight(service, 3)
    if to_group:
        os.killpg(service.proc.pid, signal.SIGTERM)
    else:
        service.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    if not to_group:  # signalled too, the API servers stop taking connections instead of answering 503
        refused = requests.post(service.chat_url, json=BODY, timeout=10)
        assert refused.status_code == 503
        assert requests.get(f"{service.url}/v1/health/ready", timeout=10).status_code == 503
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == CAPTION_WORDS + 1 for r in results)  # + the end token
    assert service.proc.wait(60) == 0
    service.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_during_generation_stops_it(tmp_path, stream):
    # Tokens flow the whole time (one every 0.2 s): noticing must not wait for a quiet moment.
    service = slow_service(tmp_path, f"disconnect-{stream}", MAX_QUEUED_REQUESTS=1, MAX_BATCH_SIZE=1,
                           MOCK_TOKEN_DELAY=0.2)
    try:
        try:
            with requests.post(service.chat_url, json={**BODY, "stream": stream}, stream=True, timeout=1) as r:
                next(r.iter_lines())  # generation has started; now hang up
        except requests.Timeout:
            pass
        time.sleep(1.0)
        start = time.monotonic()
        response = requests.post(service.chat_url, json={**BODY, "max_tokens": 2}, timeout=10)
        assert response.status_code == 200 and time.monotonic() - start < 1.5
    finally:
        service.stop()


def test_request_waiting_behind_a_long_one_gets_504_and_is_skipped(tmp_path):
    service = slow_service(tmp_path, "queued-timeout", REQUEST_TIMEOUT=1.5, MAX_BATCH_SIZE=1, MOCK_TOKEN_DELAY=0.5)
    try:
        threads, results = in_background(service, 2)  # each needs 7.5 s; the second waits in the queue
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [504, 504]
        start = time.monotonic()  # neither is still occupying the worker
        assert requests.post(service.chat_url, json={**BODY, "max_tokens": 2}, timeout=10).status_code == 200
        assert time.monotonic() - start < 2.5
    finally:
        service.stop()
