"""model/runner.py: what a loaded runner built, read on the CPU (dtypes and sizes that matter on a GPU)."""

from __future__ import annotations

import pytest
import torch

from model.loader import FLOAT32_PARAMETERS
from model.runner import load_runner


@pytest.mark.parametrize("dtype, ssm_dtype", [("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "float16")])
def test_the_runner_builds_its_pool_in_the_model_dtype_and_the_ssm_state_dtype_asked_for(tiny_path, dtype, ssm_dtype):
    runner = load_runner(str(tiny_path), None, "cpu", dtype, 3, 128, ssm_dtype)
    assert runner.dtype == getattr(torch, dtype)
    # Every parameter in the serving dtype, except the Mamba mixers' per-head scalars, kept in float32.
    params = [(name.rpartition(".")[2], p.dtype) for name, p in runner.model.language_model.named_parameters()]
    assert {d for name, d in params if name not in FLOAT32_PARAMETERS} == {getattr(torch, dtype)}
    assert {d for name, d in params if name in FLOAT32_PARAMETERS} == {torch.float32}
    pool = runner.pool
    assert {t.dtype for t in pool.ssm.values()} == {getattr(torch, ssm_dtype)}
    assert {t.dtype for kind in (pool.conv, pool.keys, pool.values) for t in kind.values()} == {getattr(torch, dtype)}
    assert (runner.num_slots, runner.max_seq_len, pool.num_slots, pool.max_seq_len) == (3, 128, 3, 128)
    assert runner.slot_bytes(128) == sum(t[0].numel() * t.element_size()
                                         for kind in (pool.conv, pool.ssm, pool.keys, pool.values)
                                         for t in kind.values())


def test_a_new_allocation_replaces_the_pool_and_keeps_the_ssm_state_dtype(tiny_path):
    runner = load_runner(str(tiny_path), None, "cpu", "float32", 1, 64, "bfloat16")
    runner.allocate(5, 256)
    assert (runner.num_slots, runner.pool.num_slots, runner.pool.max_seq_len) == (5, 5, 256)
    assert runner.forward.pool is runner.pool
    assert {t.dtype for t in runner.pool.ssm.values()} == {torch.bfloat16}
    assert not runner.use_graphs and runner.forward.graphs is None  # no CUDA graphs on a CPU
