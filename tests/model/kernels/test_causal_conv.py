"""The prefill convolution on slot state (model/kernels/causal_conv.py) against a float64 loop.

Each row continues its slot's last inputs, outputs are zero at padding, the slot keeps the last real inputs
(older state columns where the chunk is shorter than the kernel), other slots are untouched; the PyTorch
path here, the Triton kernel under TRITON_INTERPRET=1 and on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from model import kernels
from tests.model.kernels.helpers import run_under_interpreter, skip_without_triton

POOL, CHANNELS, TAPS = 6, 70, 4  # channels not a multiple of the kernel's block
F32, BF16 = torch.float32, torch.bfloat16
SHAPES = [([40, 2, 0, 33], 40), ([1], 1), ([3, 5], 9)]


def make_case(lengths, width, dtype, seed, with_bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    wide = torch.randn(rows, width, CHANNELS + 6, generator=g).to(dtype)
    return dict(x=wide[:, :, 3:3 + CHANNELS].to(device),  # a column slice of the projection, as in the mixer
                conv_state=torch.randn(POOL, CHANNELS, TAPS - 1, generator=g).to(dtype).to(device),
                weight=(torch.randn(CHANNELS, TAPS, generator=g) * 0.5).to(dtype).to(device),
                bias=(torch.randn(CHANNELS, generator=g) * 0.5).to(dtype).to(device) if with_bias else None,
                slots=torch.randperm(POOL, generator=g)[:rows].to(device),
                lengths=torch.tensor(lengths, device=device))


def reference(case):
    x, state, w = case["x"].double(), case["conv_state"].double(), case["weight"].double()
    bias = case["bias"].double() if case["bias"] is not None else torch.zeros(CHANNELS, dtype=torch.float64)
    out = torch.zeros_like(x)
    new_state = state.clone()
    for row, (slot, n) in enumerate(zip(case["slots"].tolist(), case["lengths"].tolist())):
        inputs = torch.cat([state[slot].T, x[row, :n]])  # (K-1+n, C): the slot's past, then the chunk
        for t in range(n):
            acc = (inputs[t:t + TAPS] * w.T).sum(0) + bias
            out[row, t] = acc * torch.sigmoid(acc)
        new_state[slot] = inputs[-(TAPS - 1):].T
    return out, new_state


def check(fn, lengths, width, dtype, with_bias, seed, device="cpu"):
    case = make_case(lengths, width, dtype, seed, with_bias, device)
    cpu = {k: (v.cpu() if v is not None else None) for k, v in case.items()}
    want, want_state = reference(cpu)
    out = fn(**case)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=2e-2, atol=2e-2)
    assert out.dtype == dtype and out.shape == case["x"].shape
    torch.testing.assert_close(out.cpu().double(), want, **tol)  # zeros at padding included
    torch.testing.assert_close(case["conv_state"].cpu().double(), want_state.to(dtype).double(), rtol=0, atol=0)


CASES = [(lengths, width, dtype, with_bias, seed) for seed, (lengths, width, dtype, with_bias) in enumerate(
    (lengths, width, dtype, with_bias) for lengths, width in SHAPES for dtype in (F32, BF16) for with_bias in (True,
                                                                                                               False))]


@pytest.mark.parametrize("lengths,width,dtype,with_bias,seed", CASES)
def test_torch_path_matches_the_loop(lengths, width, dtype, with_bias, seed):
    check(kernels.conv_prefill, lengths, width, dtype, with_bias, seed)


def test_a_chunk_continues_where_the_last_one_ended():
    case = make_case([30], 30, F32, seed=3)
    whole_state = case["conv_state"].clone()
    whole = kernels.conv_prefill(**{**case, "conv_state": whole_state})
    split_state = case["conv_state"].clone()
    parts = [kernels.conv_prefill(**{**case, "x": case["x"][:, lo:hi], "conv_state": split_state,
                                     "lengths": torch.tensor([hi - lo])}) for lo, hi in ((0, 2), (2, 11), (11, 30))]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole)
    torch.testing.assert_close(split_state, whole_state)


def test_shapes_that_disagree_are_refused():
    case = make_case([3], 3, F32, seed=1)
    with pytest.raises(ValueError, match="disagree"):
        kernels.conv_prefill(**{**case, "weight": case["weight"][:, :-1]})
    with pytest.raises(ValueError, match="lengths"):
        kernels.conv_prefill(**{**case, "lengths": torch.tensor([3, 3])})


def run_triton_interpreter_checks() -> None:
    assert kernels.triton_available(), "triton did not import"
    for args in CASES:
        check(kernels.conv_prefill_triton, *args)
    print("interpreter checks passed")


@skip_without_triton
def test_triton_kernel_under_interpreter():
    run_under_interpreter("tests.model.kernels.test_causal_conv", "run_triton_interpreter_checks")


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()), reason="needs a CUDA GPU and triton")
def test_triton_kernel_on_gpu():
    for args in CASES:
        check(kernels.conv_prefill, *args, device="cuda")
