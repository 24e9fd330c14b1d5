"""Load on loopback, bounded in count and time: 2,000 requests at concurrency 64 through batches of 8.

Every image is distinct, so a caption delivered to the wrong request (cross-talk between the
requests of one batch, or a response-buffer mix-up) is caught; the server's memory is sampled
through /proc before and after, since LitServe's OpenAI spec is known to leak buffer entries
(upstream #452).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from model.images import decode_data_url

from tests.helpers import Service, data_url, nv_ingest_body, png_bytes, mock_caption_for

CONCURRENCY = 64
REQUESTS = 2000
WARM_UP = 400
MAX_RSS_GROWTH = 50 * 1024 * 1024
_local = threading.local()


def _image_url(i: int) -> str:
    # 8x8 solid colour, unique per index: small to send, distinct mean colour and hash in the caption.
    return data_url(png_bytes(8, 8, (i % 256, (i // 256) % 256, 77)))


def _expected(urls: list[str]) -> list[str]:
    return [mock_caption_for(decode_data_url(url, 10**8)) for url in urls]


def _post(service: Service, url: str) -> requests.Response:
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session.post(service.chat_url, json=nv_ingest_body(url), timeout=60)


def _burst(service: Service, urls: list[str]) -> list[requests.Response]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda url: _post(service, url), urls))


def _tree_rss(pgid: int) -> int:
    """Resident bytes of every process in the server's process group (API servers, workers)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields[2] is pgrp, after state and ppid
                continue
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue  # exited while we looked
    return total


def _caption(response: requests.Response) -> str:
    assert response.status_code == 200, (response.status_code, response.text[:300])
    body = response.json()
    assert len(body["choices"]) == 1
    return body["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def batched_service(tmp_path_factory):
    service = Service({"ENABLE_MOCK_INFERENCE": "1", "MAX_BATCH_SIZE": "8",
                       "MAX_QUEUED_REQUESTS": "4096", "LOG_LEVEL": "warning"},
                      tmp_path_factory.mktemp("logs") / "load.log")
    yield service
    service.stop()


def test_load_every_request_gets_its_own_caption_and_memory_is_stable(batched_service):
    service = batched_service
    start = time.monotonic()
    warm_urls = [_image_url(REQUESTS + i) for i in range(WARM_UP)]
    assert [_caption(r) for r in _burst(service, warm_urls)] == _expected(warm_urls)
    rss_before = _tree_rss(service.proc.pid)
    assert rss_before > 0

    urls = [_image_url(i) for i in range(REQUESTS)]
    assert len(set(urls)) == REQUESTS
    expected = _expected(urls)
    assert len(set(expected)) == REQUESTS  # distinct captions, so a swap cannot go unnoticed
    responses = _burst(service, urls)
    rss_after = _tree_rss(service.proc.pid)
    elapsed = time.monotonic() - start

    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: REQUESTS}, statuses
    captions = [_caption(r) for r in responses]
    wrong = [i for i, (got, want) in enumerate(zip(captions, expected)) if got != want]
    assert not wrong, f"{len(wrong)} requests got another request's caption, e.g. #{wrong[0]}"
    ids = {r.json()["id"] for r in responses}
    request_ids = {r.headers.get("x-request-id") for r in responses}
    assert len(ids) == len(request_ids) == REQUESTS  # one answer per request, none duplicated
    growth = rss_after - rss_before
    assert growth < MAX_RSS_GROWTH, f"server RSS grew {growth / 2**20:.1f} MiB over {REQUESTS} requests"
    assert service.proc.poll() is None, service.log()
    print(f"\n{REQUESTS + WARM_UP} requests in {elapsed:.1f} s; RSS {rss_before / 2**20:.0f} -> "
          f"{rss_after / 2**20:.0f} MiB")
    assert elapsed < 90


def test_burst_over_a_small_queue_gets_only_200s_and_429s(tmp_path):
    # MOCK_TOKEN_DELAY keeps each request in flight for a few ms, so 64 clients overrun 8 slots.
    service = Service({"ENABLE_MOCK_INFERENCE": "1", "MAX_BATCH_SIZE": "8",
                       "MAX_QUEUED_REQUESTS": "8", "MOCK_TOKEN_DELAY": "0.001", "LOG_LEVEL": "warning"},
                      tmp_path / "queue.log")
    try:
        urls = [_image_url(i) for i in range(REQUESTS)]
        expected = _expected(urls)
        responses = _burst(service, urls)
        statuses = Counter(r.status_code for r in responses)
        assert set(statuses) <= {200, 429}, statuses
        assert statuses[429] >= 1 and statuses[200] >= 1, statuses
        for response, want in zip(responses, expected):
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["error"]["type"] == "rate_limit_error"
            else:
                assert _caption(response) == want
        assert service.proc.poll() is None, service.log()
        # Once the burst is over, the slots are free again: nothing leaked from the refused requests.
        assert _caption(_post(service, urls[0])) == expected[0]
    finally:
        service.stop()
