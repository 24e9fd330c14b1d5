"""A second SIGTERM or Ctrl+C stops at once, against real server processes: requests in flight get a 503 in the
OpenAI shape (a stream a final error event), the log has no traceback, the exit code says requests were cut off
(128 + the signal), and while a process-group drain runs, new connections are refused rather than left waiting."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import requests

from tests.helpers import Service, data_url, nv_ingest_body, png_bytes, wait_in_flight

# Each mock word takes 1 s: a caption runs for about 16 s, far longer than these tests wait.
SLOW = {"ENABLE_MOCK_INFERENCE": "1", "NIM_REQUIRE_AUTH": "0", "MOCK_TOKEN_DELAY": "1",
        "SHUTDOWN_GRACE_PERIOD": "60"}
BODY = nv_ingest_body(data_url(png_bytes(40, 30)))


def _in_background(service: Service, bodies: list[dict]) -> tuple[list[threading.Thread], dict]:
    """Requests in threads; results[i] is the response, text in `text_read`; results["streaming"] is set once a
    stream's status line has come (its first delta is out: from then on an error can only come in-band)."""
    results: dict = {"streaming": threading.Event()}

    def send(i, body):
        try:
            response = requests.post(service.chat_url, json=body, timeout=60, stream=body.get("stream", False))
            if body.get("stream"):
                results["streaming"].set()
            response.text_read = response.text
            results[i] = response
        except requests.RequestException as exc:  # recorded: the test says what it expected
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    return threads, results


def _assert_cut_off_503(response) -> None:
    assert isinstance(response, requests.Response), response
    assert response.status_code == 503, response.text_read
    error = response.json()["error"]
    assert error["code"] == "service_unavailable" and set(error) == {"message", "type", "param", "code"}


def _signal_again(service: Service, threads, send) -> tuple[int, float, str]:
    """The second signal: the exit code, how long the exit took, and the log."""
    stopped_at = time.monotonic()
    send()
    code = service.proc.wait(15)
    elapsed = time.monotonic() - stopped_at
    for t in threads:
        t.join(10)
    return code, elapsed, service.log_path.read_text(errors="replace")


def _assert_quiet(log: str) -> None:
    for needle in ("Traceback", "CancelledError", "SIGKILL", "Forcibly killing"):
        assert needle not in log, log


def test_a_second_ctrl_c_to_the_group_cuts_requests_off_with_503_and_exits_130(tmp_path):
    service = Service(SLOW, tmp_path / "server.log")
    try:
        threads, results = _in_background(service, [BODY, {**BODY, "stream": True}])
        wait_in_flight(service, 2, timeout=20)
        assert results["streaming"].wait(10)
        os.killpg(service.proc.pid, signal.SIGINT)  # Ctrl+C in a terminal
        time.sleep(0.5)
        refused_at = time.monotonic()
        try:
            requests.get(f"{service.url}/v1/health/live", timeout=5)
            raise AssertionError("a new connection was taken during the drain")
        except requests.ConnectionError:
            assert time.monotonic() - refused_at < 1, "the connection waited instead of being refused"
        code, elapsed, log = _signal_again(service, threads, lambda: os.killpg(service.proc.pid, signal.SIGINT))
    finally:
        service.stop()
    assert code == 128 + signal.SIGINT and elapsed < 6, (code, elapsed, log)
    _assert_cut_off_503(results[0])
    stream = results[1]
    assert stream.status_code == 200, stream  # the status line had gone out: the error comes in-band
    events = [line[6:] for line in stream.text_read.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "service_unavailable", events
    _assert_quiet(log)


def test_a_second_sigterm_to_the_main_process_cuts_requests_off_and_exits_143(tmp_path):
    service = Service(SLOW, tmp_path / "server.log")
    try:
        threads, results = _in_background(service, [BODY])
        wait_in_flight(service, 1, timeout=20)
        service.proc.send_signal(signal.SIGTERM)  # Docker and Kubernetes signal the main process only
        time.sleep(0.5)
        assert requests.post(service.chat_url, json=BODY, timeout=5).status_code == 503  # draining
        code, elapsed, log = _signal_again(service, threads, lambda: service.proc.send_signal(signal.SIGTERM))
    finally:
        service.stop()
    assert code == 128 + signal.SIGTERM and elapsed < 6, (code, elapsed, log)
    _assert_cut_off_503(results[0])
    assert "SIGTERM again: stopping now, cutting off 1 requests in flight with 503" in log
    _assert_quiet(log)
