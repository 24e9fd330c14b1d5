"""The Mamba2 chunked scan of prefill (model/kernels/chunk_scan.py) on slot state.

Every case is checked against an independent float64 recurrence, one position at a time: outputs at
real positions, zeros at padding, each row's final state in its own slot, every other slot untouched.
The same cases run on the PyTorch path here, on the Triton kernel under TRITON_INTERPRET=1, and on the
compiled kernel when a CUDA GPU is present.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import kernels
from tests.model.kernels.helpers import run_under_interpreter, skip_without_triton

# The model's structure at small size: several heads per group, P not a power of two.
POOL, HEADS, HEAD_DIM, STATE, GROUPS = 6, 4, 6, 16, 2
F32, BF16 = torch.float32, torch.bfloat16
# (lengths of the rows, padded width): longer than one in-kernel chunk (64) and the reference's (128),
# exactly a chunk, a row of one position, and a row with nothing to do.
SHAPES = [([150, 37, 0], 150), ([64, 1], 70), ([5], 5)]
DTYPES = [(F32, F32), (BF16, F32), (BF16, BF16)]  # (model dtype, state dtype)
LIMITS = [(0.0, float("inf")), (0.05, 0.5)]


def make_case(lengths, width, dtype, state_dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    rows = len(lengths)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    # x, B, C are views into one projection, as in the mixer (strided, not contiguous).
    xbc = rand(rows, width, HEADS * HEAD_DIM + 2 * GROUPS * STATE).to(dtype)
    x, b, c = xbc.split([HEADS * HEAD_DIM, GROUPS * STATE, GROUPS * STATE], dim=-1)
    case = dict(
        x=x.reshape(rows, width, HEADS, HEAD_DIM), dt=rand(rows, width, HEADS).to(dtype),
        A=-torch.rand(HEADS, generator=gen).to(device) * 2 - 0.1,
        B=b.reshape(rows, width, GROUPS, STATE), C=c.reshape(rows, width, GROUPS, STATE),
        D=rand(HEADS), dt_bias=rand(HEADS, scale=0.5),
        ssm_state=rand(POOL, HEADS, HEAD_DIM, STATE).to(state_dtype),
        slots=torch.randperm(POOL, generator=gen)[:rows].to(device),
        lengths=torch.tensor(lengths, device=device))
    return case


def reference(case, dt_limit):
    """float64, one position at a time: the definition of the scan."""
    x, B, C = case["x"].double(), case["B"].double(), case["C"].double()
    A, D = case["A"].double(), case["D"].double()
    dt = F.softplus(case["dt"].double() + case["dt_bias"].double()).clamp(*dt_limit)
    per_group = HEADS // GROUPS
    y = torch.zeros_like(x)
    states = case["ssm_state"].double().clone()
    for row, (slot, length) in enumerate(zip(case["slots"].tolist(), case["lengths"].tolist())):
        state = states[slot]
        for t in range(length):
            b = B[row, t].repeat_interleave(per_group, dim=0)  # (H, N)
            c = C[row, t].repeat_interleave(per_group, dim=0)
            state = state * torch.exp(dt[row, t] * A)[:, None, None] + (dt[row, t, :, None] * x[row, t])[..., None] * b[:, None]
            y[row, t] = (state * c[:, None]).sum(-1) + D[:, None] * x[row, t]
        states[slot] = state
    return y, states


def check(fn, lengths, width, dtype, state_dtype, dt_limit, seed, device="cpu"):
    case = make_case(lengths, width, dtype, state_dtype, seed, device)
    want_y, want_states = reference({k: v.cpu() for k, v in case.items()}, dt_limit)
    before = case["ssm_state"].clone()
    y = fn(**case, dt_limit=dt_limit)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == F32 and state_dtype == F32 else dict(rtol=5e-2, atol=5e-2)
    assert y.dtype == dtype and y.shape == case["x"].shape
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    scale = want_y.abs().amax().clamp(min=1)
    torch.testing.assert_close(y.cpu().double()[valid] / scale, want_y[valid] / scale, **tol)
    assert (y.cpu()[~valid] == 0).all(), "padding positions must come back as zeros"
    touched = case["slots"].cpu()
    got = case["ssm_state"].cpu()
    assert got.dtype == state_dtype
    state_scale = want_states.abs().amax().clamp(min=1)
    torch.testing.assert_close(got[touched].double() / state_scale, want_states[touched] / state_scale, **tol)
    others = torch.ones(POOL, dtype=torch.bool)
    others[touched] = False
    assert torch.equal(got[others], before.cpu()[others]), "slots of other sequences must not change"


def all_cases():
    seed = 0
    for (lengths, width) in SHAPES:
        for dtype, state_dtype in DTYPES:
            for dt_limit in LIMITS:
                seed += 1
                yield lengths, width, dtype, state_dtype, dt_limit, seed


@pytest.mark.parametrize("lengths,width,dtype,state_dtype,dt_limit,seed", list(all_cases()))
def test_torch_path_matches_the_recurrence(lengths, width, dtype, state_dtype, dt_limit, seed):
    check(kernels.chunk_scan, lengths, width, dtype, state_dtype, dt_limit, seed)


def test_a_scan_in_two_chunks_equals_one_scan():
    """Prefill split at any point leaves the same state: the second chunk starts where the first ended."""
    case = make_case([90], 90, F32, F32, seed=7)
    whole = case["ssm_state"].clone()
    y_whole = kernels.chunk_scan(**{**case, "ssm_state": whole})
    split = case["ssm_state"].clone()
    parts = []
    for lo, hi in ((0, 41), (41, 90)):
        part = {k: (v[:, lo:hi] if k in ("x", "dt", "B", "C") else v) for k, v in case.items()}
        parts.append(kernels.chunk_scan(**{**part, "ssm_state": split, "lengths": torch.tensor([hi - lo])}))
    torch.testing.assert_close(torch.cat(parts, dim=1), y_whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)


def test_shapes_that_disagree_are_refused():
    case = make_case([5], 5, F32, F32, seed=1)
    with pytest.raises(ValueError, match="dt"):
        kernels.chunk_scan(**{**case, "dt": case["dt"][:, :, :-1]})
    with pytest.raises(ValueError, match="B"):
        kernels.chunk_scan(**{**case, "B": case["B"][..., :-1]})
    with pytest.raises(ValueError, match="lengths"):
        kernels.chunk_scan(**{**case, "lengths": torch.tensor([5, 5])})


def run_triton_interpreter_checks() -> None:
    """Entry point for the subprocess: every case through the Triton kernel, on CPU tensors."""
    assert kernels.triton_available(), "triton did not import"
    for args in all_cases():
        check(kernels.chunk_scan_triton, *args)
    print("interpreter checks passed")


@skip_without_triton
def test_triton_kernel_under_interpreter():
    run_under_interpreter("tests.model.kernels.test_chunk_scan", "run_triton_interpreter_checks")


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()), reason="needs a CUDA GPU and triton")
def test_triton_kernel_on_gpu():
    for args in all_cases():
        check(kernels.chunk_scan, *args, device="cuda")
