"""Continuous batching through the real HTTP surface (mock engine, same scheduler as the real model)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.conftest import stop_later
from tests.helpers import Service, data_url, nv_ingest_body, png_bytes

URL = data_url(png_bytes(64, 48, (30, 90, 200)))
STEP = 0.03  # seconds per mock decoding step


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    service = Service({"ENABLE_MOCK_INFERENCE": "1", "NIM_REQUIRE_AUTH": "0", "MAX_BATCH_SIZE": "2",
                       "MOCK_TOKEN_DELAY": str(STEP)}, tmp_path_factory.mktemp("logs") / "scheduling.log")
    yield service
    stop_later(service)


def scrape(service) -> dict[str, float]:
    values = {}
    for line in requests.get(f"{service.url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def in_engine(service) -> float:
    """Requests the engine holds, running or waiting for a slot (as of its last step)."""
    values = scrape(service)
    return values.get("caption_running_sequences", 0) + values.get("caption_waiting_requests", 0)


class Finishes:
    """Send requests in background threads and record the order in which they are answered."""

    def __init__(self, service):
        self.service = service
        self.order: list[str] = []
        self.responses: dict[str, requests.Response] = {}
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def send(self, name: str, **overrides) -> None:
        def post():
            try:
                response = requests.post(self.service.chat_url, json=nv_ingest_body(URL, **overrides), timeout=60)
            except requests.RequestException as exc:  # a read timeout, say: the test then fails saying so
                response = exc
            with self.lock:
                self.order.append(name)
                self.responses[name] = response

        before = in_engine(self.service)
        thread = threading.Thread(target=post)
        thread.start()
        self.threads.append(thread)
        # It reaches the engine (or is already answered) before the next one is sent.
        deadline = time.monotonic() + 30
        while thread.is_alive() and in_engine(self.service) <= before:
            assert time.monotonic() < deadline, f"{name} never reached the engine"
            time.sleep(0.02)

    def wait(self) -> list[str]:
        for thread in self.threads:
            thread.join(60)
        assert all(isinstance(r, requests.Response) and r.status_code == 200 for r in self.responses.values()), {
            k: getattr(r, "text", repr(r)) for k, r in self.responses.items()}
        return self.order


ENDLESS = 2000  # tokens: a minute at least, far past anything a test here waits for
ENDLESS_BODY = dict(max_tokens=ENDLESS, min_tokens=ENDLESS, ignore_eos=True, temperature=0.0)


def stream_started(service, **body):
    """A streamed request whose first line has arrived: it holds a slot and generates."""
    response = requests.post(service.chat_url, json=nv_ingest_body(URL, stream=True, **body), stream=True, timeout=60)
    assert response.status_code == 200, response.text
    lines = response.iter_lines()
    next(lines)
    return response, lines


def in_engine_becomes(service, count: int, what: str) -> None:
    """Wait (30 s at most) until the engine holds exactly `count` requests, as of its last step."""
    deadline = time.monotonic() + 30
    while in_engine(service) != count:
        assert time.monotonic() < deadline, f"{what}: the engine never held {count} requests"
        time.sleep(0.02)


def settled(service) -> None:
    """Wait (30 s at most) until the requests of earlier tests have left the engine. The gauges change only
    when the engine steps, so a one-token request makes it step until they show an empty engine."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = requests.post(service.chat_url, json=nv_ingest_body(URL, max_tokens=1, temperature=0.0), timeout=60)
        assert probe.status_code == 200, probe.text
        for _ in range(10):
            if in_engine(service) == 0:
                return
            time.sleep(0.05)
    raise AssertionError("the requests of earlier tests never left the engine")


def still_generating(lines) -> None:
    line = next(line for line in lines if line)
    assert line.startswith(b"data: {") and json.loads(line[6:])["choices"][0].get("finish_reason") is None, line


def test_a_short_request_finishes_before_the_long_one_it_joined(service):
    """A caption that outlasts the test holds one slot; a short request joins it and is answered while the long
    one still generates (one slot is free: it never waits for the long one)."""
    settled(service)
    long, lines = stream_started(service, **ENDLESS_BODY)
    try:
        in_engine_becomes(service, 1, "the long request")
        runs = Finishes(service)
        runs.send("short", max_tokens=4, temperature=0.0)
        assert runs.wait() == ["short"]
        assert runs.responses["short"].json()["usage"]["completion_tokens"] == 4
        still_generating(lines)
    finally:
        long.close()


def test_a_lower_priority_value_overtakes_queued_requests(service):
    """Both slots held, two requests wait (the urgent one sent last); when one slot frees, the urgent one
    takes it and finishes before the other starts."""
    settled(service)
    holders = [stream_started(service, **ENDLESS_BODY) for _ in range(2)]
    try:
        in_engine_becomes(service, 2, "the two long requests")
        runs = Finishes(service)
        runs.send("normal", max_tokens=3, temperature=0.0)
        runs.send("urgent", max_tokens=3, temperature=0.0, priority=-10)
        assert not runs.responses, "a request ran with both slots taken"
        holders[0][0].close()  # one slot frees: the urgent request takes it, the other keeps waiting
        assert runs.wait() == ["urgent", "normal"]
    finally:
        for response, _ in holders:
            response.close()


def test_a_client_that_leaves_frees_its_slot_for_the_next_request(service):
    """Both slots are held by captions that outlast the test, so the waiting request can only get the slot of
    the client that leaves: no timing decides the outcome, only the deadlines (generous) for a failure."""
    settled(service)
    stays, stays_lines = stream_started(service, **ENDLESS_BODY)
    gone, _ = stream_started(service, **ENDLESS_BODY)
    try:
        in_engine_becomes(service, 2, "the two long requests")  # the next request waits from here
        runs = Finishes(service)
        runs.send("waiting", max_tokens=3, temperature=0.0)  # returns once it is in the engine, waiting
        assert "waiting" not in runs.responses, "it ran with both slots taken"
        gone.close()  # the client leaves; its slot goes to "waiting" within a step or two
        runs.threads[0].join(90)
        answer = runs.responses.get("waiting")
        assert isinstance(answer, requests.Response), f"no answer after the client left: {answer!r}"
        assert runs.wait() == ["waiting"]
        assert runs.responses["waiting"].json()["usage"]["completion_tokens"] == 3
        # The slot was the leaver's: the other long caption is still generating.
        still_generating(stays_lines)
    finally:
        gone.close()
        stays.close()


def test_scheduler_metrics_are_exported(service):
    before = scrape(service)
    response = requests.post(service.chat_url, json=nv_ingest_body(URL, max_tokens=5, temperature=0.0), timeout=30)
    assert response.status_code == 200
    after = scrape(service)
    assert after["caption_step_seconds_count"] - before.get("caption_step_seconds_count", 0) >= 5
    assert after["caption_prefill_tokens_per_step_count"] - before.get("caption_prefill_tokens_per_step_count", 0) >= 1
    assert after["caption_prefill_tokens_per_step_sum"] - before.get("caption_prefill_tokens_per_step_sum", 0) == \
        response.json()["usage"]["prompt_tokens"]
    assert after["caption_batch_size_count"] > before.get("caption_batch_size_count", 0)
    assert "caption_running_sequences" in after and "caption_waiting_requests" in after
