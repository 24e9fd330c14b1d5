"""CaptionSpec in process: admission, readiness, deadlines, worker failures and both answer shapes,
through the real app and the real worker loop, with no process started (tests/service/inprocess.py)."""

from __future__ import annotations

import asyncio
import json
import tomllib

from litserve.utils import WorkerSetupStatus

from tests.helpers import ROOT, data_url, nv_ingest_body, png_bytes
from tests.service.inprocess import InProcessService, until

BODY = nv_ingest_body(data_url(png_bytes(64, 48)), temperature=0)


def long_body(tokens: int = 400) -> dict:
    return {**BODY, "max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}


def sse_events(text: str) -> list:
    lines = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_an_answer_leaves_nothing_behind():
    service = InProcessService()

    async def scenario(client):
        answer = await client.post("/v1/chat/completions", json=BODY)
        assert answer.status_code == 200
        body = answer.json()
        usage = body["usage"]
        assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["message"]["content"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # The response-buffer entry and the admission place are given back.
        assert service.spec.response_buffer == {} and service.shared.in_flight == 0

    service.run(scenario)


def test_streamed_and_whole_answers_agree():
    service = InProcessService()

    async def scenario(client):
        whole = (await client.post("/v1/chat/completions", json=BODY)).json()
        streamed = await client.post("/v1/chat/completions",
                                     json={**BODY, "stream": True, "stream_options": {"include_usage": True}})
        events = sse_events(streamed.text)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert text == whole["choices"][0]["message"]["content"]
        assert events[-1]["usage"] == whole["usage"]
        assert [e["choices"][0].get("finish_reason") for e in events if e["choices"]][-1] == "stop"

    service.run(scenario)


def test_not_ready_until_every_worker_is_then_ready():
    service = InProcessService()
    service.server.workers_setup_status = {"inference_0": WorkerSetupStatus.READY,
                                           "inference_1": WorkerSetupStatus.STARTING}

    async def scenario(client):
        refused = await client.post("/v1/chat/completions", json=BODY)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert (await client.get("/v1/health/ready")).status_code == 503
        service.server.workers_setup_status["inference_1"] = WorkerSetupStatus.READY
        assert (await client.get("/v1/health/ready")).status_code == 200
        assert (await client.post("/v1/chat/completions", json=BODY)).status_code == 200

    service.run(scenario)


def test_draining_refuses_new_requests_and_finishes_admitted_ones():
    service = InProcessService(mock_token_delay=0.01)

    async def scenario(client):
        (running,) = await service.started(client, long_body(50))
        service.shared.start_draining()
        refused = await client.post("/v1/chat/completions", json=BODY)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
        assert (await client.get("/v1/health/ready")).status_code == 503
        finished = await running
        assert finished.status_code == 200 and finished.json()["usage"]["completion_tokens"] == 50

    service.run(scenario)


def test_exactly_the_limit_is_admitted():
    limit = 3
    service = InProcessService(max_queued_requests=limit, mock_token_delay=0.01)

    async def scenario(client):
        held = await service.started(client, long_body(100), limit)
        refused = await client.post("/v1/chat/completions", json=BODY)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert service.shared.in_flight == limit
        assert all(r.status_code == 200 for r in await asyncio.gather(*held))
        assert service.shared.in_flight == 0
        assert (await client.post("/v1/chat/completions", json=BODY)).status_code == 200

    service.run(scenario)


def test_a_request_past_its_deadline_gets_504_and_leaves_the_engine():
    service = InProcessService(request_timeout=0.5, mock_token_delay=0.01)

    async def scenario(client):
        late = await client.post("/v1/chat/completions", json=long_body(1000))
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        await until(lambda: not service.api.engine.has_unfinished(), timeout=2)

    service.run(scenario)


def test_a_deadline_in_the_middle_of_a_stream_is_reported_in_band():
    service = InProcessService(request_timeout=0.5, mock_token_delay=0.01)

    async def scenario(client):
        streamed = await client.post("/v1/chat/completions", json={**long_body(1000), "stream": True})
        assert streamed.status_code == 200  # the status line went out with the first token
        events = sse_events(streamed.text)
        assert events[-1]["error"]["code"] == "timeout"

    service.run(scenario)


def test_a_dead_worker_fails_requests_in_flight_with_503():
    service = InProcessService(mock_token_delay=0.01)

    async def scenario(client):
        (running,) = await service.started(client, long_body(1000))
        service.shared.mark_worker_dead()
        failed = await running
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "worker_unavailable"

    service.run(scenario)


def test_an_engine_failure_costs_the_requests_in_flight_not_the_service():
    service = InProcessService()

    async def scenario(client):
        engine = service.api.engine
        step = engine.step

        def broken():
            engine.step = step  # fails once
            raise RuntimeError("planted")

        engine.step = broken
        failed = await client.post("/v1/chat/completions", json=BODY)
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
        assert (await client.post("/v1/chat/completions", json=BODY)).status_code == 200

    service.run(scenario)


def test_metadata_reports_what_the_worker_runs_and_version_the_release():
    service = InProcessService(max_batch_size=5)

    async def scenario(client):
        meta = (await client.get("/v1/metadata")).json()
        assert (meta["device"], meta["dtype"], meta["max_running_sequences"]) == ("cpu", "float32", 5)
        release = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        assert (await client.get("/v1/version")).json() == {"release": release, "api": "1.0.0"}

    service.run(scenario)


def test_a_full_service_refuses_before_reading_the_body():
    """Refusals cost no parsing or decoding, so a flood of them leaves the CPU to the admitted requests."""
    service = InProcessService(max_queued_requests=1, mock_token_delay=0.01)

    async def scenario(client):
        (held,) = await service.started(client, long_body(100))
        refused = await client.post("/v1/chat/completions", content=b"{not even json",
                                    headers={"Content-Type": "application/json"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert (await held).status_code == 200

    service.run(scenario)
