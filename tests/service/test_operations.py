"""NIM-compatible routes, metrics, request ids and logs, through a real server."""

from __future__ import annotations

import json
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from server import __version__
from tests.conftest import API_KEY
from tests.helpers import MODEL_NAME, Service, data_url, metric_values, mock_caption_for, nv_ingest_body, png_bytes

KEY = {"Authorization": f"Bearer {API_KEY}"}
OPEN_ROUTES = ["/v1/health/live", "/v1/health/ready", "/metrics", "/health"]
KEYED_ROUTES = ["/v1/models", "/v1/metadata", "/v1/version"]


def test_routes_before_and_after_ready(tmp_path):
    # Two mock steps of 2 s each in the worker's warm-up keep the model "loading" for ~4 s.
    service = Service({"ENABLE_MOCK_INFERENCE": "1", "NGC_API_KEY": API_KEY, "MOCK_TOKEN_DELAY": "2"},
                      tmp_path / "slow.log", wait_for="/v1/health/live")
    try:
        live = requests.get(f"{service.url}/v1/health/live", timeout=5)
        assert live.json() == {"object": "health.response", "message": "Service is live."}
        ready = requests.get(f"{service.url}/v1/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["object"] == "health.response"
        early = requests.post(service.chat_url, json=nv_ingest_body(data_url(png_bytes())), headers=KEY, timeout=5)
        assert early.status_code == 503 and early.headers["retry-after"]
        assert early.json()["error"]["code"] == "service_unavailable"
        assert requests.get(f"{service.url}/metrics", timeout=5).status_code == 200
        for route in KEYED_ROUTES:  # answered while loading, with the key only
            assert requests.get(f"{service.url}{route}", timeout=5).status_code == 401
            assert requests.get(f"{service.url}{route}", headers=KEY, timeout=5).status_code == 200
        deadline = time.monotonic() + 60
        while requests.get(f"{service.url}/v1/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, service.log()
            time.sleep(0.2)
        assert requests.get(f"{service.url}/v1/health/ready", timeout=5).json() == {
            "object": "health.response", "message": "Service is ready."}
        # Ready means served: one token (its prefill's; each decoding step here takes 2 s).
        ready_now = requests.post(service.chat_url, json=nv_ingest_body(data_url(png_bytes()), max_tokens=1),
                                  headers=KEY, timeout=30)
        assert ready_now.status_code == 200
        assert ready_now.json()["choices"][0]["message"]["content"] == mock_caption_for(png_bytes()).split()[0]
    finally:
        service.stop()


@pytest.mark.parametrize("route", OPEN_ROUTES)
def test_probes_and_metrics_need_no_key(mock_service, route):
    response = requests.get(f"{mock_service.url}{route}", timeout=10)
    assert response.status_code == 200
    if route == "/v1/health/live":
        assert response.json() == {"object": "health.response", "message": "Service is live."}
    elif route == "/v1/health/ready":
        assert response.json() == {"object": "health.response", "message": "Service is ready."}
    elif route == "/health":
        assert response.text == "ok"
    else:  # Prometheus text that parses, with the service's own families in it
        names = {family.name for family in text_string_to_metric_families(response.text)}
        assert {"caption_http_requests", "caption_batch_size", "caption_queue_depth"} <= names


@pytest.mark.parametrize("route", KEYED_ROUTES)
def test_other_routes_need_the_key(mock_service, route):
    refused = requests.get(f"{mock_service.url}{route}", timeout=10)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.json()["error"]["type"] == "authentication_error"
    assert requests.get(f"{mock_service.url}{route}", headers=KEY, timeout=10).status_code == 200


def test_models_metadata_version_bodies(mock_service):
    models = requests.get(f"{mock_service.url}/v1/models", headers=KEY, timeout=10).json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == MODEL_NAME and models["data"][0]["max_model_len"] == 16384
    meta = requests.get(f"{mock_service.url}/v1/metadata", headers=KEY, timeout=10).json()
    assert meta["modelInfo"][0]["shortName"] == MODEL_NAME
    assert meta["max_batch_size"] == 4 and meta["max_num_tiles"] == 12 and meta["mock"] is True
    assert meta["max_running_sequences"] == 4 and meta["max_prefill_tokens"] == 2048
    version = requests.get(f"{mock_service.url}/v1/version", headers=KEY, timeout=10).json()
    assert version == {"release": __version__, "api": "1.0.0"}


def test_metrics_parse_and_move_with_traffic(mock_service):
    """Three requests, one after another, on the shared server: every count moves by exactly theirs."""
    url = data_url(png_bytes(33, 33, (5, 6, 7)))
    words = len(mock_caption_for(url).split())  # 15; one tile (33x33 is square and small)
    before = metric_values(mock_service)
    for _ in range(3):
        response = requests.post(mock_service.chat_url, json=nv_ingest_body(url), headers=KEY, timeout=30)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == mock_caption_for(url)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    # The first token comes from the prefill; each further token (words, then the end) is one decode step of
    # batch 1. The worker records a step after sending its output: wait for the last step to be counted.
    steps = 3 * words
    deadline = time.monotonic() + 10
    after = metric_values(mock_service)
    while delta("caption_batch_size_count") < steps and time.monotonic() < deadline:
        time.sleep(0.05)
        after = metric_values(mock_service)
    ok_key = ("caption_http_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))
    assert after[ok_key] - before.get(ok_key, 0) == 3
    assert delta("caption_images_total") == 3 and delta("caption_tiles_total") == 3
    assert delta("caption_completion_tokens_total") == 3 * (words + 1)
    assert delta("caption_prompt_tokens_total") == 3 * (7 + 256)
    assert delta("caption_time_to_first_token_seconds_count") == 3
    assert delta("caption_batch_size_count") == steps and delta("caption_batch_size_sum") == steps
    assert delta("caption_batch_size_bucket", (("le", "1.0"),)) == steps
    assert delta("caption_prefill_tokens_per_step_count") == 3  # one chunk each: 263 tokens < MAX_PREFILL_TOKENS
    assert delta("caption_prefill_tokens_per_step_sum") == 3 * (7 + 256)
    assert ("caption_queue_depth", ()) in after and after[("caption_queue_depth", ())] == 0
    assert after[("caption_running_sequences", ())] == 0  # set before the step's batch size is recorded


def test_request_id_round_trip(mock_service):
    body = nv_ingest_body(data_url(png_bytes()))
    echoed = requests.post(mock_service.chat_url, json=body, headers={**KEY, "X-Request-ID": "ingest-42"}, timeout=30)
    assert echoed.headers["x-request-id"] == "ingest-42"
    generated = requests.post(mock_service.chat_url, json=body, headers=KEY, timeout=30)
    assert len(generated.headers["x-request-id"]) == 32
    error = requests.post(mock_service.chat_url, json={}, headers={**KEY, "X-Request-ID": "bad-1"}, timeout=30)
    assert error.headers["x-request-id"] == "bad-1"
    assert "ingest-42" in mock_service.log()


def test_cors_is_off_by_default(mock_service):
    response = requests.get(f"{mock_service.url}/v1/models", headers={**KEY, "Origin": "https://evil.example"},
                            timeout=10)
    assert "access-control-allow-origin" not in response.headers


def test_json_log_lines_parse_and_cors_when_configured(tmp_path):
    service = Service({"ENABLE_MOCK_INFERENCE": "1", "NIM_REQUIRE_AUTH": "0", "LOG_FORMAT": "json",
                       "CORS_ORIGINS": "https://ui.example"}, tmp_path / "json.log")
    try:
        body = nv_ingest_body(data_url(png_bytes()))
        requests.post(service.chat_url, json=body, headers={"X-Request-ID": "json-7"}, timeout=30)
        allowed = requests.get(f"{service.url}/v1/models", headers={"Origin": "https://ui.example"}, timeout=10)
        assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
        other = requests.get(f"{service.url}/v1/models", headers={"Origin": "https://evil.example"}, timeout=10)
        assert "access-control-allow-origin" not in other.headers
        time.sleep(0.3)
    finally:
        service.stop()
    ours = [json.loads(line) for line in service.log_path.read_text().splitlines() if line.startswith("{")]
    access = [e for e in ours if e.get("request_id") == "json-7"]
    assert len(access) == 1
    entry = access[0]
    assert entry["status"] == 200 and entry["latency_ms"] > 0 and entry["finish_reason"] == "stop"
    # The request's own usage: 7 words and 13 tiles of prompt; the caption's words and the end token.
    assert entry["prompt_tokens"] == 7 + 13 * 256
    assert entry["completion_tokens"] == len(mock_caption_for(png_bytes()).split()) + 1
    assert "iVBORw0KGgo" not in service.log_path.read_text()  # image payloads are never logged
