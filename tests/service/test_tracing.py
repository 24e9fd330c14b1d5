"""OpenTelemetry tracing (service/tracing.py): off unless configured, the caller's trace continued, our spans
with counts and never content; in process with an in-memory exporter, and once through a real server with
OTEL_TRACES_EXPORTER=console."""

from __future__ import annotations

import json
import time

import pytest
import requests
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import tracing
from tests.helpers import data_url, nv_ingest_body, png_bytes
from tests.service.inprocess import InProcessService

IMAGE_URL = data_url(png_bytes(64, 48, (10, 200, 30)))
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
OUR_SPANS = {"POST /v1/chat/completions", "images.decode_and_tile", "engine.queue", "engine.prefill", "engine.decode"}


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.reset()


def _traced(headers_list: list[dict], body: dict | None = None) -> list[int]:
    service = InProcessService(nim_require_auth=False)

    async def scenario(client):
        return [(await client.post("/v1/chat/completions", json=body or nv_ingest_body(IMAGE_URL), headers=h)
                 ).status_code for h in headers_list]

    return service.run(scenario)


def test_tracing_is_off_unless_the_otel_variables_ask_for_it():
    assert tracing.exporters_from_env({}) == []
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert tracing.exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_SDK_DISABLED": "true"}) == []


def test_a_request_continues_the_callers_trace_with_our_spans(spans):
    assert _traced([{"traceparent": TRACEPARENT, "tracestate": "vendor=1"}]) == [200]
    finished = {span.name: span for span in spans.get_finished_spans()}
    assert set(finished) == OUR_SPANS
    server = finished["POST /v1/chat/completions"]
    assert format(server.context.trace_id, "032x") == CALLER_TRACE
    assert format(server.parent.span_id, "016x") == CALLER_SPAN and server.parent.is_remote
    assert server.context.trace_state.get("vendor") == "1"
    for name in OUR_SPANS - {server.name}:
        assert finished[name].context.trace_id == server.context.trace_id
        assert finished[name].parent.span_id == server.context.span_id, name
    assert finished["images.decode_and_tile"].attributes["caption.images"] == 1
    assert finished["images.decode_and_tile"].attributes["caption.tiles"] == 13  # 4x3 grid + thumbnail
    decode = finished["engine.decode"].attributes
    assert decode["caption.prompt_tokens"] == 7 + 13 * 256 and decode["caption.completion_tokens"] == 16
    # The batch it decoded in: alone, one row in every step.
    assert (decode["caption.decode_batch_min"], decode["caption.decode_batch_max"],
            decode["caption.decode_batch_mean"]) == (1, 1, 1.0)
    assert finished["engine.prefill"].attributes["caption.prompt_tokens"] == 7 + 13 * 256
    assert finished["engine.queue"].attributes["caption.tiles"] == 13
    # One after the other: the wait for a slot, the prefill (as long as the engine says it took), decoding.
    queue, prefill, decoding = (finished[n] for n in ("engine.queue", "engine.prefill", "engine.decode"))
    assert queue.start_time <= queue.end_time == prefill.start_time <= prefill.end_time == decoding.start_time
    assert prefill.end_time - prefill.start_time > 0
    assert server.attributes["http.response.status_code"] == 200 and server.attributes["caption.images"] == 1
    # Nothing of the request's content: no image data, no prompt text.
    dumped = "".join(span.to_json() for span in spans.get_finished_spans())
    assert IMAGE_URL[30:90] not in dumped and "Caption the content" not in dumped


@pytest.mark.parametrize("bad", ["garbage", "00-" + "0" * 32 + "-" + CALLER_SPAN + "-01", "00-" + "a" * 5000,
                                 f"00-{CALLER_TRACE}-{CALLER_SPAN}-01" + " " * 300])
def test_a_malformed_or_oversized_traceparent_starts_a_new_trace(spans, bad):
    assert _traced([{"traceparent": bad, "tracestate": "x=" + "y" * 5000}]) == [200]
    (server,) = [s for s in spans.get_finished_spans() if s.kind.name == "SERVER"]
    assert server.parent is None and server.context.is_valid
    assert format(server.context.trace_id, "032x") != CALLER_TRACE


def test_a_refused_request_is_traced_as_an_error_without_its_content(spans):
    body = nv_ingest_body(IMAGE_URL, model="some/other-model")
    assert _traced([{"traceparent": TRACEPARENT}], body) == [404]
    (server,) = spans.get_finished_spans()
    assert server.attributes["http.response.status_code"] == 404


def test_console_exporter_writes_the_callers_trace_to_the_log(tmp_path):
    from tests.conftest import stop_later
    from tests.helpers import Service

    service = Service({"ENABLE_MOCK_INFERENCE": "1", "NIM_REQUIRE_AUTH": "0", "OTEL_TRACES_EXPORTER": "console",
                       "OTEL_SERVICE_NAME": "captions-under-test"}, tmp_path / "server.log")
    try:
        response = requests.post(service.chat_url, json=nv_ingest_body(IMAGE_URL), timeout=30,
                                 headers={"traceparent": TRACEPARENT})
        assert response.status_code == 200
        deadline = time.monotonic() + 10  # the access line is written once the response has gone out
        while True:
            lines = service.log_path.read_text().splitlines()
            if any("caption.access: POST /v1/chat/completions 200" in line for line in lines) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        stop_later(service)
    spans = [json.loads(line.split(" caption.trace: span ", 1)[1]) for line in lines if " caption.trace: span " in line]
    assert {s["name"] for s in spans} == OUR_SPANS
    assert {s["context"]["trace_id"] for s in spans} == {"0x" + CALLER_TRACE}
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {"captions-under-test"}
    (access,) = [line for line in lines if "caption.access: POST /v1/chat/completions 200" in line]
    assert f"trace_id={CALLER_TRACE}" in access


def test_a_bad_image_is_traced_by_its_error_code_only(spans):
    body = nv_ingest_body("data:image/png;base64,bm90IGFuIGltYWdl")  # "not an image"
    assert _traced([{"traceparent": TRACEPARENT}], body) == [400]
    (decode,) = [s for s in spans.get_finished_spans() if s.name == "images.decode_and_tile"]
    assert decode.status.status_code.name == "ERROR" and not decode.events
    assert "bm90IGFuIGltYWdl" not in "".join(s.to_json() for s in spans.get_finished_spans())
