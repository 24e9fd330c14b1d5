"""`python -m bench.gpu --tiny`: the GPU benchmark's whole code path on the CPU, with the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

KEYS = ["device", "commit", "decode_ms_per_token", "prefill_ms", "vit_ms_per_tile", "captions_per_s",
        "peak_memory_gb", "batch_invariance", "roofline"]


@pytest.mark.slow
def test_tiny_run_writes_every_figure(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == KEYS
    assert set(results["decode_ms_per_token"]) == {"1", "16", "64"}
    assert all(v > 0 for v in results["decode_ms_per_token"].values())
    assert set(results["prefill_ms"]) == {"1_tile", "13_tiles"}
    assert set(results["captions_per_s"]) == {"1tile_128tok_c16", "1tile_128tok_c64", "13tile_128tok_c16",
                                              "13tile_128tok_c64"}
    assert all(v and v > 0 for v in results["captions_per_s"].values()), results["captions_per_s"]
    assert results["batch_invariance"] == 1.0  # float32 on a CPU: exact
    assert results["roofline"]["decode_ms_per_token"]["1"] > 0
    extra = json.loads((tmp_path / "extra.json").read_text())
    assert extra["step_consistency"]["same_argmax"]
    assert "| decode ms/token, batch 1 |" in (tmp_path / "results.md").read_text()
