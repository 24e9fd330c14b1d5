"""engine/sampler.py: the distribution each row is drawn from, at temperatures and top-p values other than 1.

Each test samples one step for thousands of rows at once, every row with its own seed, and compares how often
each token comes up with the probabilities the request's settings define (softmax(logits / T), cut to the
top-p head and renormalised). With 4,000 rows a frequency's standard deviation is at most 0.008; the
tolerances below are about five of those, far below the gaps a wrong formula opens.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.request import EngineRequest, Message, SamplingParams, TextPart
from engine.runner import Prompt
from engine.sampler import Sampler
from engine.sequence import Sequence

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
        out.append(Sequence(request, request.params, Prompt(1, frozenset({EOS}), NoText(), None), i))
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
