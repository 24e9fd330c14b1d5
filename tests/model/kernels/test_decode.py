"""Mamba2 decode-step kernels (model/kernels/decode.py): values, slot indexing, and in-place updates.

Each case is checked against an independent float64 loop and, where everything is float32, against
transformers' own PyTorch decode step (called exactly as NemotronH's mixer calls it in its recurrent branch).
The same checks run on the torch path here, on the Triton kernels under TRITON_INTERPRET=1 (a subprocess,
when triton is installed), and on the compiled Triton kernels when a CUDA GPU is present.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers.models.nemotron_h import modeling_nemotron_h as hf

from model import kernels
from tests.model.kernels.helpers import run_under_interpreter, skip_without_triton

# The plain PyTorch bodies, without the hub/mamba_ssm dispatch wrapper around them.
HF_SSM_UPDATE = getattr(hf.mamba2_selective_state_update, "__wrapped__", hf.mamba2_selective_state_update)
HF_CONV_UPDATE = getattr(hf.causal_conv1d_update, "__wrapped__", hf.causal_conv1d_update)

# Small shapes with the model's structure: several heads per group, P not a power of two, K = 4.
POOL, HEADS, HEAD_DIM, STATE, GROUPS, WIDTH = 7, 8, 6, 16, 2, 4
CHANNELS = HEADS * HEAD_DIM + 2 * GROUPS * STATE

F32, BF16 = torch.float32, torch.bfloat16
DTYPE_CASES = [(F32, F32), (BF16, F32), (BF16, BF16)]  # (model dtype, ssm state dtype)
SLOT_CASES = ["rows", "perm"]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1.6e-2, atol=1.6e-2)


def _slots(mode, batch, gen, device):
    if mode == "rows":
        return None
    return torch.randperm(POOL, generator=gen)[:batch].to(device)  # distinct, unordered, not 0..B-1


def _rows(slots, batch, device):
    return torch.arange(batch, device=device) if slots is None else slots


def _untouched(rows, device):
    keep = torch.ones(POOL, dtype=torch.bool, device=device)
    keep[rows] = False
    return keep


# --------------------------------------------------------------------------------------------------------------
# Independent float64 references
# --------------------------------------------------------------------------------------------------------------


def ref_conv64(x, state, weight, bias):
    """Per-channel loop over one (B, C, K-1) block of state; returns (out, new state) in float64."""
    x, state, weight = x.double(), state.double(), weight.double()
    bias = torch.zeros(x.shape[1], dtype=torch.float64) if bias is None else bias.double()
    out = torch.empty_like(x)
    new = torch.empty_like(state)
    for b in range(x.shape[0]):
        window = torch.cat([state[b], x[b, :, None]], dim=1)  # (C, K)
        acc = (window * weight).sum(1) + bias
        out[b] = acc * torch.sigmoid(acc)
        new[b] = window[:, 1:]
    return out, new


def ref_ssm64(x, dt, A, B, C, D, dt_bias, state):
    """Per-(sequence, head) loop in float64; returns (y, new state)."""
    x, dt, A, B, C, D, dt_bias, state = (t.double() for t in (x, dt, A, B, C, D, dt_bias, state))
    heads_per_group = x.shape[1] // B.shape[1]
    y = torch.empty_like(x)
    new = torch.empty_like(state)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            g = h // heads_per_group
            step = F.softplus(dt[b, h] + dt_bias[h])
            new[b, h] = state[b, h] * torch.exp(step * A[h]) + step * torch.outer(x[b, h], B[b, g])
            y[b, h] = new[b, h] @ C[b, g] + D[h] * x[b, h]
    return y, new


# --------------------------------------------------------------------------------------------------------------
# Case builders and checks (shared by every path)
# --------------------------------------------------------------------------------------------------------------


def conv_case(gen, batch, dtype, with_bias, device):
    state = torch.randn(POOL, CHANNELS, WIDTH - 1, generator=gen).to(device, dtype)
    # x as the engine sees it: a column slice of a wider projection, so not contiguous.
    proj = torch.randn(batch, CHANNELS + 5, generator=gen).to(device, dtype)
    x = proj[:, 3:3 + CHANNELS]
    weight = (torch.randn(CHANNELS, WIDTH, generator=gen) * 0.5).to(device, dtype)
    bias = (torch.randn(CHANNELS, generator=gen) * 0.5).to(device, dtype) if with_bias else None
    return x, state, weight, bias


def ssm_case(gen, batch, dtype, state_dtype, device):
    inner, bc = HEADS * HEAD_DIM, GROUPS * STATE
    # x, B, C split from one (conv output) row and dt from the projection, as in the mixer: strided views.
    row = torch.randn(batch, inner + 2 * bc, generator=gen).to(device, dtype)
    x = row[:, :inner].view(batch, HEADS, HEAD_DIM)
    B = row[:, inner:inner + bc].view(batch, GROUPS, STATE)
    C = row[:, inner + bc:].view(batch, GROUPS, STATE)
    dt = (torch.randn(batch, 1, HEADS + 3, generator=gen) * 2).to(device, dtype)[:, 0, 2:2 + HEADS]
    dt[0, 0] = 25.0  # above softplus' threshold of 20: the identity branch
    dt[-1, -1] = -30.0  # softplus ~ 1e-13: the decay is ~1 and the input barely enters
    A = -torch.exp(torch.randn(HEADS, generator=gen)).to(device)  # float32, negative, as in the mixer
    D = torch.randn(HEADS, generator=gen).to(device, dtype)
    dt_bias = torch.randn(HEADS, generator=gen).to(device, dtype)
    state = torch.randn(POOL, HEADS, HEAD_DIM, STATE, generator=gen).to(device, state_dtype)
    return x, dt, A, B, C, D, dt_bias, state


def check_conv(conv_fn, dtype, slot_mode, with_bias, seed, device="cpu", batch=3):
    gen = torch.Generator().manual_seed(seed)
    x, pool, weight, bias = conv_case(gen, batch, dtype, with_bias, device)
    slots = _slots(slot_mode, batch, gen, device)
    rows = _rows(slots, batch, device)
    before = pool.clone()
    ptr = pool.data_ptr()
    held = pool[rows[0]]  # a view the caller holds: must see the update

    out = conv_fn(x, pool, weight, bias, slots)

    ref_out, ref_state = ref_conv64(x.cpu(), before[rows].cpu(), weight.cpu(), None if bias is None else bias.cpu())
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.double().cpu(), ref_out, **_tol(dtype))
    # The shift is a copy: the state holds exactly the old columns 1.. and x rounded to the pool's dtype.
    torch.testing.assert_close(pool[rows].double().cpu(), ref_state.to(dtype).double(), rtol=0, atol=0)
    assert pool.data_ptr() == ptr
    assert torch.equal(held, pool[rows[0]]) and not torch.equal(held, before[rows[0]])
    keep = _untouched(rows, device)
    assert torch.equal(pool[keep], before[keep])

    if dtype == F32:  # transformers' decode step on the same rows (it takes (B, C, 1) and a dense state)
        hf_state = before[rows].clone()
        hf_out = HF_CONV_UPDATE(x[:, :, None], hf_state, weight, bias, activation="silu")[:, :, 0]
        torch.testing.assert_close(out, hf_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool[rows], hf_state, rtol=0, atol=0)


def check_ssm(ssm_fn, dtype, state_dtype, slot_mode, seed, device="cpu", batch=3):
    gen = torch.Generator().manual_seed(seed)
    x, dt, A, B, C, D, dt_bias, pool = ssm_case(gen, batch, dtype, state_dtype, device)
    slots = _slots(slot_mode, batch, gen, device)
    rows = _rows(slots, batch, device)
    before = pool.clone()
    ptr = pool.data_ptr()
    held = pool[rows[-1]]

    y = ssm_fn(x, dt, A, B, C, D, dt_bias, pool, slots)

    ref_y, ref_state = ref_ssm64(*(t.cpu() for t in (x, dt, A, B, C, D, dt_bias, before[rows])))
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double().cpu(), ref_y, **_tol(dtype))
    torch.testing.assert_close(pool[rows].double().cpu(), ref_state, **_tol(state_dtype))
    assert pool.dtype == state_dtype and pool.data_ptr() == ptr
    assert torch.equal(held, pool[rows[-1]]) and not torch.equal(held, before[rows[-1]])
    keep = _untouched(rows, device)
    assert torch.equal(pool[keep], before[keep])

    if dtype == F32 and state_dtype == F32:
        # Exactly the mixer's recurrent branch: dt/A/D/dt_bias expanded over head_dim (and A over N).
        hf_state = before[rows].clone()
        hf_y = HF_SSM_UPDATE(
            hf_state, x,
            dt[:, :, None].expand(-1, -1, HEAD_DIM),
            A[:, None, None].expand(-1, HEAD_DIM, STATE),
            B, C,
            D[:, None].expand(-1, HEAD_DIM),
            z=None,
            dt_bias=dt_bias[:, None].expand(-1, HEAD_DIM),
            dt_softplus=True,
        )
        torch.testing.assert_close(y, hf_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pool[rows], hf_state, rtol=1e-6, atol=1e-6)


def all_cases():
    """(kind, args) for every case the parametrized tests run; the interpreter run walks the same list."""
    for i, (dtype, slot_mode, with_bias) in enumerate(itertools.product((F32, BF16), SLOT_CASES, (True, False))):
        yield "conv", (dtype, slot_mode, with_bias, 100 + i)
    for i, ((dtype, state_dtype), slot_mode) in enumerate(itertools.product(DTYPE_CASES, SLOT_CASES)):
        yield "ssm", (dtype, state_dtype, slot_mode, 200 + i)


CONV_CASES = [args for kind, args in all_cases() if kind == "conv"]
SSM_CASES = [args for kind, args in all_cases() if kind == "ssm"]


# --------------------------------------------------------------------------------------------------------------
# Tests: the dispatching entry points (torch path on CPU)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,slot_mode,with_bias,seed", CONV_CASES)
def test_conv_update(dtype, slot_mode, with_bias, seed):
    check_conv(kernels.conv_update, dtype, slot_mode, with_bias, seed)


@pytest.mark.parametrize("dtype,state_dtype,slot_mode,seed", SSM_CASES)
def test_ssm_update(dtype, state_dtype, slot_mode, seed):
    check_ssm(kernels.ssm_update, dtype, state_dtype, slot_mode, seed)


def test_full_pool_and_repeated_steps_match_reference():
    """B = S through the rows view, several steps in a row: the state carries over exactly like the reference."""
    gen = torch.Generator().manual_seed(7)
    x, dt, A, B, C, D, dt_bias, pool = ssm_case(gen, POOL, F32, F32, "cpu")
    ref = pool.clone()
    for _ in range(3):
        y = kernels.ssm_update(x, dt, A, B, C, D, dt_bias, pool)
        ref_y, ref = ref_ssm64(x, dt, A, B, C, D, dt_bias, ref)
        torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool.double(), ref, rtol=1e-5, atol=1e-5)


def test_cpu_tensors_use_the_torch_path():
    assert isinstance(kernels.triton_available(), bool)
    assert not kernels._use_triton(torch.zeros(1))


def test_shape_errors():
    gen = torch.Generator().manual_seed(3)
    x, pool, weight, bias = conv_case(gen, 2, F32, True, "cpu")
    with pytest.raises(ValueError):
        kernels.conv_update(x, pool, weight[:, :-1], bias)
    with pytest.raises(ValueError):
        kernels.conv_update(x, pool, weight, bias, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError):
        kernels.conv_update(x, pool, weight, bias, torch.tensor([1, 2], dtype=torch.int32))
    x, dt, A, B, C, D, dt_bias, pool = ssm_case(gen, 2, F32, F32, "cpu")
    with pytest.raises(ValueError):
        kernels.ssm_update(x, dt, A, B[:, :1].expand(-1, 3, -1), C, D, dt_bias, pool)
    with pytest.raises(ValueError):
        kernels.ssm_update(x, dt[:, :-1], A, B, C, D, dt_bias, pool)


# --------------------------------------------------------------------------------------------------------------
# Tests: the Triton kernels (interpreter on CPU; compiled on a GPU)
# --------------------------------------------------------------------------------------------------------------

def check_skip_slot(device="cpu"):
    """A row whose slot is the skip slot (a graph's padding row) leaves that slot's state exactly as it was,
    and the other rows get the same results as without it."""
    gen = torch.Generator().manual_seed(5)
    x, dt, A, B, C, D, dt_bias, pool = ssm_case(gen, 3, F32, F32, device)
    slots = torch.tensor([4, 1, 6], device=device)
    alone = pool.clone()
    y_alone = kernels.ssm_update_triton(x[:2], dt[:2], A, B[:2], C[:2], D, dt_bias, alone, slots[:2])
    before = pool.clone()
    y = kernels.ssm_update_triton(x, dt, A, B, C, D, dt_bias, pool, slots, skip_slot=6)
    assert torch.equal(pool[6], before[6])
    torch.testing.assert_close(y[:2], y_alone)
    torch.testing.assert_close(pool, alone)
    x, state, weight, bias = conv_case(gen, 3, F32, True, device)
    alone = state.clone()
    out_alone = kernels.conv_update_triton(x[:2], alone, weight, bias, slots[:2])
    before = state.clone()
    out = kernels.conv_update_triton(x, state, weight, bias, slots, skip_slot=6)
    assert torch.equal(state[6], before[6])
    torch.testing.assert_close(out[:2], out_alone)
    torch.testing.assert_close(state, alone)


def run_triton_interpreter_checks() -> None:
    """Entry point for the subprocess: every case through the Triton kernels, on CPU tensors."""
    assert kernels.triton_available(), "triton did not import"
    for kind, args in all_cases():
        if kind == "conv":
            check_conv(kernels.conv_update_triton, *args)
        else:
            check_ssm(kernels.ssm_update_triton, *args)
    check_skip_slot()
    print("interpreter checks passed")


@skip_without_triton
@pytest.mark.slow
def test_triton_kernels_under_interpreter():
    run_under_interpreter("tests.model.kernels.test_decode", "run_triton_interpreter_checks")


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()),
                    reason="needs a CUDA GPU and triton")
def test_triton_on_gpu():
    """Every case through the dispatching entry points on CUDA, i.e. the compiled Triton kernels."""
    assert kernels._use_triton(torch.zeros(1, device="cuda"))
    for kind, args in all_cases():
        if kind == "conv":
            check_conv(kernels.conv_update, *args, device="cuda")
        else:
            check_ssm(kernels.ssm_update, *args, device="cuda")
    check_skip_slot(device="cuda")
