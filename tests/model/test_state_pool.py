"""model/state_pool.py: the dtypes and sizes of what the pool allocates, and what a slot reset clears.

The dtypes only matter on a GPU (on a CPU everything runs in float32), so they are read here from the
tensors the pool built, for every model dtype and every SSM_STATE_DTYPE.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from model.loader import read_config
from model.state_pool import PoolShape, StatePool

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def text_config(tiny_path):
    return read_config(tiny_path).text_config


def pool_for(config, dtype=torch.float32, ssm_dtype=torch.float32, slots: int = 3, length: int = 64) -> StatePool:
    return StatePool(config, slots, length, dtype, ssm_dtype, torch.device("cpu"))


@pytest.mark.parametrize("dtype, ssm_dtype", list(itertools.product(DTYPES, DTYPES)))
def test_the_ssm_state_takes_its_own_dtype_and_everything_else_the_model_dtype(text_config, dtype, ssm_dtype):
    pool = pool_for(text_config, dtype, ssm_dtype)
    assert pool.ssm and pool.conv and pool.keys and pool.values
    assert {t.dtype for t in pool.ssm.values()} == {ssm_dtype}
    assert {t.dtype for kind in (pool.conv, pool.keys, pool.values) for t in kind.values()} == {dtype}


@pytest.mark.parametrize("dtype, ssm_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_the_bytes_per_slot_the_gpu_sizing_uses_are_what_one_slot_holds(text_config, dtype, ssm_dtype):
    pool = pool_for(text_config, dtype, ssm_dtype, slots=2, length=96)
    tensors = [t for kind in (pool.conv, pool.ssm, pool.keys, pool.values) for t in kind.values()]
    one_slot = sum(t[0].numel() * t.element_size() for t in tensors)
    assert PoolShape.of(text_config).bytes_per_slot(96, dtype, ssm_dtype) == one_slot
    # num_slots for sequences plus the scratch slot, and every attention layer holds max_seq_len positions.
    assert all(t.shape[0] == 3 for t in tensors) and pool.scratch == 2
    assert {t.shape[2] for kind in (pool.keys, pool.values) for t in kind.values()} == {96}


def test_a_reset_clears_every_conv_and_ssm_state_and_the_length_of_that_slot_only(text_config):
    pool = pool_for(text_config)
    for kind in (pool.conv, pool.ssm):
        for t in kind.values():
            t.fill_(1.0)
    pool.lengths[:] = [5, 6, 7, 8]
    pool.reset(1)
    for kind in (pool.conv, pool.ssm):
        for layer, t in kind.items():
            assert not t[1].any(), f"layer {layer}: state left in the reset slot"
            assert (t[0] == 1).all() and (t[2] == 1).all() and (t[3] == 1).all(), f"layer {layer}: other slot touched"
    assert pool.lengths == [5, 0, 7, 8]
