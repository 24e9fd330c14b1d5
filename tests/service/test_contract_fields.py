"""Fields nv-ingest's newer caption client sends (issue 11): `chat_template_kwargs.enable_thinking`,
`mm_processor_kwargs.max_num_tiles`, `media_options` and `extra_body` extras, and the context-text prompt.
Through a real `python server.py`: mock mode, and the tiny checkpoint where the model itself matters."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from PIL import Image

from engine.request import EngineRequest
from service.errors import APIError
from service.jobs import JobLimits, build_job
from service.protocol import ChatCompletionRequest
from tests.helpers import data_url, expected_tiles, mock_caption_for, nv_ingest_body, png_bytes

URL_640x480 = data_url(png_bytes(640, 480, (20, 120, 220)))
CAPTION = "Caption the content of this image:"
PAGE_TEXT = ("Quarterly revenue by region, in millions of dollars. " * 100)[:4096]  # nv-ingest's cap
CONTEXT_PROMPT = f"Text near this image:\n---\n{PAGE_TEXT}\n---\n\n{CAPTION}"
LIMITS = dict(default_max_tokens=1024, max_output_tokens=4096, max_images=4, max_image_pixels=10**8,
              max_prompt_chars=32000)


def post(service, body, headers=None, timeout=60):
    return requests.post(service.chat_url, json=body, headers=headers or {}, timeout=timeout)


def ok(service, body, headers=None) -> dict:
    response = post(service, body, headers)
    assert response.status_code == 200, response.text
    return response.json()


def newest_nv_ingest_body(url: str, **overrides) -> dict:
    """What nv-ingest's newest caption client builds with every optional field set, `extra_body` merged."""
    body = nv_ingest_body(url, max_tokens=1024)
    body.update({
        "chat_template_kwargs": {"enable_thinking": False, "reasoning_effort": "low"},
        "mm_processor_kwargs": {"max_num_tiles": 4, "do_resize": True},
        "media_options": {"image": {"detail": "high"}, "video": {"fps": 2}},
        "nvext": {"guided_json": None, "priority": "low"},  # an extra_body field we do not know
        "frequency_penalty": 0.0,
    })
    body.update(overrides)
    return body


def mock_words(body: dict) -> int:
    """The mock's prompt tokens other than images: whitespace words of every message's text."""
    words = 0
    for message in body["messages"]:
        content = message["content"]
        texts = [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
        words += len("\n".join(texts).split())
    return words


# --- all fields together ------------------------------------------------------------------------------

def test_newest_nv_ingest_body_with_every_field_is_answered(mock_service, auth_headers):
    result = ok(mock_service, newest_nv_ingest_body(URL_640x480), auth_headers)
    message = result["choices"][0]["message"]
    # Tiled at 4 tiles, as the request asked (640x480 is one tile at 4, 13 at the server's 12).
    assert message["content"] == mock_caption_for(URL_640x480, max_tiles=4)
    assert message["content"] != mock_caption_for(URL_640x480, max_tiles=12)  # the hash shows the tiling
    assert message.get("reasoning_content") is None
    assert result["usage"]["prompt_tokens"] == mock_words(newest_nv_ingest_body(URL_640x480)) + 256 * 1


# --- mm_processor_kwargs.max_num_tiles ------------------------------------------------------------------

def test_max_num_tiles_sets_the_tiling_and_prompt_tokens(mock_service, auth_headers):
    words = mock_words(nv_ingest_body(URL_640x480))
    usage = {}
    for budget in (None, 12, 6, 4, 1):
        body = nv_ingest_body(URL_640x480)
        if budget is not None:
            body["mm_processor_kwargs"] = {"max_num_tiles": budget}
        usage[budget] = ok(mock_service, body, auth_headers)["usage"]["prompt_tokens"]
    expected = {b: words + 256 * expected_tiles(640, 480, 12 if b is None else b) for b in usage}
    assert usage == expected
    assert (usage[None], usage[6], usage[1]) == (words + 13 * 256, words + 7 * 256, words + 256)


@pytest.mark.parametrize("value,status,code", [
    (0, 422, "invalid_request"), (-1, 422, "invalid_request"), (4.5, 422, "invalid_request"),
    ("4", 422, "invalid_request"), (True, 422, "invalid_request"), ([4], 422, "invalid_request"),
    ({"n": 4}, 422, "invalid_request"),
    # Well-formed but above this server's MAX_NUM_TILES (12): a 400 of its own.
    (13, 400, "invalid_max_num_tiles"), (100, 400, "invalid_max_num_tiles")])
def test_bad_max_num_tiles_is_refused_naming_the_field(mock_service, auth_headers, value, status, code):
    body = nv_ingest_body(URL_640x480, mm_processor_kwargs={"max_num_tiles": value})
    response = post(mock_service, body, auth_headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == "mm_processor_kwargs.max_num_tiles"
    assert response.json()["error"]["code"] == code


def test_max_num_tiles_null_other_keys_and_empty_object_mean_the_server_default(mock_service, auth_headers):
    default = ok(mock_service, nv_ingest_body(URL_640x480), auth_headers)["usage"]["prompt_tokens"]
    assert default == mock_words(nv_ingest_body(URL_640x480)) + 256 * 13  # MAX_NUM_TILES=12: 12 tiles and a thumbnail
    for kwargs in ({"max_num_tiles": None}, {}, {"num_crops": 3}, None):
        body = nv_ingest_body(URL_640x480, mm_processor_kwargs=kwargs)
        assert ok(mock_service, body, auth_headers)["usage"]["prompt_tokens"] == default


def test_max_num_tiles_is_bounded_by_the_servers_max_num_tiles():
    request = ChatCompletionRequest.model_validate(
        nv_ingest_body(URL_640x480, mm_processor_kwargs={"max_num_tiles": 6}))
    assert build_job(request, JobLimits(max_num_tiles=12, **LIMITS)).tiles == 7
    with pytest.raises(APIError) as refused:
        build_job(request, JobLimits(max_num_tiles=4, **LIMITS))
    assert refused.value.status == 400 and refused.value.param == "mm_processor_kwargs.max_num_tiles"
    assert "MAX_NUM_TILES (4)" in refused.value.message


# --- chat_template_kwargs.enable_thinking ---------------------------------------------------------------

@pytest.mark.parametrize("value", ["false", "true", 0, 1, "yes", [False], {"on": True}])
def test_non_boolean_enable_thinking_is_refused_naming_the_field(mock_service, auth_headers, value):
    body = nv_ingest_body(URL_640x480, chat_template_kwargs={"enable_thinking": value})
    response = post(mock_service, body, auth_headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "chat_template_kwargs.enable_thinking"


def test_chat_template_kwargs_must_be_an_object(mock_service, auth_headers):
    response = post(mock_service, nv_ingest_body(URL_640x480, chat_template_kwargs="no_think"), auth_headers)
    assert response.status_code == 422 and response.json()["error"]["param"] == "chat_template_kwargs"


@pytest.mark.parametrize("kwargs", [{"enable_thinking": True}, {"enable_thinking": False}, {"enable_thinking": None},
                                    {"thinking": True, "custom": [1, 2]}, {}, None])
def test_enable_thinking_values_and_other_keys_are_accepted(mock_service, auth_headers, kwargs):
    result = ok(mock_service, nv_ingest_body(URL_640x480, chat_template_kwargs=kwargs), auth_headers)
    message = result["choices"][0]["message"]
    assert message["content"] == mock_caption_for(URL_640x480)
    # nv-ingest's system prompt is /no_think: only enable_thinking=true turns reasoning on; other keys do nothing.
    if kwargs == {"enable_thinking": True}:
        assert message["reasoning_content"] == "The request holds 1 image(s); I describe each in one sentence."
    else:
        assert message.get("reasoning_content") is None
    assert result["usage"]["prompt_tokens"] == mock_words(nv_ingest_body(URL_640x480)) + 256 * 13


def test_enable_thinking_reaches_the_engine_request_and_the_cache_key():
    from service.cache import job_digest

    limits = JobLimits(max_num_tiles=12, **LIMITS)
    jobs: dict[object, EngineRequest] = {}
    for value in (None, True, False):
        body = nv_ingest_body(URL_640x480, chat_template_kwargs={"enable_thinking": value})
        jobs[value] = build_job(ChatCompletionRequest.model_validate(body), limits)
    assert [jobs[v].enable_thinking for v in (None, True, False)] == [None, True, False]
    assert len({job_digest(job, False) for job in jobs.values()}) == 3


# --- the context-text prompt --------------------------------------------------------------------------

@pytest.mark.parametrize("with_system", [True, False])
def test_context_text_prompt_with_and_without_system_message(mock_service, auth_headers, with_system):
    body = nv_ingest_body(URL_640x480)
    body["messages"][1]["content"][0]["text"] = CONTEXT_PROMPT
    if not with_system:
        body["messages"] = body["messages"][1:]
    result = ok(mock_service, body, auth_headers)
    assert result["choices"][0]["message"]["content"] == mock_caption_for(URL_640x480)
    assert result["usage"]["prompt_tokens"] == mock_words(body) + 256 * 13
    # The page text counts: without it the prompt is shorter by exactly its words and the frame's.
    plain = nv_ingest_body(URL_640x480)
    if not with_system:
        plain["messages"] = plain["messages"][1:]
    frame = len(f"Text near this image:\n---\n{PAGE_TEXT}\n---\n\n".split())
    assert result["usage"]["prompt_tokens"] - ok(mock_service, plain, auth_headers)["usage"]["prompt_tokens"] == frame


# --- the real engine (tiny checkpoint): the switch and the budget where the model itself answers ----------

def noise_url(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return data_url(buf.getvalue())


@pytest.mark.slow
def test_real_engine_enable_thinking_wins_over_the_system_prompt(tiny_service):
    """The random tiny model never closes a think block: with reasoning on, every token is reasoning."""
    def answer(system, kwargs):
        body = nv_ingest_body(noise_url(64, 64, 3), temperature=0, max_tokens=6, ignore_eos=True)
        body["messages"][0]["content"] = system
        if kwargs is not None:
            body["chat_template_kwargs"] = kwargs
        return ok(tiny_service, body)["choices"][0]["message"]

    think = answer("/think", None)
    assert think["content"] == "" and think["reasoning_content"]
    off = answer("/think", {"enable_thinking": False})
    assert off["content"] and off.get("reasoning_content") is None
    on = answer("/no_think", {"enable_thinking": True})
    assert on["content"] == "" and on["reasoning_content"]
    plain = answer("/no_think", None)
    assert plain["content"] and plain.get("reasoning_content") is None
    # The same prompts: enable_thinking=false turns the system prompt into /no_think, true into /think.
    assert off == plain and on == think


@pytest.mark.slow
def test_real_engine_max_num_tiles_sets_prompt_tokens(tiny_service):
    url = noise_url(640, 480, 5)
    full = ok(tiny_service, nv_ingest_body(url, temperature=0, max_tokens=2))
    one = ok(tiny_service, nv_ingest_body(url, temperature=0, max_tokens=2, mm_processor_kwargs={"max_num_tiles": 1}))
    six = ok(tiny_service, nv_ingest_body(url, temperature=0, max_tokens=2, mm_processor_kwargs={"max_num_tiles": 6}))
    assert full["usage"]["prompt_tokens"] - one["usage"]["prompt_tokens"] == (13 - 1) * 256
    assert six["usage"]["prompt_tokens"] - one["usage"]["prompt_tokens"] == (7 - 1) * 256
