"""engine/sampler.py: greedy, tempered, top-p and seeded rows drawn in one batched call.

Statistics over thousands of rows with their own seeds: temperature divides the logits, top-p keeps the
smallest head that reaches it (after temperature), each row uses its own settings, a seed draws the same
whatever shares the step, EOS is held back until min_tokens.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine.request import EngineRequest, Message, SamplingParams, TextPart
from engine.runner import Prompt
from engine.sampler import Sampler, seeded_uniform
from engine.sequence import Sequence

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


ROWS = 4000
TOLERANCE = 0.04
EOS = 9  # outside the logits used here unless a test puts it there


class NoText:
    def push(self, token_id):
        return []

    def flush(self):
        return []


def seqs(count: int, first_seed: int = 0, **params) -> list[Sequence]:
    params.setdefault("max_tokens", 10)
    out = []
    for i in range(count):
        request = EngineRequest(f"r{i}", [Message("user", [TextPart("x")])],
                                SamplingParams(seed=first_seed + i, **params))
        seq = Sequence(request, request.params, Prompt(1, frozenset({EOS}), NoText(), None), i)
        seq.slot = first_seed + i  # each row its own slot, as the scheduler gives them
        out.append(seq)
    return out


def frequencies(logits: list[float], rows: int = ROWS, **params) -> list[float]:
    """How often each token is chosen, over `rows` rows of the same logits, each row with its own seed."""
    chosen = Sampler()(torch.tensor([logits] * rows), seqs(rows, **params))
    counts = torch.bincount(torch.tensor(chosen), minlength=len(logits)).tolist()
    return [c / rows for c in counts]


def softmax(logits: list[float], temperature: float) -> list[float]:
    weights = [math.exp(x / temperature) for x in logits]
    return [w / sum(weights) for w in weights]


LOGITS = [2.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(temperature):
    """p = softmax(logits / T). Multiplying by T instead agrees at T = 1 only: at T = 0.5 the top token would
    come up 48% of the time instead of 95%, at T = 2 95% instead of 48%."""
    got = frequencies(LOGITS, temperature=temperature, top_p=1.0)
    expected = softmax(LOGITS, temperature)
    assert all(abs(g - e) < TOLERANCE for g, e in zip(got, expected)), (got, expected)


def test_lower_temperature_concentrates_on_the_top_token():
    top = [frequencies(LOGITS, temperature=t, top_p=1.0)[0] for t in (0.1, 0.5, 1.0, 2.0)]
    assert top[0] > 0.99 and top == sorted(top, reverse=True) and top[-1] < 0.6, top


def test_a_temperature_just_above_the_greedy_bound_still_samples():
    """1e-5 is greedy; just above it the sampler samples, and with logits this close it is still a draw."""
    got = frequencies([0.0, 0.0], temperature=2e-5, top_p=1.0)
    assert min(got) > 0.4, got
    assert frequencies([0.0, 1e-9], temperature=0.0, top_p=1.0) == [0.0, 1.0]  # greedy: the exact argmax


# Probabilities 1/2, 1/4, 1/8, 1/8: every partial sum is exact in binary.
QUARTERS = [math.log(p) for p in (0.5, 0.25, 0.125, 0.125)]


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.6, 2), (0.75, 2), (0.76, 3), (0.875, 3), (0.9, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_head_that_reaches_it_and_renormalises(top_p, kept):
    got = frequencies(QUARTERS, temperature=1.0, top_p=top_p)
    head = [0.5, 0.25, 0.125, 0.125][:kept]
    expected = [p / sum(head) for p in head] + [0.0] * (4 - kept)
    assert all(g == 0.0 for g in got[kept:]), f"a token outside the top-p head was drawn: {got}"
    assert all(abs(g - e) < TOLERANCE for g, e in zip(got, expected)), (got, expected)


def test_top_p_applies_to_the_tempered_distribution():
    """At T = 0.5 the probabilities are 0.76, 0.19, 0.05, 0.05 (renormalised squares): top_p = 0.9 keeps two."""
    got = frequencies(QUARTERS, temperature=0.5, top_p=0.9)
    assert got[2] == got[3] == 0.0 and abs(got[0] - 0.8) < TOLERANCE, got


def test_each_row_uses_its_own_settings():
    """Rows with different settings in one call: each is drawn from its own distribution."""
    rows = seqs(ROWS, temperature=0.1, top_p=1.0) + seqs(ROWS, first_seed=ROWS, temperature=2.0, top_p=1.0) + \
        seqs(ROWS, first_seed=2 * ROWS, temperature=1.0, top_p=0.5, max_tokens=10)
    chosen = Sampler()(torch.tensor([LOGITS] * (3 * ROWS)), rows)
    cold, hot, cut = (chosen[i * ROWS:(i + 1) * ROWS] for i in range(3))
    assert cold.count(0) / ROWS > 0.99
    assert abs(hot.count(0) / ROWS - softmax(LOGITS, 2.0)[0]) < TOLERANCE
    assert set(cut) == {0}  # 0.71 of the mass: top_p 0.5 keeps the top token only


def test_a_seed_gives_the_same_draws_whatever_shares_the_step():
    alone = [Sampler()(torch.tensor([LOGITS]), seqs(1, first_seed=s, temperature=1.0, top_p=1.0))[0]
             for s in range(200)]
    together = Sampler()(torch.tensor([LOGITS] * 200), seqs(200, temperature=1.0, top_p=1.0))
    assert together == alone
    assert 0 < alone.count(0) < 200  # a real draw, not a constant


def test_eos_is_masked_until_min_tokens():
    logits = [0.0] * 8 + [-1e4, 5.0]  # EOS (id 9) far ahead of the rest
    rows = seqs(4, temperature=1.0, top_p=1.0, min_tokens=2)
    for s, done in zip(rows, (0, 1, 2, 3)):
        s.completion_tokens = done
    chosen = Sampler()(torch.tensor([logits] * 4), rows)
    assert [c == EOS for c in chosen] == [False, False, True, True], chosen
    greedy = seqs(2, temperature=0.0, top_p=1.0, ignore_eos=True)
    assert EOS not in Sampler()(torch.tensor([logits] * 2), greedy)
