"""bench/ops.py: kernels counted on the CPU (views and no-op casts excluded, Triton launches counted), and
`python -m bench.ops` end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bench import ops
from tests.helpers import ROOT


def test_counter_counts_kernels_not_views():
    counter = ops.OpCounter()
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(16, 8, dtype=torch.bfloat16)
    with torch.inference_mode(), counter, counter.counting():
        y = x.view(8, 4).t().contiguous()  # views, then one copy
        z = x.to(torch.bfloat16)  # same dtype: no copy
        z = z.to(torch.float32)  # a cast: one kernel
        torch.nn.functional.linear(x, w)  # one GEMM
        torch.empty(3)  # allocation only
        torch.tensor([1, 2, 3])  # from the host: a copy, not a kernel
    names = {name: n for (_, name), n in counter.kernels.items()}
    assert names == {"clone": 1, "_to_copy": 1, "mm": 1}, names
    assert counter.host["copies"] == 1
    assert y.shape == (4, 8) and z.dtype == torch.float32


def test_counter_attributes_ops_to_parts():
    counter = ops.OpCounter()
    double = counter.in_part("decode", lambda t: t * 2)
    x = torch.ones(2)
    with torch.inference_mode(), counter, counter.counting():
        double(x) + 1
    assert counter.by_part() == {"decode": 1, "engine": 1}


def test_triton_launches_are_counted_without_running():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _fill(out_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, 1.0, mask=i < n)

    counter = ops.OpCounter()
    out = torch.zeros(4)
    with ops.TritonLaunches(counter) as launches, counter, counter.counting():
        _fill[(1,)](out, 4, BLOCK=4)
        from model.kernels import backend

        assert backend.use_triton(torch.zeros(1))  # CPU tensors routed to the kernels while counting
    assert launches.available and "model.kernels.backend.force_triton" in launches.forced
    assert counter.kernels[("engine", "triton:_fill")] == 1
    assert out.sum() == 0  # counted, not run
    assert backend.use_triton(torch.zeros(1)) is False  # and no longer after


@pytest.mark.slow
def test_ops_writes_the_counts(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.ops", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "ops.json").read_text())
    assert set(data["decode_kernels"]) == {"1", "64"} and set(data["prefill_kernels"]) == {"1_tile", "7x1_tile"}
    assert all(v > 100 for v in [*data["decode_kernels"].values(), *data["prefill_kernels"].values()])
    assert data["prefill_kernels"]["7x1_tile"] >= data["prefill_kernels"]["1_tile"]
    assert "kernels per decoding step" in run.stdout
