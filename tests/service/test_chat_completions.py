"""The chat-completions contract through a real `python server.py` in mock mode."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.helpers import MODEL_NAME, data_url, expected_tiles, mock_caption_for, noise_png, nv_ingest_body, png_bytes

URL_RED = data_url(png_bytes(64, 48, (200, 30, 30)))

# Golden captions, computed once and pasted. The mock (model/mock.py) says, of each image: "bright" when the
# mean of its mean colour's channels is >= 128 (else "dark"); "wide"/"tall"/"square" from width vs height; the
# decoded size; the mean colour of what it sees (a solid image's own colour); and the first 10 hex digits of
# SHA-256 over its uint8 tiles plus "WxH" (the one part not checkable by hand: it pins the exact pixels).
# 64x48 (200, 30, 30): mean (200+30+30)/3 = 87 -> dark; 64 > 48 -> wide; #c81e1e = (200, 30, 30).
RED_CAPTION = "A dark wide image of 64x48 pixels with mean colour #c81e1e and content hash 5556a38f02."
GOLDEN = [  # (image, its size, its caption)
    (png_bytes(64, 48, (200, 30, 30)), (64, 48), RED_CAPTION),
    # (200, 30, 31): one blue level more -> another mean colour and another hash.
    (png_bytes(64, 48, (200, 30, 31)), (64, 48),
     "A dark wide image of 64x48 pixels with mean colour #c81e1f and content hash e1c39ded2e."),
    # 30x90 (240, 240, 240): mean 240 -> bright; 90 > 30 -> tall; a 1x3 grid plus thumbnail.
    (png_bytes(30, 90, (240, 240, 240)), (30, 90),
     "A bright tall image of 30x90 pixels with mean colour #f0f0f0 and content hash bf212020ac."),
    # Random pixels (uniform 0..255: mean colour near #808080, here just under 128 -> dark), cut 3x2 plus the
    # thumbnail: every tile differs, so the hash also pins their order and the resampling.
    (noise_png(96, 64, seed=5), (96, 64),
     "A dark wide image of 96x64 pixels with mean colour #80807e and content hash 1b0a9048d4."),
]
# The mock's prompt tokens: whitespace words of every message's text, plus 256 per 512x512 tile; 64x48 is
# cut into a 4x3 grid (aspect 4:3) plus a thumbnail: 13 tiles.
NV_INGEST_WORDS = len("/no_think".split()) + len("Caption the content of this image:".split())  # 1 + 6
RED_PROMPT_TOKENS = NV_INGEST_WORDS + 13 * 256


def post(service, body, headers, **kwargs):
    return requests.post(service.chat_url, json=body, headers=headers, timeout=30, **kwargs)


def message_of(service, body, headers) -> dict:
    response = post(service, body, headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_golden_captions_of_fixed_images(mock_service, auth_headers):
    for raw, (width, height), golden in GOLDEN:
        url = data_url(raw)
        result = message_of(mock_service, nv_ingest_body(url), auth_headers)
        assert result["choices"][0]["message"]["content"] == golden
        assert result["usage"]["prompt_tokens"] == NV_INGEST_WORDS + 256 * expected_tiles(width, height)
        # The tests' own re-implementation of the mock agrees with the literals (it checks the other tests).
        assert mock_caption_for(url) == golden
    assert expected_tiles(64, 48) == 13 and expected_tiles(30, 90) == 4 and expected_tiles(96, 64) == 7


def test_nv_ingest_request_verbatim(mock_service, auth_headers):
    body = message_of(mock_service, nv_ingest_body(URL_RED), auth_headers)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert body["model"] == MODEL_NAME
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": RED_CAPTION}
    assert choice["finish_reason"] == "stop"
    # 15 words, then the end token; the prompt: 7 words and 13 tiles.
    assert body["usage"] == {"prompt_tokens": RED_PROMPT_TOKENS, "completion_tokens": 16,
                             "total_tokens": RED_PROMPT_TOKENS + 16}


def test_max_tokens_truncates_with_length(mock_service, auth_headers):
    for field in ("max_tokens", "max_completion_tokens"):
        body = nv_ingest_body(URL_RED)
        body.pop("max_tokens")
        body[field] = 3
        choice_body = message_of(mock_service, body, auth_headers)
        assert choice_body["choices"][0]["finish_reason"] == "length"
        assert choice_body["choices"][0]["message"]["content"] == "A dark wide"
        assert choice_body["usage"]["completion_tokens"] == 3


def test_stop_sequence_is_honoured_and_not_returned(mock_service, auth_headers):
    body = nv_ingest_body(URL_RED, stop=["pixels"], seed=7)
    result = message_of(mock_service, body, auth_headers)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "stop"
    # Everything before the stop string, the space before it included; "pixels" was the 7th word.
    assert choice["message"]["content"] == "A dark wide image of 64x48 "
    assert result["usage"]["completion_tokens"] == 7


def test_system_prompt_as_list_of_text_parts_and_text_only(mock_service, auth_headers):
    """A system prompt given as text parts is the same prompt as its string form (parts joined by a newline)."""
    for system in ("/no_think", "/think", "You write captions.\n/no_think", "You write captions.\n/think"):
        as_string = nv_ingest_body(URL_RED)
        as_string["messages"][0]["content"] = system
        as_parts = nv_ingest_body(URL_RED)
        as_parts["messages"][0]["content"] = [{"type": "text", "text": line} for line in system.split("\n")]
        expected = message_of(mock_service, as_string, auth_headers)
        got = message_of(mock_service, as_parts, auth_headers)
        assert got["choices"] == expected["choices"] and got["usage"] == expected["usage"], system
        assert got["usage"]["prompt_tokens"] == len(system.split()) + NV_INGEST_WORDS - 1 + 13 * 256
        message = got["choices"][0]["message"]
        assert message["content"] == RED_CAPTION
        if system.endswith("/think"):  # the parts turn reasoning on, as the string does
            assert message["reasoning_content"] == "The request holds 1 image(s); I describe each in one sentence."
        else:
            assert message.get("reasoning_content") is None
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
    assert text == RED_CAPTION
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1]["usage"] == {"prompt_tokens": RED_PROMPT_TOKENS, "completion_tokens": 16,
                                   "total_tokens": RED_PROMPT_TOKENS + 16}


def test_openai_client_non_streaming_and_streaming(mock_service):
    from tests.conftest import API_KEY

    client = openai.OpenAI(base_url=f"{mock_service.url}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Caption the content of this image:"},
        {"type": "image_url", "image_url": {"url": URL_RED}},
    ]}]
    completion = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=64, seed=3)
    assert completion.choices[0].message.content == RED_CAPTION
    # No system message: 6 words, 13 tiles; 15 words and the end token.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (6 + 13 * 256, 16)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == "A dark wide image of"
    assert finish == "length"
    assert [m.id for m in client.models.list()] == [MODEL_NAME, f"{MODEL_NAME}-bf16"]  # the name, the variant's


def test_unknown_model_is_404_and_empty_model_accepted(mock_service, auth_headers):
    response = post(mock_service, nv_ingest_body(URL_RED, model="gpt-4o"), auth_headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert response.json()["error"]["param"] == "model"
    # A huge `model` (a data URL pasted in the wrong field) is quoted only in part.
    huge = "data:image/png;base64," + "A" * 28_000
    response = post(mock_service, nv_ingest_body(URL_RED, model=huge), auth_headers)
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert huge[:100] + "..." in message and len(message) < 300, len(message)
    empty = message_of(mock_service, nv_ingest_body(URL_RED, model=""), auth_headers)
    assert empty["choices"][0]["message"]["content"] == RED_CAPTION
    assert empty["model"] == MODEL_NAME


def test_mock_is_deterministic_and_content_dependent(mock_service, auth_headers):
    first = post(mock_service, nv_ingest_body(URL_RED), auth_headers).json()["choices"][0]["message"]["content"]
    again = post(mock_service, nv_ingest_body(URL_RED), auth_headers).json()["choices"][0]["message"]["content"]
    other_url = data_url(png_bytes(64, 48, (200, 30, 31)))
    other = post(mock_service, nv_ingest_body(other_url), auth_headers).json()["choices"][0]["message"]["content"]
    assert first == again == RED_CAPTION
    assert other == GOLDEN[1][2]


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
        expected = mock_caption_for(urls[i]).split()[: 8 + i]
        assert result["choices"][0]["message"]["content"] == " ".join(expected)
        assert result["usage"]["prompt_tokens"] == NV_INGEST_WORDS + 256 * expected_tiles(40 + i, 30 + 2 * i)
