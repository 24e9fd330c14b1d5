"""Per-sequence state in preallocated slots: Mamba conv and SSM states, attention KV, lengths.

Slot `s` of every tensor belongs to one running sequence; joining or leaving touches only that slot.
The pool is allocated once, at start, so decoding never allocates or reshapes the batch's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import NemotronHConfig

MAMBA, ATTENTION = "linear_attention", "full_attention"


@dataclass(frozen=True)
class PoolShape:
    mamba_layers: int
    attention_layers: int
    conv_dim: int
    conv_width: int  # kernel - 1 columns of past input
    ssm_heads: int
    ssm_head_dim: int
    ssm_state: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: NemotronHConfig) -> PoolShape:
        types = list(config.layers_block_type)
        heads, head_dim = config.mamba_num_heads, config.mamba_head_dim
        return cls(mamba_layers=types.count(MAMBA), attention_layers=types.count(ATTENTION),
                   conv_dim=heads * head_dim + 2 * config.n_groups * config.ssm_state_size,
                   conv_width=config.conv_kernel - 1, ssm_heads=heads, ssm_head_dim=head_dim,
                   ssm_state=config.ssm_state_size, kv_heads=config.num_key_value_heads, head_dim=config.head_dim)

    def bytes_per_slot(self, max_seq_len: int, dtype: torch.dtype, ssm_dtype: torch.dtype) -> int:
        size, ssm_size = dtype.itemsize, ssm_dtype.itemsize
        mamba = self.conv_dim * self.conv_width * size + self.ssm_heads * self.ssm_head_dim * self.ssm_state * ssm_size
        kv = 2 * self.kv_heads * max_seq_len * self.head_dim * size
        return self.mamba_layers * mamba + self.attention_layers * kv


class StatePool:
    """`num_slots` slots for sequences plus one scratch slot (index `scratch`), where the padding rows of
    a CUDA-graph batch write their meaningless state."""

    def __init__(self, config: NemotronHConfig, num_slots: int, max_seq_len: int, dtype: torch.dtype,
                 ssm_dtype: torch.dtype, device: torch.device):
        shape = PoolShape.of(config)
        self.shape, self.num_slots, self.max_seq_len, self.device = shape, num_slots, max_seq_len, device
        self.scratch = num_slots
        num_slots += 1
        # Indexed by the model's layer number, so a layer finds its own state directly.
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for layer, kind in enumerate(config.layers_block_type):
            if kind == MAMBA:
                self.conv[layer] = torch.zeros(num_slots, shape.conv_dim, shape.conv_width, dtype=dtype, device=device)
                self.ssm[layer] = torch.zeros(num_slots, shape.ssm_heads, shape.ssm_head_dim, shape.ssm_state,
                                              dtype=ssm_dtype, device=device)
            elif kind == ATTENTION:
                kv = (num_slots, shape.kv_heads, max_seq_len, shape.head_dim)
                self.keys[layer] = torch.zeros(kv, dtype=dtype, device=device)
                self.values[layer] = torch.zeros(kv, dtype=dtype, device=device)
        self.lengths = [0] * num_slots  # tokens held per slot (host side: the scheduler reads them every step)

    def reset(self, slot: int) -> None:
        """A new sequence starts here: no past input for the convolution, no recurrent state."""
        self.reset_slots([slot])

    def reset_slots(self, slots: list[int]) -> None:
        """`reset` for several slots at once: one kernel per state tensor, whatever the number of slots."""
        if not slots:
            return
        index = torch.tensor(slots, device=self.device) if len(slots) > 1 else slots[0]
        for state in (*self.conv.values(), *self.ssm.values()):
            state[index] = 0
        for slot in slots:
            self.lengths[slot] = 0
