"""RMSNorm with its residual add, and the Mamba mixer's gated RMSNorm, each one kernel.

In eager PyTorch the pre-norm of a block is about nine kernels (casts, square, mean, rsqrt, products) plus
the residual add, and the gated norm eleven; in a decode step they are most of the launches. Both
kernels keep the modules' rounding exactly: the residual sum is rounded to its dtype before it is
normalised, the norm is computed in float32, and the gated norm rounds its normalised value to the
input dtype before the weight multiplies it, as transformers' NemotronH modules do.

- `add_rms_norm(x, residual, weight, eps)` -> (normed, new_residual): new_residual = residual + x (or x
  when residual is None), normed = (weight * rms_normalise(new_residual)) in x.dtype.
- `gated_rms_norm(y, gate, weight, group_size, eps)`: h = y * silu(gate) in float32, normalised over groups
  of `group_size` channels, rounded to y.dtype, times weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels.backend import device_ctx, require_triton, tl, triton, use_triton


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_torch(x, residual, weight, eps)


def gated_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group_size: int,
                   eps: float) -> torch.Tensor:
    if y.shape != gate.shape or y.shape[-1] % group_size or weight.shape != (y.shape[-1],):
        raise ValueError(f"gated_rms_norm: y {tuple(y.shape)}, gate {tuple(gate.shape)}, weight "
                         f"{tuple(weight.shape)} and group size {group_size} disagree")
    if use_triton(y):
        return gated_rms_norm_triton(y, gate, weight, group_size, eps)
    return gated_rms_norm_torch(y, gate, weight, group_size, eps)


# ---- PyTorch ---------------------------------------------------------------------------------------------

def add_rms_norm_torch(x, residual, weight, eps):
    hidden = x if residual is None else residual + x
    h = hidden.float()
    normed = weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    return normed.to(hidden.dtype), hidden


def gated_rms_norm_torch(y, gate, weight, group_size, eps):
    h = y.float() * F.silu(gate.float())
    grouped = h.view(*h.shape[:-1], -1, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.view(h.shape).to(y.dtype)


# ---- Triton ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, width, eps,
                             x_s, res_s, out_s, new_res_s,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        hidden = tl.load(x_ptr + row * x_s + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + row * res_s + cols, mask=mask, other=0.0)
            # Rounded to the residual's dtype, as `residual + x` is, before it is normalised.
            hidden = (res.to(tl.float32) + hidden.to(tl.float32)).to(new_res_ptr.dtype.element_ty)
            tl.store(new_res_ptr + row * new_res_s + cols, hidden, mask=mask)
        h = hidden.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / width + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_s + cols, (w * (h * inv)).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_rms_norm_kernel(y_ptr, gate_ptr, w_ptr, out_ptr, group_size, eps, y_s, gate_s, out_s,
                               BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
        mask = tl.arange(0, BLOCK) < group_size
        y = tl.load(y_ptr + row * y_s + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + row * gate_s + cols, mask=mask, other=0.0).to(tl.float32)
        h = y * (gate * tl.sigmoid(gate))
        inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / group_size + eps)
        normed = (h * inv).to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * out_s + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    # (..., width) as (rows, width) with unit column stride: a view when it can be one.
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def add_rms_norm_triton(x, residual, weight, eps):
    require_triton()
    width = x.shape[-1]
    rows = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype if residual is None else residual.dtype, device=x.device)
    new_res = x if residual is None else torch.empty(residual.shape, dtype=residual.dtype, device=x.device)
    res = rows if residual is None else _rows(residual)
    if rows.shape[0]:
        block = triton.next_power_of_2(width)
        with device_ctx(x):
            _add_rms_norm_kernel[(rows.shape[0],)](
                rows, res, weight, out.view(-1, width), new_res.view(-1, width), width, float(eps),
                rows.stride(0), res.stride(0), width, width,
                HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block))
    return out, new_res


def gated_rms_norm_triton(y, gate, weight, group_size, eps):
    require_triton()
    width = y.shape[-1]
    rows, gates = _rows(y), _rows(gate)
    out = torch.empty(y.shape, dtype=torch.promote_types(y.dtype, weight.dtype), device=y.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(group_size)
        with device_ctx(y):
            _gated_rms_norm_kernel[(rows.shape[0], width // group_size)](
                rows, gates, weight, out.view(-1, width), group_size, float(eps),
                rows.stride(0), gates.stride(0), width, BLOCK=block, num_warps=_warps(block))
    return out
