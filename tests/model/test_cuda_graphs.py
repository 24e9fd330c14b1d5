"""model/cuda_graphs.py on the CPU: the graphs built for each batch and span bucket, and what a replay computes.

A CUDA graph cannot be captured on a CPU, so each "graph" here replays the very step it would have captured,
eagerly, from the same static buffers. What is checked is ours: which buckets are built for the settings, which
one a batch takes, that padding rows write only to the scratch slot, and that a replayed step gives what the
eager step gives (logits and every state).
"""

from __future__ import annotations

import pytest
import torch

from model import kernels
from model.cuda_graphs import DecodeGraphs, batch_buckets
from model.forward import SlotForward
from model.loader import load_model
from model.state_pool import StatePool


@pytest.fixture(scope="module")
def model(tiny_path):
    model, _, _ = load_model(str(tiny_path), None, "cpu", "float32")
    return model


class EagerReplay:
    def __init__(self, graphs: DecodeGraphs, batch: int, span: int, out: torch.Tensor):
        self.graphs, self.batch, self.span, self.out = graphs, batch, span, out

    def replay(self) -> None:
        self.graphs.replayed.append((self.batch, self.span))
        self.out.copy_(self.graphs._step(self.batch, self.span))


@pytest.fixture
def cpu_graphs(monkeypatch):
    """DecodeGraphs whose capture keeps the step to replay it eagerly (no CUDA needed)."""
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

    @torch.inference_mode()
    def capture(self, batch, span):
        self.replayed = []
        self.index.fill_(self.forward.pool.scratch)
        self.positions.zero_()
        out = self._step(batch, span).clone()
        return EagerReplay(self, batch, span, out), out

    monkeypatch.setattr(DecodeGraphs, "_capture", capture)


def forward_for(model, slots: int, max_seq_len: int) -> SlotForward:
    lm = model.language_model
    return SlotForward(lm, StatePool(lm.config, slots, max_seq_len, torch.float32, torch.float32, torch.device("cpu")))


@pytest.mark.parametrize("max_batch, max_seq_len, batches, spans", [
    (6, 300, [1, 2, 4, 6], [256, 300]),
    (8, 1024, [1, 2, 4, 8], [256, 512, 1024]),
    (1, 100, [1], [100]),
])
def test_a_graph_for_every_batch_and_span_bucket_up_to_the_settings(model, cpu_graphs, max_batch, max_seq_len,
                                                                     batches, spans):
    graphs = DecodeGraphs(forward_for(model, max_batch, max_seq_len), max_batch)
    assert sorted(graphs.graphs) == [(b, s) for b in batches for s in spans]
    largest = DecodeGraphs(forward_for(model, max_batch, max_seq_len), max_batch, largest_only=True)
    assert list(largest.graphs) == [(batches[-1], spans[-1])]


def test_batch_buckets_are_fine_up_to_64_then_every_32():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 100]
    assert batch_buckets(3) == [1, 2, 3]


def test_with_the_triton_decode_attention_one_span_serves_every_length(model, cpu_graphs, monkeypatch):
    monkeypatch.setattr(kernels.backend, "runs_on", lambda device: True)
    graphs = DecodeGraphs(forward_for(model, 8, 1024), 8)
    assert sorted(graphs.graphs) == [(b, 1024) for b in (1, 2, 4, 8)]


@pytest.mark.parametrize("lengths, bucket", [((9, 23, 16), (4, 256)), ((255, 7), (2, 256)), ((256, 7), (2, 300))])
def test_a_replayed_step_equals_the_eager_step_and_padding_touches_only_the_scratch_slot(model, cpu_graphs,
                                                                                         lengths, bucket):
    """The batch takes the smallest bucket that holds its rows and its longest span (position + 1 keys)."""
    eager, graphed = forward_for(model, 6, 300), forward_for(model, 6, 300)
    graphed.graphs = DecodeGraphs(graphed, 6)
    slots = [4, 1, 3][:len(lengths)]
    prompts = [model.embed_tokens(torch.randint(20, 600, (n,), generator=torch.Generator().manual_seed(n)))
               for n in lengths]
    for fwd in (eager, graphed):
        fwd.prefill(slots, prompts, [0] * len(slots))
    untouched = [s for s in range(6) if s not in slots]
    before = {layer: t[untouched].clone() for layer, t in graphed.pool.ssm.items()}
    tokens = [31, 32, 33][:len(slots)]
    expected, got = eager.decode(slots, tokens), graphed.decode(slots, tokens)
    assert graphed.graphs.replayed == [bucket]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for kind in ("conv", "ssm"):
        for layer, t in getattr(graphed.pool, kind).items():
            torch.testing.assert_close(t[slots], getattr(eager.pool, kind)[layer][slots], rtol=1e-5, atol=1e-6)
    for layer, t in graphed.pool.ssm.items():
        assert torch.equal(t[untouched], before[layer]), f"layer {layer}: a padding row wrote to a sequence's slot"
    assert graphed.pool.lengths[:6] == eager.pool.lengths[:6]
