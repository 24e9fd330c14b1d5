"""The real engine behind the real server, on the tiny random-weight checkpoint (CPU)."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import (MODEL_NAME, Service, data_url, decode_steps_since, expected_tiles, metric_values,
                           nv_ingest_body)


def noise_url(width, height, seed) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return data_url(buf.getvalue())


pytestmark = pytest.mark.slow  # a real-engine server on the tiny checkpoint: CI runs it, the quick run does not

PROMPTS = ["Caption the content of this image:", "Describe every detail of this chart, axis by axis, please.",
           "What?", "Caption the content of this image: " * 5]
SIZES = [(640, 480), (256, 256), (1920, 1080), (100, 40)]


def body(i, **overrides):
    b = nv_ingest_body(noise_url(*SIZES[i], seed=i), temperature=0, max_tokens=10)
    b["messages"][1]["content"][0]["text"] = PROMPTS[i]
    b.update(overrides)
    return b


def post(service, b):
    response = requests.post(service.chat_url, json=b, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def concurrently(service, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: post(service, b), bodies))


def batched_concurrently(service, bodies):
    """`concurrently`, checking from /metrics that the engine decoded several of these requests together:
    every token after a request's first (which its prefill yields) is one decoding row, and some engine
    step held more than one row (requests run one after another never do)."""
    before = metric_values(service)
    results = concurrently(service, bodies)
    rows = sum(r["usage"]["completion_tokens"] - 1 for r in results)
    decoded, steps, batched = decode_steps_since(service, before, rows)
    assert decoded == rows, (decoded, rows)
    assert batched >= 1 and steps < rows, f"no step decoded two of these requests together ({steps} steps)"
    return results


def test_nv_ingest_request_and_prompt_tokens_follow_tiles(tiny_service):
    result = post(tiny_service, nv_ingest_body(noise_url(640, 480, 9), max_tokens=8))
    assert isinstance(result["choices"][0]["message"]["content"], str)
    # "length" exactly when max_tokens cut it; EOS (counted, as vLLM does) ends it otherwise.
    completion = result["usage"]["completion_tokens"]
    assert 1 <= completion <= 8
    assert result["choices"][0]["finish_reason"] == ("length" if completion == 8 else "stop")
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + completion
    one_tile = post(tiny_service, nv_ingest_body(noise_url(512, 512, 9), max_tokens=8))
    # 640x480 is 12 tiles + thumbnail = 13 tiles, 512x512 is one: 12 x 256 more image tokens.
    assert result["usage"]["prompt_tokens"] - one_tile["usage"]["prompt_tokens"] == 12 * 256


def test_greedy_batched_equals_unbatched(tiny_service):
    alone = [post(tiny_service, body(i)) for i in range(4)]
    together = batched_concurrently(tiny_service, [body(i) for i in range(4)])
    for a, t in zip(alone, together):
        assert a["choices"][0]["message"]["content"] == t["choices"][0]["message"]["content"]
        assert a["usage"] == t["usage"]
    assert len({a["choices"][0]["message"]["content"] for a in alone}) > 1


def test_per_request_settings_inside_one_batch(tiny_service):
    reference = post(tiny_service, body(0, max_tokens=12))["choices"][0]["message"]["content"]
    stop_at = reference.strip()[3:6]
    sampled = body(1, temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    bodies = [body(0, max_tokens=3), body(0, max_tokens=12, stop=[stop_at]), sampled, sampled,
              body(2, max_tokens=5)]
    short, stopped, seeded_a, seeded_b, five = batched_concurrently(tiny_service, bodies)
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stop_at not in stopped["choices"][0]["message"]["content"]
    assert reference.startswith(stopped["choices"][0]["message"]["content"])
    assert seeded_a["choices"][0]["message"]["content"] == seeded_b["choices"][0]["message"]["content"]
    assert five["usage"]["completion_tokens"] == 5


def test_multi_image_request(tiny_service):
    b = body(0)
    b["messages"][1]["content"] += [{"type": "image_url", "image_url": {"url": noise_url(300, 200, s)}}
                                     for s in (20, 21, 22)]
    result = post(tiny_service, b)
    single = post(tiny_service, body(0))
    # Each more image: its tiles' 256 tokens each, <img> and </img>, and the newline after its placeholder.
    tiles = expected_tiles(300, 200)
    assert tiles == 7  # a 3x2 grid and the thumbnail
    assert result["usage"]["prompt_tokens"] - single["usage"]["prompt_tokens"] == 3 * (256 * tiles + 2 + 1)


def test_streaming_matches_non_streaming(tiny_service):
    client = openai.OpenAI(base_url=f"{tiny_service.url}/v1", api_key="unused", max_retries=0)
    b = body(3)
    messages = b["messages"]
    full = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    pieces = []
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == full.choices[0].message.content
    assert len(pieces) > 1


def test_think_puts_reasoning_apart(tiny_service):
    b = body(0, max_tokens=40)
    b["messages"][0]["content"] = "/think"
    message = post(tiny_service, b)["choices"][0]["message"]
    # The tiny random model rarely closes its reasoning: all text is then reasoning, none is answer.
    assert message.get("reasoning_content")
    assert "<think>" not in message["content"] and "</think>" not in message.get("reasoning_content", "")
    with requests.post(tiny_service.chat_url, json={**b, "stream": True}, stream=True, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]
    streamed = "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in events if e["choices"])
    assert streamed == message["reasoning_content"]


def test_extreme_but_valid_sampling_settings_in_one_batch(tiny_service):
    bodies = [body(0, temperature=1e-300), body(1, seed=2**64 - 1, temperature=1.0), body(2, top_p=1e-9,
                                                                                          temperature=2.0)]
    results = batched_concurrently(tiny_service, bodies)
    assert all(r["choices"][0]["finish_reason"] in ("stop", "length") for r in results)
    # A temperature this small is greedy.
    assert results[0]["choices"][0]["message"]["content"] == post(tiny_service, body(0))["choices"][0]["message"]["content"]
    # A top_p this small keeps only the most likely token, whatever the temperature: greedy too.
    assert results[2]["choices"][0]["message"] == post(tiny_service, body(2))["choices"][0]["message"]
    # The largest seed is a seed like any other: the same caption again.
    assert results[1]["choices"][0]["message"] == post(tiny_service, bodies[1])["choices"][0]["message"]


def test_null_temperature_and_top_p_mean_the_checkpoint_defaults(tiny_service, tiny_path):
    """null (or absent) temperature and top_p take generation_config.json's values, else vLLM's 1.0: the tiny
    checkpoint sets neither, so a seeded null request samples exactly as temperature=1.0, top_p=1.0 does."""
    generation_config = json.loads((tiny_path / "generation_config.json").read_text())
    assert "temperature" not in generation_config and "top_p" not in generation_config
    common = dict(seed=4321, max_tokens=12, ignore_eos=True)
    explicit = post(tiny_service, body(1, temperature=1.0, top_p=1.0, **common))["choices"][0]["message"]
    nulls = post(tiny_service, body(1, temperature=None, top_p=None, **common))["choices"][0]["message"]
    absent = body(1, **common)
    del absent["temperature"], absent["top_p"]
    assert nulls == explicit == post(tiny_service, absent)["choices"][0]["message"]
    # Not greedy, nor a narrower top_p: the defaults make a difference here that the comparison would show.
    assert nulls != post(tiny_service, body(1, temperature=0, **common))["choices"][0]["message"]
    assert nulls != post(tiny_service, body(1, temperature=1.0, top_p=0.5, **common))["choices"][0]["message"]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(temperature=st.one_of(st.none(), st.floats(0, 2)), top_p=st.one_of(st.none(), st.floats(1e-12, 1)),
       seed=st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
       stop=st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
       text=st.text(max_size=40), max_tokens=st.integers(1, 6))
def test_fuzzed_sampling_and_text_never_5xx(tiny_service, temperature, top_p, seed, stop, text, max_tokens):
    b = body(1, temperature=temperature, top_p=top_p, seed=seed, stop=stop, max_tokens=max_tokens)
    b["messages"][1]["content"][0]["text"] = text
    response = requests.post(tiny_service.chat_url, json=b, timeout=120)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_server_whose_slots_cannot_hold_one_largest_request_refuses_to_start(tiny_path, tmp_path):
    with pytest.raises(RuntimeError) as failed:
        Service({"MODEL_ID": str(tiny_path), "NIM_REQUIRE_AUTH": "0", "MAX_MODEL_LEN": "1000"}, tmp_path / "nofit.log",
                startup_timeout=120)
    message = str(failed.value)
    assert "13-tile request does not fit" in message and "MAX_MODEL_LEN" in message


def first_chunk(service, b) -> dict:
    """Stream `b` and return its first chunk that carries text or a finish, then leave (the server aborts the
    rest): proof that the request was admitted and is generating, without waiting for all its tokens."""
    with requests.post(service.chat_url, json=dict(b, stream=True), stream=True, timeout=180) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            assert line != b"data: [DONE]", "the stream ended without a chunk"
            chunk = json.loads(line[len(b"data: "):])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            if choice["delta"].get("content") or choice["delta"].get("reasoning_content") or choice.get("finish_reason"):
                return chunk
    raise AssertionError("the stream closed without [DONE]")


def test_requests_over_the_slot_length_get_400_and_the_others_go_on(tiny_service):
    """Prompt plus max_tokens over MAX_MODEL_LEN (16,384), by the images alone or by one token, gets 400; a
    request that fits is streamed and left after its first token: what is tested is its admission, not 4,096
    tokens of output. (Exactly at the limit: tests/service/test_prompt_check.py and the engine's tests.)"""
    first_chunk(tiny_service, body(0, max_tokens=4096, max_completion_tokens=None))  # 3,375 + 4,096 fit
    big = nv_ingest_body(noise_url(640, 480, 1), max_tokens=4096)
    big["messages"][1]["content"][1:] = [{"type": "image_url", "image_url": {"url": noise_url(640, 480, k)}}
                                         for k in range(1, 5)]
    for max_tokens, counted in ((4096, "images alone are"), (16384 - 4 * (13 * 256 + 2), "needs")):
        refused = requests.post(tiny_service.chat_url, json=dict(big, max_tokens=max_tokens), timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "request_too_large", refused.text
        assert "MAX_MODEL_LEN" in refused.json()["error"]["message"] and counted in refused.json()["error"]["message"]
    prompt_tokens = int(re.search(r"needs (\d+) prompt tokens", refused.json()["error"]["message"]).group(1))
    over = requests.post(tiny_service.chat_url, json=dict(big, max_tokens=16384 - prompt_tokens + 1), timeout=60)
    assert over.status_code == 400 and over.json()["error"]["code"] == "request_too_large", over.text
    post(tiny_service, body(1))


def test_text_that_spells_an_image_placeholder_gets_400(tiny_service):
    forged = body(2)
    forged["messages"][1]["content"][0]["text"] = "Caption <image> this"
    response = requests.post(tiny_service.chat_url, json=forged, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "special_token_in_text"
    post(tiny_service, body(2))


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_a_special_token_joined_by_the_thinking_switch_is_a_400_not_a_500(tiny_service, enable_thinking):
    """`<ima/thinkge>` becomes `<image>` once the switch is taken out of the system prompt: refused with the
    client's 400, and the next request is served."""
    b = body(0, chat_template_kwargs={"enable_thinking": enable_thinking})
    b["messages"][0]["content"] = "<ima/thinkge> Be brief."
    response = requests.post(tiny_service.chat_url, json=b, timeout=120)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "special_token_in_text"
    post(tiny_service, body(0))
