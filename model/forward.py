"""The language model's forward pass over slot state: prefill chunks and batched decoding steps.

The layers and weights are transformers' native NemotronH modules; only the state handling is ours,
so that each sequence keeps its Mamba and attention state in its own slot of a `StatePool`. The
Mamba time step is limited by the config's `time_step_limit` ((0, inf) for this model, as the
checkpoint's own kernels and vLLM use) in both the chunked and the recurrent path; transformers'
native mixer clamps the chunked path at `time_step_min`, which makes prompt states too large.
NemotronH attention has no positional encoding, so a slot needs only its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import NemotronHForCausalLM
from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

from model import kernels
from model.state_pool import ATTENTION, MAMBA, StatePool


@dataclass
class _Chunks:
    """The rows of a batched prefill, on the host and on the device."""

    slots: list[int]
    index: torch.Tensor
    starts: list[int]
    start_tensor: torch.Tensor
    sizes: list[int]
    lengths: torch.Tensor
    valid: torch.Tensor  # (rows, width): real positions, not padding


class SlotForward:
    def __init__(self, lm: NemotronHForCausalLM, pool: StatePool):
        self.lm = lm
        self.pool = pool
        self.config = lm.config
        self.time_step_limit = tuple(self.config.time_step_limit)
        self.graphs = None  # model/cuda_graphs.py sets this on a GPU unless ENFORCE_EAGER

    # ---- entry points --------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slots: list[int], embeds: list[torch.Tensor], starts: list[int]) -> torch.Tensor:
        """Prompt chunks of several sequences in one pass: chunk i is positions [starts[i], starts[i] + n_i)
        of the sequence in slots[i], embeds[i] is (n_i, hidden). Returns the logits at each chunk's last
        position, (len(slots), vocab).

        Chunks are right-padded to the longest. Padding never reaches a sequence's state: its Mamba
        time step is zero (the state neither decays nor takes input), its inputs are zeroed, its keys are
        not written, and no real position attends to it.
        """
        for slot, start in zip(slots, starts):
            if start == 0:
                self.pool.reset(slot)
        rows, width = len(slots), max(e.shape[0] for e in embeds)
        device = embeds[0].device
        lengths = torch.tensor([e.shape[0] for e in embeds], device=device)
        hidden = embeds[0].new_zeros(rows, width, embeds[0].shape[-1])
        for row, e in enumerate(embeds):
            hidden[row, :e.shape[0]] = e
        batch = _Chunks(slots, torch.tensor(slots, device=device), starts, torch.tensor(starts, device=device),
                        [e.shape[0] for e in embeds], lengths,
                        torch.arange(width, device=device)[None, :] < lengths[:, None])
        hidden = self._layers(hidden, lambda mixer, layer, x: self._mamba_chunk(mixer, layer, batch, x),
                              lambda attn, layer, x: self._attention_chunk(attn, layer, batch, x))
        for slot, start, n in zip(slots, starts, batch.sizes):
            self.pool.lengths[slot] = start + n
        return self._logits(hidden[torch.arange(rows, device=device), lengths - 1])

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One token for each slot; returns next-token logits (len(slots), vocab)."""
        positions = [self.pool.lengths[s] for s in slots]
        logits = self.graphs.run(slots, tokens, positions) if self.graphs is not None else None
        if logits is None:
            device = self.lm.lm_head.weight.device
            # Rows 0..n-1 in order need no gather: the kernels then work on views of the pool.
            index = None if slots == list(range(len(slots))) else torch.tensor(slots, device=device)
            logits = self.decode_step(torch.tensor(tokens, device=device), index,
                                      torch.tensor(positions, device=device), max(positions) + 1)
        for s in slots:
            self.pool.lengths[s] += 1
        return logits

    def decode_step(self, ids: torch.Tensor, index: torch.Tensor | None, positions: torch.Tensor,
                    length: int) -> torch.Tensor:
        """The step itself, on tensors only (no host reads), so that it can be captured in a CUDA graph.

        ids, positions: (n,); index: the rows' slots, or None for slots 0..n-1; length: attention span read.
        """
        hidden = self._layers(self.lm.model.embeddings(ids)[:, None],
                              lambda mixer, layer, x: self._mamba_step(mixer, layer, index, x),
                              lambda attn, layer, x: self._attention_step(attn, layer, index, positions, length, x))
        return self._logits(hidden[:, -1])

    def _layers(self, hidden: torch.Tensor, mamba, attention) -> torch.Tensor:
        """The blocks in order (pre-norm, mixer, residual); `mamba` and `attention` run those mixers on slot state."""
        for layer, block in enumerate(self.lm.model.layers):
            x = block.norm(hidden.to(dtype=block.norm.weight.dtype))
            if block.block_type == MAMBA:
                x = mamba(block.mixer, layer, x)
            elif block.block_type == ATTENTION:
                x = attention(block.mixer, layer, x)
            else:
                x = block.mixer(x)
            hidden = hidden + x
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(self.lm.model.norm_f(hidden)).float()

    # ---- Mamba ---------------------------------------------------------------------------------

    @staticmethod
    def _split(mixer, projected: torch.Tensor):
        return projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)

    def _mamba_chunk(self, mixer, layer: int, batch: _Chunks, x: torch.Tensor) -> torch.Tensor:
        rows, width = x.shape[:2]
        gate, xbc, dt = self._split(mixer, mixer.in_proj(x))
        conv_state = self.pool.conv[layer]
        keep = conv_state.shape[-1]
        # The convolution sees each slot's last inputs before this chunk (zeros at the start); the
        # slot keeps the last `keep` real inputs, which end at a different column in each row.
        history = torch.cat([conv_state[batch.index].to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)
        columns = (batch.lengths[:, None] + torch.arange(keep, device=x.device)[None, :])[:, None, :]
        conv_state[batch.index] = history.gather(2, columns.expand(rows, history.shape[1], keep)).to(conv_state.dtype)
        weight = mixer.conv1d.weight.squeeze(1)
        xbc = F.silu(F.conv1d(history.to(weight.dtype), weight.unsqueeze(1), mixer.conv1d.bias,
                              groups=mixer.conv_dim)).transpose(1, 2).to(x.dtype)
        xbc = xbc * batch.valid[..., None]
        dt = dt.masked_fill(~batch.valid[..., None], float("-inf"))  # softplus(-inf) = 0: padding is a no-op
        groups, state = mixer.n_groups, mixer.ssm_state_size
        hs, b, c = xbc.split([mixer.intermediate_size, groups * state, groups * state], dim=-1)
        ssm_state = self.pool.ssm[layer]
        y, final = mamba2_chunk_scan(
            hs.reshape(rows, width, mixer.num_heads, mixer.head_dim), dt, -torch.exp(mixer.A_log.float()),
            b.reshape(rows, width, groups, state), c.reshape(rows, width, groups, state), chunk_size=mixer.chunk_size,
            D=mixer.D, dt_bias=mixer.dt_bias, initial_states=ssm_state[batch.index], dt_softplus=True,
            dt_limit=self.time_step_limit, return_final_states=True)
        ssm_state[batch.index] = final.to(ssm_state.dtype)
        y = mixer.norm(y.reshape(rows, width, -1), gate)
        return mixer.out_proj(y.to(x.dtype))

    def _mamba_step(self, mixer, layer: int, index: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        gate, xbc, dt = self._split(mixer, mixer.in_proj(x[:, 0]))
        xbc = kernels.conv_update(xbc, self.pool.conv[layer], mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                                  index)
        groups, state = mixer.n_groups, mixer.ssm_state_size
        hs, b, c = xbc.split([mixer.intermediate_size, groups * state, groups * state], dim=-1)
        y = kernels.ssm_update(hs.reshape(rows, mixer.num_heads, mixer.head_dim), dt,
                               -torch.exp(mixer.A_log.float()), b.reshape(rows, groups, state),
                               c.reshape(rows, groups, state), mixer.D, mixer.dt_bias, self.pool.ssm[layer], index)
        y = mixer.norm(y.reshape(rows, 1, -1), gate[:, None])
        return mixer.out_proj(y.to(x.dtype))

    # ---- attention -----------------------------------------------------------------------------

    @staticmethod
    def _qkv(attn, x: torch.Tensor):
        rows, n = x.shape[:2]
        shape = (rows, n, -1, attn.head_dim)
        return (attn.q_proj(x).view(shape).transpose(1, 2), attn.k_proj(x).view(shape).transpose(1, 2),
                attn.v_proj(x).view(shape).transpose(1, 2))

    def _attend(self, attn, q, keys, values, mask) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
        rows, _, n, _ = out.shape
        return attn.o_proj(out.transpose(1, 2).reshape(rows, n, -1))

    def _attention_chunk(self, attn, layer: int, batch: _Chunks, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[1]
        q, k, v = self._qkv(attn, x)
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        for row, (slot, start, n) in enumerate(zip(batch.slots, batch.starts, batch.sizes)):
            keys[slot, :, start:start + n] = k[row, :, :n]
            values[slot, :, start:start + n] = v[row, :, :n]
        ends = batch.start_tensor + batch.lengths
        span = max(start + n for start, n in zip(batch.starts, batch.sizes))
        if len(batch.slots) == 1:  # a view of the slot, no gather
            one = slice(batch.slots[0], batch.slots[0] + 1)
            keys, values = keys[one, :, :span], values[one, :, :span]
        else:
            keys, values = keys[batch.index, :, :span], values[batch.index, :, :span]
        key_pos = torch.arange(span, device=x.device)[None, None, :]
        query_pos = (batch.start_tensor[:, None] + torch.arange(width, device=x.device)[None, :])[:, :, None]
        # Causal within each sequence, and never past its own end (padding queries see real keys only).
        mask = (key_pos <= query_pos) & (key_pos < ends[:, None, None])
        return self._attend(attn, q, keys, values, mask[:, None])

    def _attention_step(self, attn, layer: int, index: torch.Tensor | None, positions: torch.Tensor, length: int,
                        x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        q, k, v = self._qkv(attn, x)
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        slot_index = index if index is not None else torch.arange(rows, device=x.device)
        keys[slot_index, :, positions] = k[:, :, 0]
        values[slot_index, :, positions] = v[:, :, 0]
        if index is None:
            keys, values = keys[:rows, :, :length], values[:rows, :, :length]
        else:
            keys, values = keys[index, :, :length], values[index, :, :length]
        mask = torch.arange(length, device=x.device)[None, :] <= positions[:, None]
        return self._attend(attn, q, keys, values, mask[:, None, None, :])
