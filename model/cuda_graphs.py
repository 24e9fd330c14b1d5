"""CUDA graphs of one decoding step, for buckets of batch size and attention span.

A decoding step of this model is about a thousand small kernels; launched one by one from Python,
their launch time exceeds the GPU time at small batches. Each graph replays a whole step for a
batch-size bucket (1, 2, 4, 8, then every 8 up to 64, then every 32, up to MAX_BATCH_SIZE: a batch
pays for at most a few rows it does not have). With the Triton decode attention, which reads each
row's keys up to its own length, one graph serves every attention span; on the PyTorch path spans are
bucketed too (powers of two from 256 up to MAX_MODEL_LEN). A batch is padded up to its bucket with
rows that point at the pool's scratch slot, which the kernels skip, so padding neither touches a
sequence's state nor moves state memory; inputs are copied into static buffers before each replay.
ENFORCE_EAGER=1 turns this off.
"""

from __future__ import annotations

import logging
import time

import torch

from model import kernels
from model.forward import SlotForward

log = logging.getLogger(__name__)
MIN_SPAN = 256


def batch_buckets(limit: int) -> list[int]:
    sizes = [b for b in (1, 2, 4) if b < limit]
    size = 8
    while size < limit:
        sizes.append(size)
        size += 8 if size < 64 else 32
    return sizes + [limit]


def _buckets(start: int, limit: int) -> list[int]:
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


class DecodeGraphs:
    def __init__(self, forward: SlotForward, max_batch: int, largest_only: bool = False):
        """`largest_only`: capture just the biggest graph, whose memory the others share (for sizing)."""
        self.forward = forward
        pool = forward.pool
        self.device = forward.lm.lm_head.weight.device
        self.batches = batch_buckets(max_batch)
        one_span = kernels.backend.runs_on(self.device)  # the Triton decode attention reads each row's own length
        self.spans = [pool.max_seq_len] if one_span else _buckets(min(MIN_SPAN, pool.max_seq_len), pool.max_seq_len)
        rows = self.batches[-1]
        self.ids = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.index = torch.full((rows,), pool.scratch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.memory = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        started = time.perf_counter()
        # Largest first: later graphs reuse the memory the first one sized.
        for batch in reversed(self.batches):
            for span in reversed(self.spans):
                self.graphs[(batch, span)] = self._capture(batch, span)
                if largest_only:
                    break
            if largest_only:
                break
        log.info("captured %d decoding graphs (batch %s x span %s) in %.1fs", len(self.graphs), self.batches,
                 self.spans, time.perf_counter() - started)

    def _step(self, batch: int, span: int) -> torch.Tensor:
        return self.forward.decode_step(self.ids[:batch], self.index[:batch], self.positions[:batch], span)

    @torch.inference_mode()
    def _capture(self, batch: int, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Every row points at the scratch slot while capturing: the warm-up runs for real.
        self.index.fill_(self.forward.pool.scratch)
        self.positions.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(batch, span)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory):
            logits = self._step(batch, span)
        return graph, logits

    def run(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor | None:
        """Logits for the rows, or None when no captured graph fits (the caller runs eagerly)."""
        n, needed = len(slots), max(positions)
        fits = [key for key in self.graphs if key[0] >= n and key[1] > needed]
        if not fits:
            return None
        batch, span = min(fits)
        pad = batch - n
        scratch = self.forward.pool.scratch
        host = torch.tensor([tokens + [0] * pad, slots + [scratch] * pad, positions + [0] * pad], dtype=torch.long)
        # Pinned and non-blocking: the host goes on to the replay at once (a pageable copy waits for the
        # device); the caching host allocator keeps the pinned block until the copy has run.
        if self.device.type == "cuda":
            host = host.pin_memory()
        staged = host.to(self.device, non_blocking=True)
        self.ids[:batch].copy_(staged[0])
        self.index[:batch].copy_(staged[1])
        self.positions[:batch].copy_(staged[2])
        graph, logits = self.graphs[(batch, span)]
        graph.replay()
        return logits[:n]
