"""CAPTION_CACHE_SIZE through HTTP: identical greedy requests are generated once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import data_url, nv_ingest_body, png_bytes
from tests.helpers import metric_values

GREEDY = nv_ingest_body(data_url(png_bytes(70, 50, (1, 2, 3))), temperature=0)


@pytest.mark.server({"ENABLE_MOCK_INFERENCE": "1", "NIM_REQUIRE_AUTH": "0", "CAPTION_CACHE_SIZE": "8",
                     "MOCK_TOKEN_DELAY": "0.05"}, own=True)  # its own: the counters start at 0
def test_cache_generates_identical_requests_once(server):
    with ThreadPoolExecutor(4) as pool:  # in flight together: one generation, three joiners
        together = list(pool.map(lambda _: requests.post(server.chat_url, json=GREEDY, timeout=30), range(4)))
        later = requests.post(server.chat_url, json=GREEDY, timeout=30)
        sampled = list(pool.map(lambda _: requests.post(server.chat_url, json={**GREEDY, "temperature": 1.0},
                                                        timeout=30), range(2)))  # each its own generation
    values = metric_values(server)
    captions = {r.json()["choices"][0]["message"]["content"] for r in [*together, later, *sampled]}
    assert len(captions) == 1
    assert values[("caption_cache_misses_total", ())] == 1
    assert values[("caption_cache_hits_total", ())] == 4
    # One greedy generation plus the two uncached sampled ones.
    assert values[("caption_completion_tokens_total", ())] == 3 * later.json()["usage"]["completion_tokens"]
