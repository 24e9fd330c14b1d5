"""`python -m bench.gpu`: the report, the level budgets and a missing step log, without a GPU; the whole code path
on the CPU with the tiny checkpoint (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import gpu
from bench.roofline import card, figures
from bench.steps import summarize_steps
from tests.helpers import ROOT

KEYS = ["device", "commit", "date", "quantization", "measured_bandwidth_tb_s", "measured_gemm_tflops",
        "decode_ms_per_token", "decode_ms", "prefill_ms", "prefill_step_ms", "vit_ms_per_tile", "captions_per_s",
        "peak_memory_gb", "memory_after_load_gb", "batch_invariance", "kernels_per_step", "step_log", "errors",
        "roofline"]


def test_level_limits_shrink_to_the_time_left():
    full = gpu.level_limits(20, 30, 10, 64, remaining=1000)
    assert (full.warmup_s, full.window_s, full.drain_s, full.min_completions) == (20, 30, 10, 256)
    half = gpu.level_limits(20, 30, 10, 64, remaining=45, reserve=15)
    assert half.warmup_s + half.window_s + half.drain_s == pytest.approx(30)
    assert gpu.level_limits(20, 30, 10, 64, remaining=20, reserve=15) is None


def test_missing_step_log_is_reported_not_fatal(tmp_path):
    run = gpu.Run(tmp_path, "NVIDIA H200", "abc1234", tiny=False)
    gpu.summarize_step_log(run, tmp_path / "steps.jsonl")
    assert run.results["step_log"]["present"] is False and not run.results["errors"]
    assert run.soft("a piece", lambda: 1 / 0, "fallback") == "fallback"
    assert run.results["errors"] == {"a piece": "ZeroDivisionError: division by zero"}


def test_report_scores_each_figure_against_the_cards_own_bound(tmp_path):
    run = gpu.Run(tmp_path, "NVIDIA H200", "abc1234", tiny=False)
    run.set_card(4.3e12, 700e12)
    r = run.results
    r["measured_bandwidth_tb_s"], r["measured_gemm_tflops"] = 4.3, 700.0
    r["decode_ms_per_token"] = {"1": 9.0, "16": 12.0, "64": 20.0}
    r["decode_ms"] = {"1_tile_greedy": dict(r["decode_ms_per_token"]), "13_tiles_t1": {"64": 22.0}}
    r["prefill_ms"] = {"1_tile": 80.0, "13_tiles": 400.0}
    r["prefill_step_ms"] = {"7x1_tile": 150.0, "13_tiles_first_2048": 300.0}
    r["vit_ms_per_tile"] = 3.5
    r["captions_per_s"] = {"1tile_128tok_c64": 19.12, "13tile_128tok_c64": None}
    r["step_log"] = {"present": True, "levels": {"1tile_128tok_c64": summarize_steps(
        [{"t": 1, "decode_rows": 60, "prefill_tokens": 0, "gpu_ms": 10, "host_ms": 2}])}}
    run.extra["profile"] = {"decode_b64_1_tile_eager": {
        "what": "CUDA kernels", "kernels": 1330, "memcpys": 3, "memsets": 0, "total_ms": 25.0,
        "top": [{"name": "ampere_bf16_gemm", "calls": 137, "ms": 15.0, "share": 0.6}],
        "sdpa_backends": {"q[64, 40, 1, 128] k[64, 8, 512, 128]": {"efficient": 6}}}}
    gpu.kernels_per_step(run)
    run.save()
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == KEYS
    assert results["quantization"] == "bf16" and results["kernels_per_step"] == {"decode_b64_1_tile_eager": 1330}
    roof = results["roofline"]
    assert roof["device"] == "H200 SXM 141GB" and roof["bandwidth_tb_s"] == 4.8 and roof["tflops"] == 989.0
    md = (tmp_path / "results.md").read_text()
    assert "**H200 SXM 141GB** (4.8 TB/s, 989.0 TFLOP/s dense bf16)" in md
    assert "copy 4.3 TB/s (90% of the spec)" in md
    bound = roof["captions_per_s"]["1tile_128tok_c64"]
    assert f"| captions/s, 1tile_128tok_c64 (HTTP) | 19.12 | {bound} | {19.12 / bound * 100:.0f}% |" in md
    assert "| captions/s, 13tile_128tok_c64 (HTTP) | n/a |" in md
    assert "decode ms/step, batch 64, 13-tile context, temperature 1 | 22.0 | " in md
    assert "q[64, 40, 1, 128] k[64, 8, 512, 128]: efficient x6" in md and "`ampere_bf16_gemm` | 137" in md
    assert "| 1tile_128tok_c64 | 1 | 60.0 | 0.0 |" in md
    assert "nan" not in md


def test_an_fp8_run_is_scored_against_the_fp8_roofline(tmp_path):
    run = gpu.Run(tmp_path, "NVIDIA H200", "abc1234", tiny=False)
    run.results["quantization"] = "fp8"
    run.set_card(4.3e12, 700e12)
    run.results["decode_ms_per_token"] = {"1": 4.0}
    run.extra["decode_floor_ms_at_measured_bandwidth"] = gpu.weights_floor_ms(4.3e12, run.quantization)
    run.save()
    roof = json.loads((tmp_path / "results.json").read_text())["roofline"]
    assert roof["quantization"] == "fp8" and roof["fp8_tflops"] == 1979.0
    assert roof["decode_ms_per_token"] == figures(gpu=run.gpu, quantization="fp8")["decode_ms_per_token"]
    assert roof["decode_ms_per_token"]["1"] < figures(gpu=run.gpu)["decode_ms_per_token"]["1"] * 0.6
    md = (tmp_path / "results.md").read_text()
    assert "1979.0 TFLOP/s dense FP8 for the FP8 linears" in md and "(target <= 1.5x)" in md


@pytest.mark.slow
def test_tiny_run_writes_every_figure(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == KEYS
    assert not results["errors"], results["errors"]
    assert set(results["decode_ms_per_token"]) == {"1", "16", "64"}
    assert set(results["decode_ms"]) == {"1_tile_greedy", "1_tile_t1", "13_tiles_greedy", "13_tiles_t1"}
    assert all(v > 0 for d in results["decode_ms"].values() for v in d.values())
    assert results["decode_ms_per_token"] == results["decode_ms"]["1_tile_greedy"]
    assert set(results["prefill_ms"]) == {"1_tile", "13_tiles"}
    assert set(results["prefill_step_ms"]) == {"1x1_tile", "4x1_tile", "7x1_tile", "13_tiles_first_2048"}
    assert set(results["captions_per_s"]) == {"1tile_128tok_c64", "13tile_128tok_c64"}
    assert all(v and v > 0 for v in results["captions_per_s"].values()), results["captions_per_s"]
    assert results["batch_invariance"] == 1.0  # float32 on a CPU: exact
    assert results["measured_bandwidth_tb_s"] > 0 and results["measured_gemm_tflops"] > 0
    assert results["step_log"]["present"] in (True, False)
    extra = json.loads((tmp_path / "extra.json").read_text())
    assert extra["step_consistency"]["same_argmax"]
    assert extra["prefill_step_tokens"]["7x1_tile"] == 7 * extra["prefill_step_tokens"]["1x1_tile"]
    profiles = extra["profile"]
    assert set(profiles) == {"prefill_7x1_tile", "decode_b64_1_tile_eager", "decode_b64_13_tiles_eager"}
    assert all(p["top"] and p["sdpa_backends"] for p in profiles.values())
    assert "| decode ms/step, batch 1, 1-tile context, greedy |" in (tmp_path / "results.md").read_text()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert set(files) <= {"results.json", "results.md", "extra.json", "server.log", "steps.jsonl", "log.txt"}


def test_the_tiny_run_says_what_it_ran_and_is_scored_against_nothing(tmp_path):
    run = gpu.Run(tmp_path, "cpu (tiny random checkpoint)", "abc1234", tiny=True)
    run.set_card(1e9, 1e9)
    run.results["decode_ms_per_token"] = {"1": 2.0}
    run.results["decode_ms"] = {"1_tile_greedy": {"1": 2.0}}
    run.results["captions_per_s"] = {"1tile_128tok_c64": 0.9}
    run.save()
    md = (tmp_path / "results.md").read_text()
    assert "tiny random checkpoint (float32) on the CPU" in md and "2 clients and 8-token captions" in md
    assert "full-size architecture" not in md and "Roofline:" not in md
    assert "| decode ms/step, batch 1, 1-tile context, greedy | 2.0 | None | n/a |" in md
    assert "| captions/s, 1tile_128tok_c64 (HTTP) | 0.9 | None | n/a |" in md
