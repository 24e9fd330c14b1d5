"""bench/http_loop.py: answers counted in the measured window only, and a closed loop against the mock service."""

from __future__ import annotations

import pytest

from bench.http_loop import Completion, Limits, closed_loop, window_summary


def test_window_counts_only_answers_inside_it():
    completions = [Completion(0.0, 0.5, True, 128),  # warm-up: not counted
                   Completion(0.2, 1.0, True, 128), Completion(0.4, 1.5, True, 128),
                   Completion(0.9, 2.5, False, 0, "HTTP 500"),
                   Completion(1.0, 3.0, True, 128)]  # at the window's end: out
    out = window_summary(completions, 1.0, 3.0)
    assert out["answered"] == 3 and out["ok"] == 2 and out["errors"] == {"HTTP 500": 1}
    assert out["captions_per_s"] == pytest.approx(1.0) and out["output_tokens_per_s"] == pytest.approx(128.0)
    assert out["latency_ms"]["p50"] == pytest.approx(950.0)  # of 800 and 1,100 ms
    assert window_summary([], 0.0, 1.0)["captions_per_s"] == 0.0


def test_closed_loop_against_the_mock_service(mock_service):
    from bench.run import build_body, parse_args
    from bench.images import make_image
    from tests.conftest import API_KEY

    args = parse_args(["--url", mock_service.url, "--max-tokens", "4", "--ignore-eos"])
    bodies = [build_body(make_image(i, 64, 64), args) for i in range(3)]
    headers = {"Accept": "application/json", "Authorization": f"Bearer {API_KEY}"}
    out = closed_loop(f"{mock_service.url}/v1/chat/completions", bodies, 3, Limits(5.0, 5.0, 12, 5.0), headers)
    assert out["warmup_answers"] >= 3 and out["ok"] >= 12 and not out["errors"]
    assert out["window_s"] < 5.0  # ended on the count, not the cap
    assert out["captions_per_s"] == pytest.approx(out["ok"] / out["window_s"], rel=1e-2)
    assert out["mean_completion_tokens"] == 4 and out["still_out_after_drain"] == 0
    assert out["window_unix"][0] < out["window_unix"][1]
