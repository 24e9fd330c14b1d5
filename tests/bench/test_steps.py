"""bench/steps.py: the service's per-step log, read (a half-written last line skipped) and summarised per window."""

from __future__ import annotations

import json

import pytest

from bench.steps import read_steps, summarize_steps


def test_step_log_summary(tmp_path):
    path = tmp_path / "steps.jsonl"
    lines = [{"t": 100.0 + i, "prefill_tokens": 2048 if i % 4 == 0 else 0, "prefill_rows": 1 if i % 4 == 0 else 0,
              "decode_rows": 64, "running": 64, "waiting": 3, "gpu_ms": 20.0 + i, "host_ms": 5.0} for i in range(8)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"t\": 200, \"gpu_")  # a half-written last line
    records = read_steps(path)
    assert len(records) == 8
    whole = summarize_steps(records)
    assert whole["steps"] == 8 and whole["mean_decode_rows"] == 64 and whole["share_with_prefill"] == 0.25
    assert whole["gpu_ms"]["mean"] == pytest.approx(23.5) and whole["gpu_ms"]["p50"] == pytest.approx(23.5)
    assert whole["host_ms"] == {"mean": 5.0, "p50": 5.0, "p90": 5.0}
    assert whole["host_share_of_wall"] == pytest.approx(40 / (188 + 40), abs=1e-3)
    window = summarize_steps(records, 102.0, 104.0)
    assert window["steps"] == 2 and window["share_with_prefill"] == 0.0
    assert read_steps(tmp_path / "absent.jsonl") is None
    assert summarize_steps([], 0, 1)["steps"] == 0
