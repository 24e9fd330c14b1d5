"""engine/sampler.py: greedy, tempered, top-p and seeded rows drawn in one batched call."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from engine.request import SamplingParams
from engine.sampler import Sampler, seeded_uniform

MASK = (1 << 64) - 1


def splitmix(seed: int, counter: int) -> float:
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return (z >> 40) / (1 << 24)


def row(temperature=1.0, top_p=1.0, seed=None, generated=0, eos_allowed=True, slot=0):
    return SimpleNamespace(params=SamplingParams(8, temperature, top_p, seed), completion_tokens=generated, slot=slot,
                           eos_allowed=eos_allowed, prompt=SimpleNamespace(eos_ids=frozenset({0})))


def test_seeded_numbers_are_splitmix64_of_seed_and_token_index():
    seeds = [0, 1, 7, 2**63 - 1, -(2**63), -5, 123456789]
    counters = [0, 1, 2, 1000, 5, 17, 4095]
    got = seeded_uniform(torch.tensor(seeds), torch.tensor(counters)).tolist()
    assert got == [splitmix(s & MASK, c) for s, c in zip(seeds, counters)]
    assert all(0.0 <= u < 1.0 for u in got)


def test_a_seeded_row_does_not_depend_on_its_neighbours():
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(0))
    sampler = Sampler()
    seeded = row(seed=42, slot=5)
    alone = [sampler(logits, [seeded])[0] for _ in range(20)]  # its slot counts the numbers it drew
    crowd = torch.cat([torch.randn(3, 500), logits, torch.randn(2, 500)])
    again = row(seed=42, slot=1)  # a new sequence: its slot starts counting afresh
    others = [row(slot=0), row(0.0, slot=2), row(top_p=0.5, slot=3), again, row(seed=1, slot=4), row(slot=6)]
    together = [sampler(crowd, others)[3] for _ in range(20)]
    assert alone == together and len(set(alone)) > 1


def test_sampled_frequencies_follow_temperature_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20_000, 4).clone()
    sampler = Sampler()
    counts = torch.bincount(sampler.sample(logits.clone(), [row()] * 20_000), minlength=4) / 20_000
    assert torch.allclose(counts, probs, atol=0.02)
    cut = torch.bincount(sampler.sample(logits.clone(), [row(top_p=0.7)] * 20_000), minlength=4) / 20_000
    assert torch.allclose(cut, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.02)  # 0.5 + 0.3 reach 0.7
    hot = torch.bincount(sampler.sample(logits.clone(), [row(temperature=2.0)] * 20_000), minlength=4) / 20_000
    assert torch.allclose(hot, probs.sqrt() / probs.sqrt().sum(), atol=0.02)


def test_greedy_rows_and_held_eos_in_a_mixed_batch():
    logits = torch.zeros(3, 10)
    logits[:, 0] = 50.0  # EOS
    logits[:, 4] = 10.0
    chosen = Sampler()(logits, [row(0.0), row(0.0, eos_allowed=False), row(1.0, eos_allowed=False)])
    assert chosen == [0, 4, 4]


def test_a_slot_taken_by_a_new_sequence_samples_with_the_new_settings():
    logits = torch.tensor([[0.0, 5.0]]).expand(2000, 2).clone()
    sampler = Sampler()
    cold = row(temperature=0.01, slot=0)
    assert set(sampler.sample(logits.clone(), [cold] * 2000).tolist()) == {1}
    hot = row(temperature=100.0, slot=0)
    share = sampler.sample(logits.clone(), [hot] * 2000).float().mean().item()
    assert 0.4 < share < 0.6
