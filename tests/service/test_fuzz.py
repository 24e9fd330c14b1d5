"""Property-based fuzzing of the chat-completions body against the running mock server.

Whatever arrives (random JSON, a mutated nv-ingest body, random bytes), the server answers within
a timeout, never with a 5xx, every non-200 in the OpenAI error shape, and each test ends by checking
that the server still answers a good request exactly (no test relies on another having run).
Bounded: 300 examples in all, no database written, no per-example deadline. Derandomized: every run
draws the same examples (a fixed seed per test), so a failure is a defect to fix and not a roll of the dice.
"""

from __future__ import annotations

import copy
import json

import requests
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import data_url, nv_ingest_body, png_bytes

GOOD_URL = data_url(png_bytes(40, 32, (20, 90, 160)))
# The mock's caption of GOOD_URL, computed once and pasted (see tests/helpers.py for what each part encodes):
# mean of (20, 90, 160) is 90 -> dark; 40 > 32 -> wide; #145aa0 = (20, 90, 160); the hash pins the pixels.
GOOD_CAPTION = "A dark wide image of 40x32 pixels with mean colour #145aa0 and content hash 8f36a730f4."
TIMEOUT = 15  # seconds per request: a hang fails the example instead of the whole run
FUZZ = dict(deadline=None, database=None, print_blob=True, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Keys the server actually looks at, so that random structures reach past the first check.
KEYS = st.sampled_from(["model", "messages", "role", "content", "type", "text", "image_url", "url", "detail",
                        "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream",
                        "stream_options", "include_usage", "n", "seed", "stop", "name"]) | st.text(max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
           | st.sampled_from(["user", "system", "assistant", "developer", "tool", "image_url", "text",
                              GOOD_URL, "data:image/png;base64,", "data:image/png;base64,AAAA",
                              "http://169.254.169.254/", "file:///etc/passwd", "nvidia/nemotron-nano-12b-v2-vl"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=6),
                    max_leaves=25)


def _paths(node, prefix=()):
    """Every place in a JSON document that a mutation can touch."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated_bodies(draw):
    body = copy.deepcopy(nv_ingest_body(GOOD_URL))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(_paths(body))))
        if not path:
            continue
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        op = draw(st.sampled_from(["replace", "delete", "add", "wrap", "duplicate"]))
        if op == "replace":
            parent[key] = draw(JSON)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(JSON)
        elif op == "add":
            parent.insert(key, draw(JSON))
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif isinstance(parent, list):
            parent.extend([copy.deepcopy(parent[key])] * draw(st.integers(1, 5)))
    return body


def _post(service, headers, **kwargs) -> requests.Response:
    return requests.post(service.chat_url, headers={**headers, "Content-Type": "application/json"},
                         timeout=TIMEOUT, **kwargs)


def _check(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code != 200:
        body = response.json()
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
        assert GOOD_URL[30:90] not in response.text  # an error never echoes the image back
        assert len(error["message"]) < 1000, error["message"][:200]  # nor any long value whole
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        assert '"server_error"' not in response.text, response.text[-500:]
    else:
        body = response.json()
        assert body["object"] == "chat.completion" and len(body["choices"]) == 1
        assert isinstance(body["choices"][0]["message"]["content"], str)


def _dumps(value) -> str:
    # NaN and Infinity go out as Python writes them: invalid JSON that lenient parsers accept.
    return json.dumps(value, allow_nan=True)


def _assert_still_serves(service, headers) -> None:
    """The server is alive and answers nv-ingest's request with the exact caption, after a test's fuzzing."""
    assert service.proc.poll() is None, service.log()
    response = _post(service, headers, data=json.dumps(nv_ingest_body(GOOD_URL)))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == GOOD_CAPTION
    # 7 words of prompt, 13 tiles (a 4x3 grid and the thumbnail); 15 words and the end token.
    assert response.json()["usage"] == {"prompt_tokens": 7 + 13 * 256, "completion_tokens": 16,
                                        "total_tokens": 7 + 13 * 256 + 16}


def test_random_json(mock_service, auth_headers):
    @settings(max_examples=100, **FUZZ)
    @given(body=JSON)
    def fuzz(body):
        _check(_post(mock_service, auth_headers, data=_dumps(body)))

    fuzz()
    _assert_still_serves(mock_service, auth_headers)


@pytest.mark.slow
def test_mutated_nv_ingest_body(mock_service, auth_headers):
    @settings(max_examples=150, **FUZZ)
    @given(body=mutated_bodies())
    def fuzz(body):
        _check(_post(mock_service, auth_headers, data=_dumps(body)))

    fuzz()
    _assert_still_serves(mock_service, auth_headers)


def test_random_bytes(mock_service, auth_headers):
    @settings(max_examples=50, **FUZZ)
    @given(raw=st.binary(max_size=4096) | st.builds(lambda s, cut: s[:cut], st.just(
        _dumps(nv_ingest_body(GOOD_URL)).encode()), st.integers(0, 2000)))
    def fuzz(raw):
        _check(_post(mock_service, auth_headers, data=raw))

    fuzz()
    _assert_still_serves(mock_service, auth_headers)
