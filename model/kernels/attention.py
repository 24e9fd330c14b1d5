"""Decode attention on the slot pool: one query token per row against its own slot's keys and values.

q (B, Hq, D); keys and values the pool (S, Hkv, L, D); `slots` (B,) the rows' pool indices, or None for rows
0..B-1; `lengths` (B,) each row's keys to read (its position + 1, the new key already written); `span` a
host bound on every length (the PyTorch path reads that far); Hq = Hkv * group (grouped-query attention).
Returns (B, Hq, D) in q.dtype.

- Triton: one program per (row, key-value head) walks that slot's keys in blocks up to the row's own
  length with an online softmax, for all the query heads of the group at once. Nothing is gathered or
  copied, and a short row does not pay for the longest one, so the CUDA graphs need no span buckets.
- PyTorch: gathers the rows' keys up to `span` and runs SDPA with a length mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.kernels.backend import check_slots, device_ctx, dot_precision, interpreting, require_triton, tl, triton, use_triton

_BLOCK_L = 64  # keys per step of the walk


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor | None,
                     lengths: torch.Tensor, span: int, scale: float) -> torch.Tensor:
    batch, q_heads, head_dim = q.shape
    n_slots, kv_heads, max_len, k_dim = keys.shape
    if keys.shape != values.shape or k_dim != head_dim or kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, keys {tuple(keys.shape)} and values "
                         f"{tuple(values.shape)} disagree")
    if tuple(lengths.shape) != (batch,) or not 0 < span <= max_len:
        raise ValueError(f"decode_attention: lengths {tuple(lengths.shape)} or span {span} do not fit")
    check_slots(slots, batch, n_slots)
    if use_triton(q):
        return decode_attention_triton(q, keys, values, slots, lengths, span, scale)
    return decode_attention_torch(q, keys, values, slots, lengths, span, scale)


def decode_attention_torch(q, keys, values, slots, lengths, span, scale) -> torch.Tensor:
    batch = q.shape[0]
    if slots is None:
        keys, values = keys[:batch, :, :span], values[:batch, :, :span]
    else:
        keys, values = keys[slots, :, :span], values[slots, :, :span]
    mask = torch.arange(span, device=q.device)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out[:, :, 0]


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, out_ptr, scale, group, head_dim,
        q_sb, q_sh, k_ss, k_sh, k_sl, v_ss, v_sh, v_sl, o_sb, o_sh,
        HAS_SLOTS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        if HAS_SLOTS:
            slot = tl.load(slots_ptr + row).to(tl.int64)
        else:
            slot = row
        length = tl.load(lengths_ptr + row).to(tl.int32)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        l_off = tl.arange(0, BLOCK_L)
        g_mask = g < group
        d_mask = d < head_dim
        heads = kv * group + g
        q = tl.load(q_ptr + row * q_sb + heads[:, None] * q_sh + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = k_ptr + slot * k_ss + kv * k_sh
        v_base = v_ptr + slot * v_ss + kv * v_sh

        best = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start in range(0, length, BLOCK_L):
            pos = start + l_off
            p_mask = pos < length
            kv_mask = p_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + pos[:, None] * k_sl + d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_L, BLOCK_D)
            v = tl.load(v_base + pos[:, None] * v_sl + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BLOCK_G, BLOCK_L)
            scores = tl.where(p_mask[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            rescale = tl.exp(best - new_best)
            weights = tl.exp(scores - new_best[:, None])
            total = total * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
            best = new_best
        out = acc / total[:, None]
        tl.store(out_ptr + row * o_sb + heads[:, None] * o_sh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_mask[:, None] & d_mask[None, :])


def decode_attention_triton(q, keys, values, slots, lengths, span, scale) -> torch.Tensor:
    require_triton()
    batch, q_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention: the head dimension must be contiguous")
    group = q_heads // kv_heads
    with device_ctx(q):
        _decode_attention_kernel[(batch, kv_heads)](
            q, keys, values, slots if slots is not None else lengths, lengths, out, float(scale), group, head_dim,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1),
            HAS_SLOTS=slots is not None, BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_L=_BLOCK_L, UPCAST=interpreting(),
            PRECISION=dot_precision(q.dtype),
        )
    return out
