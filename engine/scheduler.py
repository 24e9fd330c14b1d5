"""Which sequences run in the next step.

Every step: all prefilled sequences decode one token; prompts are prefilled in chunks within a
token budget (MAX_PREFILL_TOKENS), unfinished prompts first, then waiting requests by priority
(lower first) and arrival, each taking the lowest free slot. Running sequences are never preempted.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from engine.runner import PrefillChunk
from engine.sequence import Sequence, Status


@dataclass
class StepPlan:
    prefill: list[tuple[Sequence, PrefillChunk]] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)  # in slot order

    @property
    def prefill_tokens(self) -> int:
        return sum(chunk.end - chunk.start for _, chunk in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int):
        if num_slots < 1 or max_prefill_tokens < 1:
            raise ValueError("the scheduler needs at least one slot and one prefill token per step")
        self.num_slots = num_slots
        self.max_prefill_tokens = max_prefill_tokens
        self._free_slots = list(range(num_slots))  # a heap: the lowest free slot is taken first
        self._waiting: list[tuple[int, int, Sequence]] = []  # heap of (priority, arrival, seq)
        self._waiting_ids: dict[str, Sequence] = {}
        self.running: dict[str, Sequence] = {}

    @property
    def num_waiting(self) -> int:
        return len(self._waiting_ids)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self._waiting_ids or self.running)

    def add(self, seq: Sequence) -> None:
        heapq.heappush(self._waiting, (seq.request.priority, seq.arrival, seq))
        self._waiting_ids[seq.request_id] = seq

    def schedule(self) -> StepPlan:
        plan = StepPlan(decode=sorted((s for s in self.running.values() if s.prefilled), key=lambda s: s.slot))
        budget = self.max_prefill_tokens
        for seq in sorted((s for s in self.running.values() if not s.prefilled), key=lambda s: s.arrival):
            if budget <= 0:
                return plan
            budget -= self._chunk(plan, seq, budget)
        while budget > 0 and self._free_slots:
            seq = self._pop_waiting()
            if seq is None:
                break
            seq.slot = heapq.heappop(self._free_slots)
            seq.status = Status.RUNNING
            self.running[seq.request_id] = seq
            budget -= self._chunk(plan, seq, budget)
        return plan

    def _pop_waiting(self) -> Sequence | None:
        while self._waiting:
            _, _, seq = heapq.heappop(self._waiting)
            if self._waiting_ids.pop(seq.request_id, None) is seq:  # skip entries aborted while waiting
                return seq
        return None

    @staticmethod
    def _chunk(plan: StepPlan, seq: Sequence, budget: int) -> int:
        end = min(seq.prompt.length, seq.num_prefilled + budget)
        plan.prefill.append((seq, PrefillChunk(seq.slot, seq.prompt, seq.num_prefilled, end)))
        return end - seq.num_prefilled

    def finish(self, seq: Sequence) -> None:
        """A running sequence is done: its slot goes back to the pool."""
        seq.status = Status.FINISHED
        if self.running.pop(seq.request_id, None) is seq and seq.slot is not None:
            heapq.heappush(self._free_slots, seq.slot)

    def remove(self, request_id: str) -> Sequence | None:
        """Take a request out wherever it is (abort); None when it is not here."""
        seq = self._waiting_ids.pop(request_id, None)
        if seq is not None:
            seq.status = Status.FINISHED  # its heap entry is skipped when popped
            return seq
        seq = self.running.get(request_id)
        if seq is not None:
            self.finish(seq)
        return seq
