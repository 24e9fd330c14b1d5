"""The fused norms (model/kernels/norms.py) against transformers' NemotronH modules they replace.

The PyTorch path must give the modules' values (the same rounding points); the Triton kernels, run
under TRITON_INTERPRET=1 here and compiled on a GPU, must match the PyTorch path.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm, NemotronHRMSNormGated

from model import kernels
from tests.model.kernels.helpers import run_under_interpreter, skip_without_triton

F32, BF16 = torch.float32, torch.bfloat16
WIDTH, GROUP = 48, 12  # four groups of twelve channels for the gated norm


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _norm_case(dtype, rows, with_residual, seed, device="cpu"):
    g = _gen(seed)
    x = (torch.randn(rows, WIDTH, generator=g) * 3).to(dtype).to(device)
    residual = (torch.randn(rows, WIDTH, generator=g) * 3).to(dtype).to(device) if with_residual else None
    weight = (torch.rand(WIDTH, generator=g) + 0.5).to(dtype).to(device)
    return x, residual, weight


def _gated_case(dtype, rows, seed, device="cpu"):
    g = _gen(seed)
    y = (torch.randn(rows, WIDTH, generator=g) * 3).to(dtype).to(device)
    gate = (torch.randn(rows, WIDTH, generator=g) * 2).to(dtype).to(device)
    weight = (torch.rand(WIDTH, generator=g) + 0.5).to(dtype).to(device)
    return y, gate, weight


def _tol(dtype):
    return dict(rtol=1e-6, atol=1e-6) if dtype == F32 else dict(rtol=1.6e-2, atol=1.6e-2)  # two bfloat16 steps


def check_add_rms_norm(fn, dtype, rows, with_residual, seed, device="cpu", exact=True):
    x, residual, weight = _norm_case(dtype, rows, with_residual, seed, device)
    module = NemotronHRMSNorm(WIDTH, eps=1e-5).to(device=device, dtype=dtype)
    module.weight.data.copy_(weight)
    hidden = x if residual is None else residual + x
    normed, new_residual = fn(x, residual, weight, 1e-5)
    assert new_residual.dtype == hidden.dtype and normed.dtype == hidden.dtype
    if exact:
        assert torch.equal(new_residual, hidden), "the residual sum must be rounded exactly as `residual + x`"
    else:  # the interpreter rounds float32 to bfloat16 by truncation, the GPU to nearest: one step apart at most
        torch.testing.assert_close(new_residual, hidden, **_tol(dtype))
    torch.testing.assert_close(normed, module(hidden), **_tol(dtype))


def check_gated(fn, dtype, rows, seed, device="cpu"):
    y, gate, weight = _gated_case(dtype, rows, seed, device)
    module = NemotronHRMSNormGated(WIDTH, group_size=GROUP, eps=1e-5).to(device=device, dtype=dtype)
    module.weight.data.copy_(weight)
    out = fn(y, gate, weight, GROUP, 1e-5)
    want = module(y, gate)
    assert out.dtype == want.dtype
    torch.testing.assert_close(out, want, **_tol(dtype))


CASES = [(dtype, rows, res, seed) for seed, (dtype, rows, res) in enumerate(
    (d, r, res) for d in (F32, BF16) for r in (1, 5) for res in (False, True))]


@pytest.mark.parametrize("dtype,rows,with_residual,seed", CASES)
def test_add_rms_norm_is_the_module(dtype, rows, with_residual, seed):
    check_add_rms_norm(kernels.add_rms_norm, dtype, rows, with_residual, seed)


@pytest.mark.parametrize("dtype,rows,seed", [(c[0], c[1], c[3]) for c in CASES])
def test_gated_rms_norm_is_the_module(dtype, rows, seed):
    check_gated(kernels.gated_rms_norm, dtype, rows, seed)


def test_gated_norm_normalises_each_group_apart():
    """A group's output depends on its own channels only (a norm over the whole row would mix them)."""
    y, gate, weight = _gated_case(F32, 1, seed=3)
    out = kernels.gated_rms_norm(y, gate, weight, GROUP, 1e-5)
    y2 = y.clone()
    y2[:, GROUP:] *= 100
    out2 = kernels.gated_rms_norm(y2, gate, weight, GROUP, 1e-5)
    torch.testing.assert_close(out2[:, :GROUP], out[:, :GROUP])


def test_gated_norm_refuses_a_width_that_is_not_whole_groups():
    y, gate, weight = _gated_case(F32, 2, seed=4)
    with pytest.raises(ValueError, match="group size"):
        kernels.gated_rms_norm(y, gate, weight, 10, 1e-5)


def run_triton_interpreter_checks() -> None:
    assert kernels.triton_available(), "triton did not import"
    for dtype, rows, res, seed in CASES:
        check_add_rms_norm(kernels.add_rms_norm_triton, dtype, rows, res, seed, exact=False)
        check_gated(kernels.gated_rms_norm_triton, dtype, rows, seed)
    # A strided input (a slice of a wider projection, as the gate is) reads the right elements.
    y, gate, weight = _gated_case(F32, 3, seed=9)
    wide = torch.cat([gate, gate * 2], dim=-1)[:, WIDTH:]
    torch.testing.assert_close(kernels.gated_rms_norm_triton(y, wide, weight, GROUP, 1e-5),
                               kernels.gated_rms_norm_torch(y, wide, weight, GROUP, 1e-5))
    print("interpreter checks passed")


@skip_without_triton
def test_triton_kernels_under_interpreter():
    run_under_interpreter("tests.model.kernels.test_norms", "run_triton_interpreter_checks")


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()), reason="needs a CUDA GPU and triton")
def test_triton_kernels_on_gpu():
    for dtype, rows, res, seed in CASES:
        check_add_rms_norm(kernels.add_rms_norm, dtype, rows, res, seed, device="cuda")
        check_gated(kernels.gated_rms_norm, dtype, rows, seed, device="cuda")
