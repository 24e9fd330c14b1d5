"""The Mamba mixer's causal depthwise convolution over prompt chunks, on slot state.

x (R, W, C) is a right-padded batch of chunks (row r holds `lengths[r]` real positions), `conv_state` the
pool (S, C, K-1) holding each slot's last K-1 inputs before this chunk (zeros for a new sequence), weight
(C, K), bias (C,) or None, `slots` (R,) the rows' pool indices. Returns silu(conv) (R, W, C) in x.dtype,
zero at padding positions, and leaves in each row's slot the last K-1 real inputs (older state columns
where the chunk is shorter than K-1).

- Triton: one program per (row, block of channels) walks the row's positions in blocks, reading each
  input once per tap from the chunk or, before its start, from the slot, and writes the slot's new state
  last: nothing is concatenated or gathered.
- PyTorch: the slot's state and the chunk concatenated, a grouped conv1d, and a gather of the columns
  that become the new state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels.backend import check_slots, device_ctx, require_triton, tl, triton, use_triton

_BLOCK_C = 64
_BLOCK_T = 32


def conv_prefill(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    rows, width, channels = x.shape
    n_slots, s_channels, keep = conv_state.shape
    if s_channels != channels or tuple(weight.shape) != (channels, keep + 1):
        raise ValueError(f"conv_prefill: x {tuple(x.shape)}, conv_state {tuple(conv_state.shape)} and weight "
                         f"{tuple(weight.shape)} disagree")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"conv_prefill: bias {tuple(bias.shape)} should be ({channels},)")
    if tuple(lengths.shape) != (rows,):
        raise ValueError(f"conv_prefill: lengths {tuple(lengths.shape)} should be ({rows},)")
    check_slots(slots, rows, n_slots)
    if use_triton(x):
        return conv_prefill_triton(x, conv_state, weight, bias, slots, lengths)
    return conv_prefill_torch(x, conv_state, weight, bias, slots, lengths)


def conv_prefill_torch(x, conv_state, weight, bias, slots, lengths) -> torch.Tensor:
    rows, width, channels = x.shape
    keep = conv_state.shape[-1]
    history = torch.cat([conv_state[slots].to(x.dtype), x.transpose(1, 2)], dim=-1)  # (R, C, K-1+W)
    # The last `keep` real inputs end at a different column in each row.
    columns = (lengths[:, None] + torch.arange(keep, device=x.device)[None, :])[:, None, :]
    conv_state[slots] = history.gather(2, columns.expand(rows, channels, keep)).to(conv_state.dtype)
    out = F.silu(F.conv1d(history.to(weight.dtype), weight.unsqueeze(1), bias, groups=channels))
    valid = torch.arange(width, device=x.device)[None, :] < lengths[:, None]
    return (out.transpose(1, 2) * valid[..., None]).to(x.dtype)


if triton is not None:

    @triton.jit
    def _conv_prefill_kernel(
        x_ptr, state_ptr, w_ptr, bias_ptr, slots_ptr, lengths_ptr, out_ptr, channels, width,
        x_sr, x_st, x_sc, st_ss, st_sc, st_sk, w_sc, w_sk, o_sr, o_st, o_sc,
        TAPS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < channels
        slot = tl.load(slots_ptr + row).to(tl.int64)
        length = tl.load(lengths_ptr + row).to(tl.int32)
        x_row = x_ptr + row * x_sr
        state = state_ptr + slot * st_ss
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        pos = tl.arange(0, BLOCK_T)
        for start in range(0, width, BLOCK_T):
            t = start + pos
            acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32) + bias[None, :]
            for k in tl.static_range(TAPS):
                p = t - (TAPS - 1) + k  # the input this tap reads: in the chunk, or before it in the slot
                from_x = (p >= 0) & (p < length)
                from_state = p < 0
                xv = tl.load(x_row + p[:, None] * x_st + c[None, :] * x_sc,
                             mask=from_x[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                sv = tl.load(state + c[None, :] * st_sc + (p + TAPS - 1)[:, None] * st_sk,
                             mask=from_state[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c * w_sc + k * w_sk, mask=c_mask, other=0.0).to(tl.float32)
                acc += (xv + sv) * w[None, :]
            out = acc * tl.sigmoid(acc)
            out = tl.where((t < length)[:, None], out, 0.0)
            tl.store(out_ptr + row * o_sr + t[:, None] * o_st + c[None, :] * o_sc, out.to(out_ptr.dtype.element_ty),
                     mask=(t < width)[:, None] & c_mask[None, :])
        # The slot keeps the last TAPS-1 inputs up to the row's length; read before written, in this program.
        j = tl.arange(0, BLOCK_K)
        j_mask = j < TAPS - 1
        p = length - (TAPS - 1) + j
        keep_mask = j_mask[:, None] & c_mask[None, :]
        xv = tl.load(x_row + p[:, None] * x_st + c[None, :] * x_sc, mask=keep_mask & (p >= 0)[:, None], other=0.0)
        sv = tl.load(state + c[None, :] * st_sc + (p + TAPS - 1)[:, None] * st_sk,
                     mask=keep_mask & (p < 0)[:, None], other=0.0)
        new = tl.where((p >= 0)[:, None], xv.to(state_ptr.dtype.element_ty), sv)
        tl.store(state + c[None, :] * st_sc + j[:, None] * st_sk, new, mask=keep_mask)


def conv_prefill_triton(x, conv_state, weight, bias, slots, lengths) -> torch.Tensor:
    require_triton()
    rows, width, channels = x.shape
    out = torch.empty(rows, width, channels, dtype=x.dtype, device=x.device)
    if rows == 0 or width == 0:
        return out
    taps = weight.shape[1]
    with device_ctx(x):
        _conv_prefill_kernel[(rows, triton.cdiv(channels, _BLOCK_C))](
            x, conv_state, weight, bias if bias is not None else weight, slots, lengths, out, channels, width,
            *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
            TAPS=taps, HAS_BIAS=bias is not None, BLOCK_C=_BLOCK_C, BLOCK_T=_BLOCK_T,
            BLOCK_K=max(2, triton.next_power_of_2(taps - 1)),
        )
    return out
