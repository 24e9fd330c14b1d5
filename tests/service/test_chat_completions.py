"""The chat-completions contract through a real `python server.py` in mock mode."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from model.images import decode_data_url

from tests.helpers import MODEL_NAME, data_url, nv_ingest_body, png_bytes, mock_caption_for

URL_RED = data_url(png_bytes(64, 48, (200, 30, 30)))


def post(service, body, headers, **kwargs):
    return requests.post(service.chat_url, json=body, headers=headers, timeout=30, **kwargs)


def test_nv_ingest_request_verbatim(mock_service, auth_headers):
    response = post(mock_service, nv_ingest_body(URL_RED), auth_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert body["model"] == MODEL_NAME
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == mock_caption_for(decode_data_url(URL_RED, 10**8))
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == len(choice["message"]["content"].split()) + 1  # words, then the end token
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_truncates_with_length(mock_service, auth_headers):
    for field in ("max_tokens", "max_completion_tokens"):
        body = nv_ingest_body(URL_RED)
        body.pop("max_tokens")
        body[field] = 3
        choice_body = post(mock_service, body, auth_headers).json()
        assert choice_body["choices"][0]["finish_reason"] == "length"
        assert len(choice_body["choices"][0]["message"]["content"].split()) == 3
        assert choice_body["usage"]["completion_tokens"] == 3


def test_stop_sequence_is_honoured_and_not_returned(mock_service, auth_headers):
    body = nv_ingest_body(URL_RED, stop=["pixels"], seed=7)
    choice = post(mock_service, body, auth_headers).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "pixels" not in choice["message"]["content"]
    assert choice["message"]["content"].startswith("A dark wide image of 64x48")


def test_system_prompt_as_list_of_text_parts_and_text_only(mock_service, auth_headers):
    body = nv_ingest_body(URL_RED)
    body["messages"][0]["content"] = [{"type": "text", "text": "/no_think"}]
    assert post(mock_service, body, auth_headers).status_code == 200
    text_only = {"model": "", "messages": [{"role": "user", "content": "Say something about nothing"}]}
    response = post(mock_service, text_only, auth_headers)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "No image was given; the prompt has 4 words."


def test_streaming_sse_ends_with_done(mock_service, auth_headers):
    body = nv_ingest_body(URL_RED, stream=True, stream_options={"include_usage": True})
    with requests.post(mock_service.chat_url, json=body, headers=auth_headers, stream=True, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == mock_caption_for(decode_data_url(URL_RED, 10**8))
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1]["usage"]["completion_tokens"] == len(text.split()) + 1


def test_openai_client_non_streaming_and_streaming(mock_service):
    from tests.conftest import API_KEY

    client = openai.OpenAI(base_url=f"{mock_service.url}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Caption the content of this image:"},
        {"type": "image_url", "image_url": {"url": URL_RED}},
    ]}]
    expected = mock_caption_for(decode_data_url(URL_RED, 10**8))
    completion = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=64, seed=3)
    assert completion.choices[0].message.content == expected
    assert completion.usage.total_tokens > completion.usage.prompt_tokens
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == " ".join(expected.split()[:5])
    assert finish == "length"
    assert [m.id for m in client.models.list()] == [MODEL_NAME]


def test_unknown_model_is_404_and_empty_model_accepted(mock_service, auth_headers):
    response = post(mock_service, nv_ingest_body(URL_RED, model="gpt-4o"), auth_headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert post(mock_service, nv_ingest_body(URL_RED, model=""), auth_headers).status_code == 200


def test_mock_is_deterministic_and_content_dependent(mock_service, auth_headers):
    first = post(mock_service, nv_ingest_body(URL_RED), auth_headers).json()["choices"][0]["message"]["content"]
    again = post(mock_service, nv_ingest_body(URL_RED), auth_headers).json()["choices"][0]["message"]["content"]
    other_url = data_url(png_bytes(64, 48, (200, 30, 31)))
    other = post(mock_service, nv_ingest_body(other_url), auth_headers).json()["choices"][0]["message"]["content"]
    assert first == again
    assert first != other


@pytest.mark.parametrize("n_requests", [13])
def test_concurrent_requests_each_get_their_own_caption(mock_service, auth_headers, n_requests):
    # More requests than MAX_BATCH_SIZE=4, each with a distinct image and max_tokens.
    urls = [data_url(png_bytes(40 + i, 30 + 2 * i, (i * 19 % 256, 90, 255 - i))) for i in range(n_requests)]

    def one(i):
        body = nv_ingest_body(urls[i], max_tokens=8 + i)
        return post(mock_service, body, auth_headers).json()

    with ThreadPoolExecutor(n_requests) as pool:
        results = list(pool.map(one, range(n_requests)))
    for i, result in enumerate(results):
        expected = mock_caption_for(decode_data_url(urls[i], 10**8)).split()[: 8 + i]
        assert result["choices"][0]["message"]["content"] == " ".join(expected)
