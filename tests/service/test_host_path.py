"""The token path between a real worker process and its API server: every step's outputs go as one
message, and many requests in flight together, streamed or not, still get exactly their own answers
(text, usage, finish_reason). STEP_LOG records one line per engine step."""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import data_url, mock_caption_for, noise_png, nv_ingest_body

STEP_LOG = os.path.join(tempfile.gettempdir(), f"step-log-{uuid.uuid4().hex}.jsonl")
FAST = {"ENABLE_MOCK_INFERENCE": "1", "NIM_REQUIRE_AUTH": "0", "MOCK_TOKEN_DELAY": "0", "MAX_BATCH_SIZE": "8",
        "STEP_LOG": STEP_LOG}
KEYS = {"t", "prefill_tokens", "prefill_rows", "decode_rows", "running", "waiting", "gpu_ms", "host_ms"}


def streamed(url: str, body: dict) -> dict:
    """A streamed answer put together as a non-streamed one would read."""
    content, finish, usage = [], None, None
    with requests.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                       stream=True, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix(b"data: "))
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            content.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    return {"content": "".join(content), "finish_reason": finish, "usage": usage}


def plain(url: str, body: dict) -> dict:
    response = requests.post(url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    choice = answer["choices"][0]
    return {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"], "usage": answer["usage"]}


@pytest.mark.server(FAST)
def test_many_requests_in_flight_get_their_own_answers_streamed_or_not_and_every_step_is_logged(server):
    images = [noise_png(64 + 8 * i, 48, seed=i) for i in range(12)]
    jobs = []
    for i, image in enumerate(images):
        long = i % 3 == 0  # past the caption's EOS: (greedy) the caption over and over, cut at max_tokens
        body = nv_ingest_body(data_url(image), temperature=0.0 if i % 2 or long else 1.0,
                              **({"max_tokens": 300, "ignore_eos": True} if long else {}))
        jobs += [(i, long, body, False), (i, long, body, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: (streamed if job[3] else plain)(server.chat_url, job[2]), jobs))
    by_image: dict[int, list[dict]] = {}
    for (i, long, _, _), answer in zip(jobs, answers):
        by_image.setdefault(i, []).append(answer)
        caption = mock_caption_for(images[i])
        words = caption.split()
        if long:
            assert answer["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 300
            assert answer["content"].startswith(caption) and len(answer["content"].split()) == 300
        else:
            assert answer["content"] == caption and answer["finish_reason"] == "stop"
            assert answer["usage"]["completion_tokens"] == len(words) + 1  # the EOS counts
    for i, (a, b) in by_image.items():  # streamed and not: the same answer, the same usage
        assert a == b, (i, a, b)

    lines = [json.loads(line) for line in open(STEP_LOG)]
    assert lines and all(set(line) == KEYS for line in lines)
    assert all(line["gpu_ms"] >= 0 and line["host_ms"] >= 0 and line["running"] <= 8 for line in lines)
    # Every sampled row is one completion token: a request's first comes from its last prefill chunk (a
    # long prompt takes several chunks of MAX_PREFILL_TOKENS), the others from decoding rows.
    total = sum(a["usage"]["completion_tokens"] for a in answers)
    assert sum(line["decode_rows"] for line in lines) == total - len(answers)
    assert sum(line["prefill_rows"] for line in lines) >= len(answers)
    assert sum(line["prefill_tokens"] for line in lines) == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert 1 < max(line["decode_rows"] for line in lines) <= 8  # requests decoded together, within the batch
    assert all(a["t"] <= b["t"] for a, b in zip(lines, lines[1:]))
