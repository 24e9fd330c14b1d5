"""The Mamba2 chunked scan of prefill, on slot state: each row's scan starts from its slot's SSM state and
leaves its final state there.

Inputs are the mixer's tensors for a right-padded batch of prompt chunks: x (R, W, H, P), dt (R, W, H)
before its bias, B and C (R, W, G, N) with head h reading group h // (H/G), A = -exp(A_log), D and dt_bias
(H,), `ssm_state` the pool (S, H, P, N), `slots` (R,) the rows' pool indices, `lengths` (R,) the real
positions of each row (the rest is padding, which never touches a state). The time step is
softplus(dt + dt_bias) in float32, clamped to `dt_limit`. Returns y (R, W, H, P) in x.dtype, D skip
included; y at padding positions is zero.

Two implementations with one meaning:
- Triton: one program per (row, head, block of head dim) walks the row's chunks in order, holding the
  (block, N) state tile in float32 registers: per chunk, the intra-chunk part is a masked (L x L)
  attention-like product, the inter-chunk part reads the running state, then the state advances. Nothing
  is padded to the chunk size and no state leaves the chip between chunks.
- PyTorch: transformers' reference `mamba2_chunk_scan` on the gathered states, padding made a no-op by a
  zero time step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

from model.kernels.backend import check_slots, device_ctx, dot_precision, interpreting, require_triton, tl, triton, use_triton

_CHUNK = 64  # positions per step of the in-kernel walk: (64, 64) scores and (64, 128) B/C tiles
_BLOCK_P = 16  # P=80 is 5 blocks; the (16, 128) state tile stays in registers
_TORCH_CHUNK = 128  # the reference's chunk length (the checkpoint's own)


def chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor, dt_bias: torch.Tensor, ssm_state: torch.Tensor, slots: torch.Tensor,
               lengths: torch.Tensor, dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """See the module docstring; updates `ssm_state[slots]` in place and returns y."""
    _check(x, dt, A, B, C, D, dt_bias, ssm_state, slots, lengths)
    if use_triton(x):
        return chunk_scan_triton(x, dt, A, B, C, D, dt_bias, ssm_state, slots, lengths, dt_limit)
    return chunk_scan_torch(x, dt, A, B, C, D, dt_bias, ssm_state, slots, lengths, dt_limit)


def _check(x, dt, A, B, C, D, dt_bias, ssm_state, slots, lengths) -> None:
    rows, width, heads, head_dim = x.shape
    n_slots, s_heads, s_head_dim, state_size = ssm_state.shape
    groups = B.shape[2]
    if (s_heads, s_head_dim) != (heads, head_dim) or tuple(dt.shape) != (rows, width, heads):
        raise ValueError(f"chunk_scan: x {tuple(x.shape)}, dt {tuple(dt.shape)} and ssm_state "
                         f"{tuple(ssm_state.shape)} disagree")
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (rows, width, groups, state_size):
            raise ValueError(f"chunk_scan: {name} {tuple(t.shape)} should be ({rows}, {width}, G, {state_size})")
    if groups == 0 or heads % groups:
        raise ValueError(f"chunk_scan: {heads} heads do not split into {groups} groups")
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if tuple(t.shape) != (heads,):
            raise ValueError(f"chunk_scan: {name} {tuple(t.shape)} should be ({heads},)")
    check_slots(slots, rows, n_slots)
    if tuple(lengths.shape) != (rows,):
        raise ValueError(f"chunk_scan: lengths {tuple(lengths.shape)} should be ({rows},)")


def chunk_scan_torch(x, dt, A, B, C, D, dt_bias, ssm_state, slots, lengths,
                     dt_limit=(0.0, float("inf"))) -> torch.Tensor:
    rows, width = x.shape[:2]
    valid = torch.arange(width, device=x.device)[None, :] < lengths[:, None]
    # The time step is taken here, so that padding gets exactly 0 (neither decay nor input) whatever the limits.
    dt = F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit).masked_fill(~valid[..., None], 0.0)
    y, final = mamba2_chunk_scan(x * valid[..., None, None], dt, A.float(), B, C, chunk_size=_TORCH_CHUNK,
                                 D=D.float(), initial_states=ssm_state[slots].float(), return_final_states=True)
    ssm_state[slots] = final.to(ssm_state.dtype)
    return (y * valid[..., None, None]).to(x.dtype)


if triton is not None:

    @triton.jit
    def _chunk_scan_kernel(
        x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, dt_bias_ptr, state_ptr, slots_ptr, lengths_ptr, y_ptr,
        head_dim, state_size, heads_per_group, dt_min, dt_max,
        x_sr, x_st, x_sh, x_sp, dt_sr, dt_st, dt_sh,
        b_sr, b_st, b_sg, b_sn, c_sr, c_st, c_sg, c_sn,
        st_ss, st_sh, st_sp, st_sn, y_sr, y_st, y_sh, y_sp,
        CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        pos = tl.arange(0, CHUNK)
        p_mask = p < head_dim
        n_mask = n < state_size
        slot = tl.load(slots_ptr + row).to(tl.int64)
        length = tl.load(lengths_ptr + row).to(tl.int32)
        g = h // heads_per_group
        a_h = tl.load(a_ptr + h).to(tl.float32)
        d_h = tl.load(d_ptr + h).to(tl.float32)
        bias_h = tl.load(dt_bias_ptr + h).to(tl.float32)

        tile = state_ptr + slot * st_ss + h * st_sh + p[:, None] * st_sp + n[None, :] * st_sn
        tile_mask = p_mask[:, None] & n_mask[None, :]
        state = tl.load(tile, mask=tile_mask, other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_N)
        causal = pos[:, None] >= pos[None, :]

        x_row = x_ptr + row * x_sr + h * x_sh
        y_row = y_ptr + row * y_sr + h * y_sh
        for start in range(0, length, CHUNK):
            t = start + pos
            t_mask = t < length
            # The time step in float32: softplus with torch's threshold, then the limits; 0 past the end.
            dt = tl.load(dt_ptr + row * dt_sr + t * dt_st + h * dt_sh, mask=t_mask, other=0.0).to(tl.float32)
            dt = dt + bias_h
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
            dt = tl.where(t_mask, dt, 0.0)
            log_decay = dt * a_h
            cum = tl.cumsum(log_decay, axis=0)  # (CHUNK,) log of the decay from the chunk start to t

            xv = tl.load(x_row + t[:, None] * x_st + p[None, :] * x_sp,
                         mask=t_mask[:, None] & p_mask[None, :], other=0.0)  # (CHUNK, BLOCK_P)
            bc_mask = t_mask[:, None] & n_mask[None, :]
            bv = tl.load(b_ptr + row * b_sr + t[:, None] * b_st + g * b_sg + n[None, :] * b_sn,
                         mask=bc_mask, other=0.0)  # (CHUNK, BLOCK_N)
            cv = tl.load(c_ptr + row * c_sr + t[:, None] * c_st + g * c_sg + n[None, :] * c_sn,
                         mask=bc_mask, other=0.0)
            if UPCAST:
                xv, bv, cv = xv.to(tl.float32), bv.to(tl.float32), cv.to(tl.float32)

            # Within the chunk: y_t += sum_{s<=t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s.
            scores = tl.dot(cv, tl.trans(bv), input_precision=PRECISION)  # (CHUNK, CHUNK), float32
            segment = tl.where(causal, cum[:, None] - cum[None, :], float("-inf"))
            weights = scores * tl.exp(segment) * dt[None, :]
            y = tl.dot(weights.to(xv.dtype), xv, input_precision=PRECISION)
            # From the state entering the chunk, decayed to t (the state's copy in the input dtype feeds the
            # tensor cores, as in the reference kernels; the state itself stays float32); then the skip.
            y += tl.exp(cum)[:, None] * tl.dot(cv, tl.trans(state).to(cv.dtype), input_precision=PRECISION)
            y += d_h * xv.to(tl.float32)
            tl.store(y_row + t[:, None] * y_st + p[None, :] * y_sp, y.to(y_ptr.dtype.element_ty),
                     mask=t_mask[:, None] & p_mask[None, :])

            # The state at the chunk's end: the old one decayed through it, plus each input decayed from s.
            total = tl.sum(log_decay, axis=0)
            carry = tl.exp(total - cum) * dt  # (CHUNK,)
            weighted = (xv.to(tl.float32) * carry[:, None]).to(bv.dtype)
            state = state * tl.exp(total) + tl.dot(tl.trans(weighted), bv, input_precision=PRECISION)
        tl.store(tile, state.to(state_ptr.dtype.element_ty), mask=tile_mask)


def chunk_scan_triton(x, dt, A, B, C, D, dt_bias, ssm_state, slots, lengths,
                      dt_limit=(0.0, float("inf"))) -> torch.Tensor:
    require_triton()
    rows, width, heads, head_dim = x.shape
    state_size = ssm_state.shape[-1]
    # Padding positions are never written by the kernel: start from zeros so that y is defined there.
    y = torch.zeros_like(x)
    if rows == 0 or width == 0:
        return y
    grid = (rows, heads, triton.cdiv(head_dim, _BLOCK_P))
    with device_ctx(x):
        _chunk_scan_kernel[grid](
            x, dt, A, B, C, D, dt_bias, ssm_state, slots, lengths, y,
            head_dim, state_size, heads // B.shape[2], float(dt_limit[0]), float(dt_limit[1]),
            *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *ssm_state.stride(), *y.stride(),
            CHUNK=_CHUNK, BLOCK_P=_BLOCK_P, BLOCK_N=max(16, triton.next_power_of_2(state_size)),
            UPCAST=interpreting(), PRECISION=dot_precision(x.dtype),
        )
    return y
