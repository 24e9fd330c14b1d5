"""Decode attention on the slot pool (model/kernels/attention.py) against a float64 softmax per row.

Rows read their own slot up to their own length (grouped-query heads), never another slot or a key past
their length; the PyTorch path here, the Triton kernel under TRITON_INTERPRET=1 and on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from model import kernels
from tests.model.kernels.helpers import run_under_interpreter, skip_without_triton

POOL, KV_HEADS, GROUP, HEAD_DIM, MAX_LEN = 6, 2, 5, 16, 150
F32, BF16 = torch.float32, torch.bfloat16


def make_case(lengths, slot_mode, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    q = torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM, generator=g).to(dtype).to(device)
    keys = torch.randn(POOL, KV_HEADS, MAX_LEN, HEAD_DIM, generator=g).to(dtype).to(device)
    values = torch.randn(POOL, KV_HEADS, MAX_LEN, HEAD_DIM, generator=g).to(dtype).to(device)
    slots = None if slot_mode == "rows" else torch.randperm(POOL, generator=g)[:batch].to(device)
    return q, keys, values, slots, torch.tensor(lengths, device=device)


def reference(q, keys, values, slots, lengths):
    rows = range(q.shape[0]) if slots is None else slots.tolist()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, (slot, n) in enumerate(zip(rows, lengths.tolist())):
        for h in range(q.shape[1]):
            k, v = keys[slot, h // GROUP, :n].double(), values[slot, h // GROUP, :n].double()
            weights = torch.softmax(k @ q[b, h].double() / math.sqrt(HEAD_DIM), dim=0)
            out[b, h] = weights @ v
    return out


CASES = [(lengths, mode, dtype, seed) for seed, (lengths, mode, dtype) in enumerate(
    (lengths, mode, dtype) for lengths in ([1, 150, 64, 65], [7]) for mode in ("rows", "perm") for dtype in (F32, BF16))]


def check(fn, lengths, slot_mode, dtype, seed, device="cpu"):
    q, keys, values, slots, lens = make_case(lengths, slot_mode, dtype, seed, device)
    span = max(lengths)
    out = fn(q, keys, values, slots, lens, span, 1 / math.sqrt(HEAD_DIM))
    assert out.dtype == dtype and out.shape == q.shape
    want = reference(q.cpu(), keys.cpu(), values.cpu(), None if slots is None else slots.cpu(), lens.cpu())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == F32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out.cpu().double(), want, **tol)


@pytest.mark.parametrize("lengths,slot_mode,dtype,seed", CASES)
def test_torch_path_is_softmax_over_the_rows_own_keys(lengths, slot_mode, dtype, seed):
    check(kernels.decode_attention, lengths, slot_mode, dtype, seed)


def test_keys_past_a_rows_length_and_other_slots_are_never_read():
    q, keys, values, slots, lens = make_case([9, 20], "perm", F32, seed=3)
    out = kernels.decode_attention(q, keys, values, slots, lens, 20, 0.25)
    spoiled_k, spoiled_v = keys.clone(), values.clone()
    others = torch.ones(POOL, dtype=torch.bool)
    others[slots] = False
    spoiled_k[others], spoiled_v[others] = float("nan"), float("nan")
    spoiled_k[slots[0], :, 9:], spoiled_v[slots[0], :, 9:] = 1e4, 1e4
    torch.testing.assert_close(kernels.decode_attention(q, spoiled_k, spoiled_v, slots, lens, 20, 0.25), out)


def test_shapes_that_disagree_are_refused():
    q, keys, values, slots, lens = make_case([3], "rows", F32, seed=1)
    with pytest.raises(ValueError, match="disagree"):
        kernels.decode_attention(q[:, :-1], keys, values, slots, lens, 3, 0.25)
    with pytest.raises(ValueError, match="span"):
        kernels.decode_attention(q, keys, values, slots, lens, MAX_LEN + 1, 0.25)


def run_triton_interpreter_checks() -> None:
    assert kernels.triton_available(), "triton did not import"
    for args in CASES:
        check(kernels.decode_attention_triton, *args)
    print("interpreter checks passed")


@skip_without_triton
def test_triton_kernel_under_interpreter():
    run_under_interpreter("tests.model.kernels.test_attention", "run_triton_interpreter_checks")


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()), reason="needs a CUDA GPU and triton")
def test_triton_kernel_on_gpu():
    for args in CASES:
        check(kernels.decode_attention, *args, device="cuda")
