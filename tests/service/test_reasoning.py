"""Reasoning over HTTP without the real model: the mock reasons when the system prompt turns it on."""

from __future__ import annotations

import json

import requests

from tests.helpers import data_url, nv_ingest_body, png_bytes

URL = data_url(png_bytes(64, 48, (200, 30, 30)))
# Written out, not computed with the mock's own code: a decoding bug would show on both sides otherwise.
CAPTION = "A dark wide image of 64x48 pixels with mean colour #c81e1e and content hash 5556a38f02."
REASONING = "The request holds 1 image(s); I describe each in one sentence."


def answer(service, headers, system, **overrides) -> dict:
    body = nv_ingest_body(URL, **overrides)
    body["messages"][0]["content"] = system
    response = requests.post(service.chat_url, json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_think_returns_reasoning_apart_from_the_caption(mock_service, auth_headers):
    body = answer(mock_service, auth_headers, "/think")
    message = body["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (REASONING, CAPTION)
    assert body["usage"]["completion_tokens"] == len(REASONING.split()) + len(CAPTION.split()) + 1


def test_no_think_and_enable_thinking_false_return_the_caption_alone(mock_service, auth_headers):
    for system, kwargs in (("/no_think", None), ("/think", {"enable_thinking": False})):
        extra = {"chat_template_kwargs": kwargs} if kwargs else {}
        message = answer(mock_service, auth_headers, system, **extra)["choices"][0]["message"]
        assert message["content"] == CAPTION and "reasoning_content" not in message


def test_a_stop_string_inside_the_reasoning_ends_the_answer_there(mock_service, auth_headers):
    body = answer(mock_service, auth_headers, "/think", stop=["describe"])
    message = body["choices"][0]
    assert message["message"]["reasoning_content"] == "The request holds 1 image(s); I "
    assert message["message"]["content"] == "" and message["finish_reason"] == "stop"


def test_streamed_reasoning_comes_before_the_caption(mock_service, auth_headers):
    body = nv_ingest_body(URL, stream=True)
    body["messages"][0]["content"] = "/think"
    with requests.post(mock_service.chat_url, json=body, headers=auth_headers, stream=True, timeout=30) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1] == b"[DONE]"
    deltas = [json.loads(line)["choices"][0]["delta"] for line in lines[:-1] if json.loads(line)["choices"]]
    kinds = ["r" if d.get("reasoning_content") else "c" for d in deltas
             if d.get("reasoning_content") or d.get("content")]
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds  # all reasoning, then content
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == CAPTION
