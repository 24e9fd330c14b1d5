"""Bearer-key authentication on the inference and model-listing routes."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import API_KEY
from tests.helpers import data_url, nv_ingest_body, png_bytes

BODY = nv_ingest_body(data_url(png_bytes()))
OPEN = {"ENABLE_MOCK_INFERENCE": "1", "NGC_API_KEY": API_KEY, "NIM_REQUIRE_AUTH": "0", "MAX_BATCH_SIZE": "1"}
NVIDIA_KEY = {"ENABLE_MOCK_INFERENCE": "1", "NVIDIA_API_KEY": "other-key"}


@pytest.mark.parametrize("headers,status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong-key"}, 401),
    ({"Authorization": f"Bearer {API_KEY}x"}, 401),
    ({"Authorization": API_KEY}, 401),
    ({"X-API-Key": API_KEY}, 401),
    ({"Authorization": f"Bearer {API_KEY}"}, 200),
    ({"Authorization": f"bearer {API_KEY}"}, 200),
])
def test_key_required_on_inference_and_models(mock_service, headers, status):
    chat = requests.post(mock_service.chat_url, json=BODY, headers=headers, timeout=30)
    models = requests.get(f"{mock_service.url}/v1/models", headers=headers, timeout=30)
    assert chat.status_code == status
    assert models.status_code == status
    if status == 401:
        assert chat.json()["error"]["type"] == "authentication_error"
        assert API_KEY not in chat.text


def test_health_needs_no_key(mock_service):
    assert requests.get(f"{mock_service.url}/health", timeout=10).status_code == 200


def test_key_never_logged(mock_service):
    requests.post(mock_service.chat_url, json=BODY, headers={"Authorization": "Bearer leaked-guess"}, timeout=30)
    assert API_KEY not in mock_service.log()
    assert "leaked-guess" not in mock_service.log()


@pytest.mark.server(OPEN, own=True)  # started together with NVIDIA_KEY's
def test_nim_require_auth_0_turns_the_check_off(server):
    try:
        assert requests.post(server.chat_url, json=BODY, timeout=30).status_code == 200
        assert requests.get(f"{server.url}/v1/models", timeout=30).status_code == 200
    finally:
        assert server.stop() == 0


@pytest.mark.server(NVIDIA_KEY)
def test_nvidia_api_key_is_honoured_too(server):
    assert requests.post(server.chat_url, json=BODY, timeout=30).status_code == 401
    ok = requests.post(server.chat_url, json=BODY, headers={"Authorization": "Bearer other-key"}, timeout=30)
    assert ok.status_code == 200


@pytest.mark.parametrize("headers, problem", [
    ({}, "missing API key"),
    ({"Authorization": "sekrit"}, "malformed Authorization header"),
    ({"Authorization": "Bearer "}, "malformed Authorization header"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed Authorization header"),
    ({"Authorization": "Bearer wrong"}, "invalid API key"),
])
def test_the_401_says_what_is_wrong_with_the_header(mock_service, headers, problem):
    response = requests.get(f"{mock_service.url}/v1/models", headers=headers, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["message"].startswith(problem)


def test_rejection_counters_are_exported_before_the_first_rejection(mock_service):
    text = requests.get(f"{mock_service.url}/metrics", timeout=10).text
    for reason in ("queue_full", "not_ready"):
        assert f'caption_requests_rejected_total{{reason="{reason}"}}' in text
