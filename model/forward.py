"""The language model's forward pass over slot state: prefill chunks and batched decoding steps.

The layers and weights are transformers' native NemotronH modules; only the state handling is ours,
so that each sequence keeps its Mamba and attention state in its own slot of a `StatePool`. The
Mamba time step is limited by the config's `time_step_limit` ((0, inf) for this model, as the
checkpoint's own kernels and vLLM use) in both the chunked and the recurrent path; transformers'
native mixer clamps the chunked path at `time_step_min`, which makes prompt states too large.
NemotronH attention has no positional encoding, so a slot needs only its length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import NemotronHForCausalLM
from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

from model import kernels
from model.state_pool import ATTENTION, MAMBA, StatePool


class SlotForward:
    def __init__(self, lm: NemotronHForCausalLM, pool: StatePool):
        self.lm = lm
        self.pool = pool
        self.config = lm.config
        self.time_step_limit = tuple(self.config.time_step_limit)
        self.graphs = None  # model/cuda_graphs.py sets this on a GPU unless ENFORCE_EAGER

    # ---- entry points --------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, embeds: torch.Tensor, start: int, want_logits: bool) -> torch.Tensor | None:
        """Positions [start, start + len(embeds)) of the sequence in `slot`; embeds: (n, hidden)."""
        if start == 0:
            self.pool.reset(slot)
        hidden = embeds[None]
        for layer, block in enumerate(self.lm.model.layers):
            residual = hidden
            x = block.norm(hidden.to(dtype=block.norm.weight.dtype))
            if block.block_type == MAMBA:
                x = self._mamba_chunk(block.mixer, layer, slot, x, start)
            elif block.block_type == ATTENTION:
                x = self._attention_chunk(block.mixer, layer, slot, x, start)
            else:
                x = block.mixer(x)
            hidden = residual + x
        self.pool.lengths[slot] = start + embeds.shape[0]
        return self._logits(hidden[:, -1]) if want_logits else None

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
        hidden = self.lm.model.embeddings(ids)[:, None]
        for layer, block in enumerate(self.lm.model.layers):
            residual = hidden
            x = block.norm(hidden.to(dtype=block.norm.weight.dtype))
            if block.block_type == MAMBA:
                x = self._mamba_step(block.mixer, layer, index, x)
            elif block.block_type == ATTENTION:
                x = self._attention_step(block.mixer, layer, index, positions, length, x)
            else:
                x = block.mixer(x)
            hidden = residual + x
        return self._logits(hidden[:, -1])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(self.lm.model.norm_f(hidden)).float()

    # ---- Mamba ---------------------------------------------------------------------------------

    @staticmethod
    def _split(mixer, projected: torch.Tensor):
        return projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)

    def _mamba_chunk(self, mixer, layer: int, slot: int, x: torch.Tensor, start: int) -> torch.Tensor:
        n = x.shape[1]
        gate, xbc, dt = self._split(mixer, mixer.in_proj(x))
        conv_state = self.pool.conv[layer]
        # The convolution sees the slot's last inputs before this chunk (zeros at the start).
        history = torch.cat([conv_state[slot][None].to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)
        conv_state[slot] = history[0, :, -conv_state.shape[-1]:]
        weight = mixer.conv1d.weight.squeeze(1)
        xbc = F.silu(F.conv1d(history.to(weight.dtype), weight.unsqueeze(1), mixer.conv1d.bias,
                              groups=mixer.conv_dim)).transpose(1, 2).to(x.dtype)
        groups, state = mixer.n_groups, mixer.ssm_state_size
        hs, b, c = xbc.split([mixer.intermediate_size, groups * state, groups * state], dim=-1)
        ssm_state = self.pool.ssm[layer]
        y, final = mamba2_chunk_scan(
            hs.reshape(1, n, mixer.num_heads, mixer.head_dim), dt, -torch.exp(mixer.A_log.float()),
            b.reshape(1, n, groups, state), c.reshape(1, n, groups, state), chunk_size=mixer.chunk_size,
            D=mixer.D, dt_bias=mixer.dt_bias, initial_states=ssm_state[slot][None] if start else None,
            dt_softplus=True, dt_limit=self.time_step_limit, return_final_states=True)
        ssm_state[slot] = final[0].to(ssm_state.dtype)
        y = mixer.norm(y.reshape(1, n, -1), gate)
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

    def _attention_chunk(self, attn, layer: int, slot: int, x: torch.Tensor, start: int) -> torch.Tensor:
        n = x.shape[1]
        q, k, v = self._qkv(attn, x)
        end = start + n
        self.pool.keys[layer][slot, :, start:end] = k[0]
        self.pool.values[layer][slot, :, start:end] = v[0]
        positions = torch.arange(end, device=x.device)
        mask = positions[None, :] <= positions[start:, None]  # causal, offset by what the slot already holds
        return self._attend(attn, q, self.pool.keys[layer][slot:slot + 1, :, :end],
                            self.pool.values[layer][slot:slot + 1, :, :end], mask)

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
