"""bench/mixed.py: the seeded length draw, the summary math, the JSON shape, and a run against the mock service."""

from __future__ import annotations

import json

import pytest

from bench import mixed
from bench.run import Sample


def test_max_tokens_draw_is_seeded_and_uses_only_the_choices():
    first = mixed.draw_max_tokens(48, seed=0)
    assert first == mixed.draw_max_tokens(48, seed=0)
    assert len(first) == 48 and set(first) <= {8, 32, 128, 256}
    assert set(mixed.draw_max_tokens(400, seed=0)) == {8, 32, 128, 256}  # every length turns up
    assert mixed.draw_max_tokens(48, seed=1) != first
    assert set(mixed.draw_max_tokens(20, 3, (5, 7))) <= {5, 7}


def test_choices_parse():
    assert mixed.parse_choices("8, 32,128") == (8, 32, 128)
    for bad in ("", "0,8", "a,b"):
        with pytest.raises(Exception):
            mixed.parse_choices(bad)


def test_mixed_summary_math():
    samples = [Sample(True, 200, 0.1 * k, completion_tokens=10 * k) for k in range(1, 5)]
    samples.append(Sample(False, 500, 9.0, completion_tokens=999))  # failed: counted as a request only
    out = mixed.summarize_mixed(samples, {"HTTP 500": 1}, 2.0, 4, [8, 8, 32, 256, 32])
    assert out["requests"] == 5 and out["ok"] == 4
    assert out["completion_tokens"] == 100 and out["requested_max_tokens"] == 336
    assert out["completion_tokens_per_s"] == pytest.approx(50.0)
    assert out["captions_per_s"] == pytest.approx(2.0)
    assert out["mean_completion_tokens"] == pytest.approx(25.0)
    assert out["latency_ms"]["p50"] == pytest.approx(250.0)  # of 100, 200, 300, 400 ms
    assert out["latency_ms"]["p95"] == pytest.approx(385.0)
    assert out["max_tokens_counts"] == {"8": 2, "32": 2, "256": 1}
    by = out["latency_ms_by_max_tokens"]
    assert by["8"]["p50"] == pytest.approx(150.0) and by["32"]["p50"] == pytest.approx(300.0)  # the failure is out
    assert by["256"]["p50"] == pytest.approx(400.0)
    assert [r["max_tokens"] for r in out["samples"]] == [8, 8, 32, 256, 32]
    assert out["samples"][4] == {"max_tokens": 32, "ok": False, "latency_ms": pytest.approx(9000.0),
                                 "completion_tokens": 999}
    assert json.loads(json.dumps(out)) == out  # plain JSON types only


def test_short_summary_ratio():
    out = mixed.summarize_short([0.05, 0.02, 0.03], 0.3, [1.0, 1.1], 2, 1, 4, 200, 1.0)
    assert out["alone_median_ms"] == pytest.approx(30.0)
    assert out["under_load_ms"] == pytest.approx(300.0)
    assert out["ratio"] == pytest.approx(10.0)
    assert out["long_count"] == 2 and out["long_running_at_send"] == 2 and out["long_running_at_answer"] == 1
    assert mixed.summarize_short([], None, [], 0, 0, 4, 200, 1.0)["ratio"] is None


def test_end_to_end_against_the_mock_service(mock_service, tmp_path, capsys):
    from tests.conftest import API_KEY

    out = tmp_path / "r" / "mixed.json"
    code = mixed.main(["--url", mock_service.url, "--requests", "6", "--concurrency", "3", "--warmup", "1",
                       "--long-count", "2", "--long-tokens", "8", "--load-delay", "0.05", "--alone-repeats", "2",
                       "--api-key", API_KEY, "--label", "mock", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["label"] == "mock" and len(data["loadavg_before"]) == 3 and len(data["loadavg_after"]) == 3
    assert data["server_metadata"]["mock"] is True
    assert data["max_tokens"] == mixed.draw_max_tokens(6, 0)
    m = data["mixed"]
    assert m["ok"] == 6 and not m["errors"] and m["concurrency"] == 3
    # Mock captions are whitespace words, ~20 of them: the longer lengths stop at EOS.
    assert 0 < m["completion_tokens"] <= m["requested_max_tokens"]
    assert m["completion_tokens_per_s"] == pytest.approx(m["completion_tokens"] / m["wall_s"])
    assert 0 < m["latency_ms"]["p50"] <= m["latency_ms"]["p95"]
    s = data["short"]
    assert len(s["alone_ms"]) == 2 and len(s["long_latency_ms"]) == 2
    assert s["ratio"] == pytest.approx(s["under_load_ms"] / s["alone_median_ms"])
    table = capsys.readouterr().out
    assert "| metric | mock |" in table and "| mixed: ok / requests | 6 / 6 |" in table

    only_mixed = dict(data, label="no short", short=None)
    (tmp_path / "m.json").write_text(json.dumps(only_mixed))
    assert mixed.main(["--compare", str(out), str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    assert "| metric | mock | no short |" in table
    assert "| short: under load / alone | " in table and table.count(" | - |") == 6  # the six short rows


def test_failures_are_counted(mock_service, tmp_path):
    out = tmp_path / "bad.json"
    code = mixed.main(["--url", mock_service.url, "--requests", "2", "--concurrency", "2", "--warmup", "0",
                       "--skip-short", "--api-key", "wrong-key", "--out", str(out)])
    assert code == 1
    assert json.loads(out.read_text())["mixed"]["errors"] == {"HTTP 401": 2}
