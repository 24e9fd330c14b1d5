"""The language model's forward pass over slot state: prefill chunks and batched decoding steps.

The layers and weights are transformers' native NemotronH modules; only the state handling is ours,
so that each sequence keeps its Mamba and attention state in its own slot of a `StatePool`. The
Mamba time step is limited by the config's `time_step_limit` ((0, inf) for this model, as the
checkpoint's own kernels and vLLM use) in both the chunked and the recurrent path; transformers'
native mixer clamps the chunked path at `time_step_min`, which makes prompt states too large.
NemotronH attention has no positional encoding, so a slot needs only its length.

The Mamba scan of prefill, the decode step and the norms run in model/kernels (Triton on a GPU, their
PyTorch twins elsewhere); each block's pre-norm also adds the previous block's output to the residual
stream, so one kernel does both. A, D and dt_bias are float32, A = -exp(A_log) computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import NemotronHForCausalLM

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


@dataclass(frozen=True)
class SSMParams:
    """A Mamba layer's per-head scalars in float32, A = -exp(A_log) computed once rather than every step."""

    A: torch.Tensor
    D: torch.Tensor
    dt_bias: torch.Tensor

    @classmethod
    def of(cls, mixer) -> SSMParams:
        return cls(-torch.exp(mixer.A_log.detach().float()), mixer.D.detach().float(), mixer.dt_bias.detach().float())


class SlotForward:
    def __init__(self, lm: NemotronHForCausalLM, pool: StatePool):
        self.lm = lm
        self.pool = pool
        self.config = lm.config
        self.time_step_limit = tuple(self.config.time_step_limit)
        self.graphs = None  # model/cuda_graphs.py sets this on a GPU unless ENFORCE_EAGER
        self.ssm = {layer: SSMParams.of(block.mixer) for layer, block in enumerate(lm.model.layers)
                    if block.block_type == MAMBA}

    # ---- entry points --------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slots: list[int], embeds: list[torch.Tensor], starts: list[int]) -> torch.Tensor:
        """Prompt chunks of several sequences in one pass: chunk i is positions [starts[i], starts[i] + n_i)
        of the sequence in slots[i], embeds[i] is (n_i, hidden). Returns the logits at each chunk's last
        position, (len(slots), vocab).

        Chunks are right-padded to the longest. Padding never reaches a sequence's state: the Mamba
        convolution and scan stop at each row's length, its keys are not written, and no real position
        attends to it.
        """
        self.pool.reset_slots([slot for slot, start in zip(slots, starts) if start == 0])
        rows, width = len(slots), max(e.shape[0] for e in embeds)
        device = embeds[0].device
        lengths = torch.tensor([e.shape[0] for e in embeds], device=device)
        hidden = embeds[0].new_zeros(rows, width, embeds[0].shape[-1])
        for row, e in enumerate(embeds):
            hidden[row, :e.shape[0]] = e
        batch = _Chunks(slots, torch.tensor(slots, device=device), starts, torch.tensor(starts, device=device),
                        [e.shape[0] for e in embeds], lengths)
        hidden, residual = self._layers(hidden, lambda mixer, layer, x: self._mamba_chunk(mixer, layer, batch, x),
                                        lambda attn, layer, x: self._attention_chunk(attn, layer, batch, x))
        for slot, start, n in zip(slots, starts, batch.sizes):
            self.pool.lengths[slot] = start + n
        last = (torch.arange(rows, device=device), lengths - 1)
        return self._logits(hidden[last], residual[last])

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
        hidden, residual = self._layers(
            self.lm.model.embeddings(ids)[:, None],
            lambda mixer, layer, x: self._mamba_step(mixer, layer, index, x),
            lambda attn, layer, x: self._attention_step(attn, layer, index, positions, length, x))
        return self._logits(hidden[:, -1], residual[:, -1])

    def _layers(self, hidden: torch.Tensor, mamba, attention) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks in order (pre-norm, mixer, residual); `mamba` and `attention` run those mixers on slot state.

        Returns the last mixer's output and the residual stream before it, still to be added: the final
        norm adds them in the same kernel, as each block's pre-norm adds the previous block's output."""
        residual = None
        for layer, block in enumerate(self.lm.model.layers):
            x, residual = kernels.add_rms_norm(hidden, residual, block.norm.weight, block.norm.variance_epsilon)
            if block.block_type == MAMBA:
                hidden = mamba(block.mixer, layer, x)
            elif block.block_type == ATTENTION:
                hidden = attention(block.mixer, layer, x)
            else:
                hidden = block.mixer(x)
        return hidden, residual

    def _logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        norm = self.lm.model.norm_f
        x, _ = kernels.add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
        return self.lm.lm_head(x).float()

    # ---- Mamba ---------------------------------------------------------------------------------

    @staticmethod
    def _split(mixer, projected: torch.Tensor):
        return projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)

    def _mamba_chunk(self, mixer, layer: int, batch: _Chunks, x: torch.Tensor) -> torch.Tensor:
        rows, width = x.shape[:2]
        gate, xbc, dt = self._split(mixer, mixer.in_proj(x))
        # The convolution sees each slot's last inputs before this chunk (zeros at the start), and the slot
        # keeps the last real inputs of the chunk.
        xbc = kernels.conv_prefill(xbc, self.pool.conv[layer], mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                                   batch.index, batch.lengths)
        groups, state = mixer.n_groups, mixer.ssm_state_size
        hs, b, c = xbc.split([mixer.intermediate_size, groups * state, groups * state], dim=-1)
        ssm = self.ssm[layer]
        # Padding positions (past each row's length) never reach the state: the scan stops at the length.
        y = kernels.chunk_scan(hs.reshape(rows, width, mixer.num_heads, mixer.head_dim), dt, ssm.A,
                               b.reshape(rows, width, groups, state), c.reshape(rows, width, groups, state), ssm.D,
                               ssm.dt_bias, self.pool.ssm[layer], batch.index, batch.lengths, self.time_step_limit)
        return mixer.out_proj(self._gated_norm(mixer, y.reshape(rows, width, -1), gate))

    def _mamba_step(self, mixer, layer: int, index: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        gate, xbc, dt = self._split(mixer, mixer.in_proj(x[:, 0]))
        xbc = kernels.conv_update(xbc, self.pool.conv[layer], mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                                  index, skip_slot=self.pool.scratch)
        groups, state = mixer.n_groups, mixer.ssm_state_size
        hs, b, c = xbc.split([mixer.intermediate_size, groups * state, groups * state], dim=-1)
        ssm = self.ssm[layer]
        y = kernels.ssm_update(hs.reshape(rows, mixer.num_heads, mixer.head_dim), dt, ssm.A,
                               b.reshape(rows, groups, state), c.reshape(rows, groups, state), ssm.D, ssm.dt_bias,
                               self.pool.ssm[layer], index, skip_slot=self.pool.scratch)
        return mixer.out_proj(self._gated_norm(mixer, y.reshape(rows, 1, -1), gate[:, None]))

    @staticmethod
    def _gated_norm(mixer, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        norm = mixer.norm
        return kernels.gated_rms_norm(y, gate, norm.weight, norm.group_size, norm.variance_epsilon).to(gate.dtype)

    # ---- attention -----------------------------------------------------------------------------

    @staticmethod
    def _qkv(attn, x: torch.Tensor):
        rows, n = x.shape[:2]
        shape = (rows, n, -1, attn.head_dim)
        return (attn.q_proj(x).view(shape).transpose(1, 2), attn.k_proj(x).view(shape).transpose(1, 2),
                attn.v_proj(x).view(shape).transpose(1, 2))

    def _attend(self, attn, q, keys, values, mask) -> torch.Tensor:
        # SDPA runs grouped-query attention with a mask only on its math path (scores materialised in
        # float32); with the key-value heads repeated, the memory-efficient kernel takes the mask.
        group = q.shape[1] // keys.shape[1]
        if group > 1:
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
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
        out = kernels.decode_attention(q[:, :, 0], keys, values, index, positions + 1, length, attn.scaling)
        return attn.o_proj(out.reshape(rows, 1, -1))
