"""Continuous batching through the real HTTP surface (mock engine, same scheduler as the real model)."""

from __future__ import annotations

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
            response = requests.post(self.service.chat_url, json=nv_ingest_body(URL, **overrides), timeout=60)
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
        assert all(r.status_code == 200 for r in self.responses.values()), {
            k: r.text for k, r in self.responses.items()}
        return self.order


LONG = 50  # tokens: 1.5 s, far longer than sending the requests that must overtake it


def long(**kw) -> dict:
    return dict(max_tokens=LONG, min_tokens=LONG, ignore_eos=True, temperature=0.0, **kw)


def test_a_short_request_finishes_before_the_long_ones_it_joined(service):
    runs = Finishes(service)
    runs.send("long", **long())
    runs.send("short", max_tokens=4, temperature=0.0)
    assert runs.wait() == ["short", "long"]
    assert runs.responses["short"].json()["usage"]["completion_tokens"] == 4
    assert runs.responses["long"].json()["usage"]["completion_tokens"] == LONG


def test_a_lower_priority_value_overtakes_queued_requests(service):
    runs = Finishes(service)
    runs.send("long1", **long())
    runs.send("long2", **long())
    runs.send("normal", max_tokens=3, temperature=0.0)
    runs.send("urgent", max_tokens=3, temperature=0.0, priority=-10)
    order = runs.wait()
    assert order.index("urgent") < order.index("normal")


def test_a_client_that_leaves_frees_its_slot_for_the_next_request(service):
    runs = Finishes(service)
    runs.send("stays", **long())
    gone = requests.post(service.chat_url, json=nv_ingest_body(URL, stream=True, **long()), stream=True, timeout=60)
    next(gone.iter_lines())  # it is generating
    deadline = time.monotonic() + 30
    while in_engine(service) < 2:  # and the engine's gauges say so: the next request's wait counts from here
        assert time.monotonic() < deadline
        time.sleep(0.02)
    runs.send("waiting", max_tokens=3, temperature=0.0)
    gone.close()  # the client leaves; its slot goes to "waiting" within a step or two
    assert runs.wait() == ["waiting", "stays"]


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
