"""Next-token choice for the whole batch at once, on the logits' device.

Per-row temperature and top-p are tensors; greedy rows take the exact argmax; sampled rows use the
exponential race (argmax of p / E with E ~ Exp(1)), which draws from p with one random number per
vocabulary entry. A request with a seed draws its numbers from its own generator, so its caption
does not depend on what else shares the step. Only the chosen ids cross to the host.
"""

from __future__ import annotations

import secrets

import torch

from engine.sequence import Sequence


def _generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    if seq.params.seed is None:
        return None
    if seq.generator is None:
        seq.generator = torch.Generator(device=device)
        seq.generator.manual_seed(seq.params.seed)
    return seq.generator


class Sampler:
    def __init__(self):
        self._shared: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            generator = torch.Generator(device=device)
            generator.manual_seed(secrets.randbits(63))
            self._shared[device] = generator
        return self._shared[device]

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """`logits`: (len(seqs), vocab); returns one token id per row."""
        logits = logits.float()
        self._mask_eos(logits, seqs)
        flags = [s.params.greedy for s in seqs]  # decided on the host: no device sync before the one below
        chosen = logits.argmax(dim=-1)
        if not all(flags):
            greedy = torch.tensor(flags, device=logits.device)
            chosen = torch.where(greedy, chosen, self._sample(logits, seqs))
        return chosen.tolist()

    @staticmethod
    def _mask_eos(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens and ignore_eos: EOS cannot be chosen yet."""
        rows, cols = [], []
        for row, seq in enumerate(seqs):
            if not seq.eos_allowed:
                for eos in seq.prompt.eos_ids:
                    if eos < logits.shape[-1]:
                        rows.append(row)
                        cols.append(eos)
        if rows:
            logits[rows, cols] = float("-inf")

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        # Greedy rows get temperature 1 here; their sampled value is discarded.
        temperature = torch.tensor([1.0 if s.params.greedy else s.params.temperature for s in seqs], device=device)
        top_ps = [s.params.top_p for s in seqs]
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        if any(p < 1.0 for p in top_ps):
            top_p = torch.tensor(top_ps, device=device)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest head whose mass reaches top_p; the top token always stays.
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        race = torch.empty_like(probs)
        race.exponential_(generator=self._shared_generator(device))
        for row, seq in enumerate(seqs):
            generator = _generator(seq, device)
            if generator is not None:
                race[row].exponential_(generator=generator)
        # An exact zero draw would turn 0/0 into NaN, which argmax would pick.
        return (probs / race.clamp_(min=1e-20)).argmax(dim=-1)
