"""service/engine_loop.py with LitServe's queues replaced by plain ones: routing, aborts, failures."""

from __future__ import annotations

import math
import queue
import time

from litserve.utils import LitAPIStatus

from engine.request import EngineRequest, Message, RequestOutput, SamplingParams, TextPart
from model.mock import mock_engine
from service.engine_loop import EngineLoop
from service.jobs import QueuedJob


class Transport:
    def __init__(self):
        self.sent: list[tuple[int, object, object, LitAPIStatus]] = []

    def send(self, item, consumer_id):
        uid, (data, status, _, _) = item
        self.sent.append((consumer_id, uid, data, status))


class API:
    def __init__(self, fail_steps: int = 0):
        self.engine = mock_engine(4, 4096, 2048)
        self.cancelled: set[int] = set()
        self.fail_steps = fail_steps

    def cancelled_jobs(self):
        return set(self.cancelled)

    def should_stop(self):
        return False

    def decode_request(self, job):
        return job.request

    def predict(self, x=None):
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("a bug")
        yield from self.engine.step()

    def encode_response(self, outputs):
        yield from outputs


def job(name: str, job_id: int, deadline: float = math.inf, max_tokens: int = 3) -> QueuedJob:
    request = EngineRequest(name, [Message("user", [TextPart(name)])], SamplingParams(max_tokens=max_tokens))
    return QueuedJob(request, job_id, deadline)


def run(loop: EngineLoop, api: API, requests: queue.Queue, transport: Transport, passes: int) -> None:
    for _ in range(passes):
        loop.run(api, "cpu", 0, requests, transport, {}, None)


def test_outputs_go_back_typed_to_the_queue_that_sent_each_request():
    loop, api, requests, transport = EngineLoop(), API(), queue.Queue(), Transport()
    requests.put((0, "uid-a", time.monotonic(), job("a", 1)))
    requests.put((1, "uid-b", time.monotonic(), job("b", 2)))
    run(loop, api, requests, transport, 10)
    by_uid = {}
    for consumer, uid, data, status in transport.sent:
        by_uid.setdefault(uid, []).append((consumer, data, status))
    assert {c for c, _, _ in by_uid["uid-a"]} == {0} and {c for c, _, _ in by_uid["uid-b"]} == {1}
    for sent in by_uid.values():
        outputs = [d for _, d, s in sent if s == LitAPIStatus.OK]
        assert all(isinstance(o, RequestOutput) for o in outputs) and outputs[-1].completion_tokens == 3
        assert sent[-1][2] == LitAPIStatus.FINISH_STREAMING


def test_cancelled_and_overdue_requests_leave_the_engine():
    loop, api, requests, transport = EngineLoop(), API(), queue.Queue(), Transport()
    requests.put((0, "uid-gone", time.monotonic(), job("gone", 7, max_tokens=100)))
    requests.put((0, "uid-late", time.monotonic(), job("late", 8, deadline=time.monotonic() + 0.05, max_tokens=100)))
    run(loop, api, requests, transport, 2)
    api.cancelled.add(7)
    time.sleep(0.06)
    run(loop, api, requests, transport, 1)
    assert not api.engine.has_unfinished()
    sent_before = len(transport.sent)
    run(loop, api, requests, transport, 2)
    assert len(transport.sent) == sent_before  # nothing more for them


def test_an_engine_failure_ends_the_requests_in_flight_and_the_loop_goes_on():
    loop, api, requests, transport = EngineLoop(), API(fail_steps=1), queue.Queue(), Transport()
    requests.put((0, "uid-a", time.monotonic(), job("a", 1)))
    run(loop, api, requests, transport, 1)
    errors = [d for _, uid, d, s in transport.sent if s == LitAPIStatus.OK and d.error is not None]
    assert [e.error.status for e in errors] == [500]
    requests.put((0, "uid-b", time.monotonic(), job("b", 2)))
    run(loop, api, requests, transport, 10)
    finished = [d.finish_reason for _, uid, d, s in transport.sent if uid == "uid-b" and s == LitAPIStatus.OK]
    assert finished[-1] == "length"
