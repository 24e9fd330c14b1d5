"""Next-token choice for the whole batch at once, on the logits' device.

Greedy rows take the exact argmax. Sampled rows draw by inverse CDF: one uniform number per row
(not one per vocabulary entry), found in the cumulative sum of the row's tempered, top-p-cut
probabilities. A request with a seed gets its numbers from a counter-based hash of (seed, token
index): its caption does not depend on what else shares the step, and every seeded row of the
batch is drawn in the same call, without a generator per row. Temperature, top-p and seeds live in
per-slot tensors on the device (`SlotSettings`). Only the chosen ids cross to the host.
"""

from __future__ import annotations

import secrets
import weakref

import torch

from engine.sequence import Sequence

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def seeded_uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """SplitMix64 of (seed, counter) per row -> float32 in [0, 1); int64 arithmetic wraps on CPU and GPU alike."""
    z = seeds + (counters + 1) * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) / float(1 << 24)  # 24 bits: exact in float32, below 1


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability passes uniform * total (never a zero-probability one)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


class SlotSettings:
    """Sampling settings per slot, on the device: written once when a sequence takes its slot, so a step
    copies only its rows' slot numbers, not lists of settings."""

    def __init__(self, device: torch.device, size: int = 64):
        self.device = device
        self.owner: list[weakref.ref | None] = [None] * size  # whose settings each slot holds
        self.settings = torch.ones(size, 2, device=device)  # temperature (1 for greedy rows: unused), top_p
        self.seeds = torch.zeros(size, dtype=torch.int64, device=device)
        self.seeded = torch.zeros(size, dtype=torch.bool, device=device)
        self.drawn = torch.zeros(size, dtype=torch.int64, device=device)  # numbers drawn: a seeded row's counter

    def _grow(self, size: int) -> None:
        extra = size - len(self.owner)
        self.owner += [None] * extra
        self.settings = torch.cat([self.settings, torch.ones(extra, 2, device=self.device)])
        self.seeds, self.seeded, self.drawn = (torch.cat([t, torch.zeros(extra, dtype=t.dtype, device=self.device)])
                                               for t in (self.seeds, self.seeded, self.drawn))

    def rows(self, seqs: list[Sequence]) -> torch.Tensor:
        """The rows' slots, as an index on the device; a slot with a new sequence gets its settings first."""
        slots = [seq.slot for seq in seqs]
        if max(slots) >= len(self.owner):
            self._grow(max(2 * len(self.owner), max(slots) + 1))
        for seq, slot in zip(seqs, slots):
            p = seq.params  # one object per sequence; a weak reference, so finished requests are not kept
            owner = self.owner[slot]
            if owner is None or owner() is not p:
                self.owner[slot] = weakref.ref(p)
                self.settings[slot] = torch.tensor([1.0 if p.greedy else p.temperature, p.top_p])
                self.seeds[slot] = _signed(p.seed) if p.seed is not None else 0
                self.seeded[slot] = p.seed is not None
                self.drawn[slot] = seq.completion_tokens
        return Sampler._tensor(slots, self.device)


class Sampler:
    def __init__(self):
        self._shared: dict[torch.device, torch.Generator] = {}
        self._slot_settings: SlotSettings | None = None

    def _slots(self, device: torch.device) -> SlotSettings:
        if self._slot_settings is None or self._slot_settings.device != device:
            self._slot_settings = SlotSettings(device)
        return self._slot_settings

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            generator = torch.Generator(device=device)
            generator.manual_seed(secrets.randbits(63))
            self._shared[device] = generator
        return self._shared[device]

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """`logits`: (len(seqs), vocab); returns one token id per row."""
        return self.sample(logits, seqs).tolist()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The chosen ids as a tensor on the logits' device (no sync)."""
        logits = logits.float()
        self._mask_eos(logits, seqs)
        chosen = logits.argmax(dim=-1)
        greedy = [s.params.greedy for s in seqs]  # decided on the host: no device sync
        if all(greedy):
            return chosen
        return torch.where(self._tensor(greedy, logits.device), chosen, self._sample(logits, seqs))

    @staticmethod
    def _tensor(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    def _mask_eos(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens and ignore_eos: EOS cannot be chosen yet (one indexed write per EOS set)."""
        held: dict[frozenset[int], list[int]] = {}
        for row, seq in enumerate(seqs):
            if not seq.eos_allowed:
                held.setdefault(seq.prompt.eos_ids, []).append(row)
        for eos_ids, rows in held.items():
            cols = [eos for eos in eos_ids if eos < logits.shape[-1]]
            if cols:
                logits[self._tensor(rows, logits.device)[:, None], self._tensor(cols, logits.device)[None, :]] = \
                    float("-inf")

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        table = self._slots(device)
        slots = table.rows(seqs)
        temperature, top_p = table.settings[slots].unbind(-1)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        uniform = torch.rand(len(seqs), device=device, generator=self._shared_generator(device))
        if any(s.params.seed is not None for s in seqs):
            uniform = torch.where(table.seeded[slots], seeded_uniform(table.seeds[slots], table.drawn[slots]), uniform)
        table.drawn[slots] += 1
        if any(s.params.top_p < 1.0 for s in seqs):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest head whose mass reaches top_p; the top token always stays. Back in
            # vocabulary order, so a row draws the same token whether or not its neighbours use top-p.
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill_(drop, 0.0))
        return _inverse_cdf(probs, uniform).clamp_(max=probs.shape[-1] - 1)
