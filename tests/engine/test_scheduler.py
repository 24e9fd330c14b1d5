"""engine/scheduler.py: slots, chunked prefill budget, priority, abort."""

from __future__ import annotations

from engine.request import EngineRequest, Message, SamplingParams, TextPart
from engine.runner import Prompt
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status


class NoText:
    def push(self, token_id):
        return []

    def flush(self):
        return []


def seq(name: str, prompt: int, arrival: int, priority: int = 0) -> Sequence:
    request = EngineRequest(name, [Message("user", [TextPart(name)])], SamplingParams(max_tokens=4), priority)
    return Sequence(request, request.params, Prompt(prompt, frozenset({0}), NoText(), None), arrival)


def advance(plan) -> None:
    """What the engine does after a step: chunks are done, sequences that finished prefill decode next."""
    for s, chunk in plan.prefill:
        s.num_prefilled = chunk.end


def test_prompts_are_prefilled_in_chunks_within_the_budget():
    sched = Scheduler(num_slots=4, max_prefill_tokens=100)
    a, b = seq("a", 250, 0), seq("b", 30, 1)
    sched.add(a)
    sched.add(b)
    plans = []
    for _ in range(10):
        if a.prefilled and b.prefilled:
            break
        plan = sched.schedule()
        plans.append([(s.request_id, c.start, c.end) for s, c in plan.prefill])
        assert plan.prefill_tokens <= 100
        advance(plan)
    # The first prompt keeps its place; the second starts as soon as the budget has room.
    assert plans == [[("a", 0, 100)], [("a", 100, 200)], [("a", 200, 250), ("b", 0, 30)]]
    plan = sched.schedule()
    assert [s.request_id for s in plan.decode] == ["a", "b"] and not plan.prefill


def test_slots_bound_running_sequences_and_are_reused_lowest_first():
    sched = Scheduler(num_slots=2, max_prefill_tokens=1000)
    seqs = [seq(f"s{i}", 10, i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    advance(sched.schedule())
    assert [s.slot for s in seqs[:2]] == [0, 1] and seqs[2].status is Status.WAITING
    assert sched.num_running == 2 and sched.num_waiting == 1
    sched.finish(seqs[0])
    plan = sched.schedule()
    assert seqs[2].slot == 0 and [s.request_id for s, _ in plan.prefill] == ["s2"]
    assert [s.request_id for s in plan.decode] == ["s1"]


def test_lower_priority_value_runs_first_then_arrival():
    sched = Scheduler(num_slots=1, max_prefill_tokens=1000)
    for s in (seq("late-normal", 5, 0), seq("urgent", 5, 1, priority=-5), seq("normal", 5, 2), seq("low", 5, 3, 9)):
        sched.add(s)
    order = []
    for _ in range(10):
        if not sched.has_work():
            break
        plan = sched.schedule()
        for s, _ in plan.prefill:
            order.append(s.request_id)
            sched.finish(s)
    assert order == ["urgent", "late-normal", "normal", "low"]


def test_abort_takes_a_request_out_wherever_it_is():
    sched = Scheduler(num_slots=1, max_prefill_tokens=1000)
    running, waiting = seq("running", 5, 0), seq("waiting", 5, 1)
    sched.add(running)
    sched.add(waiting)
    advance(sched.schedule())
    assert sched.remove("waiting") is waiting and sched.num_waiting == 0
    assert sched.remove("running") is running and sched.num_running == 0
    assert sched.remove("unknown") is None
    assert not sched.has_work() and not sched.schedule()
    # The freed slot and the skipped heap entry do not leak into later work.
    nxt = seq("next", 5, 2)
    sched.add(nxt)
    plan = sched.schedule()
    assert [s.request_id for s, _ in plan.prefill] == ["next"] and nxt.slot == 0


def test_a_prompt_admitted_after_a_continuing_chunk_gets_only_the_budget_left():
    """One step's prefill, continuing chunks and new prompts together, never exceeds MAX_PREFILL_TOKENS."""
    sched = Scheduler(num_slots=4, max_prefill_tokens=100)
    a = seq("a", 150, 0)
    sched.add(a)
    advance(sched.schedule())  # a: 0..100
    b, c = seq("b", 100, 1), seq("c", 10, 2)
    sched.add(b)
    sched.add(c)
    plan = sched.schedule()
    assert [(s.request_id, ch.start, ch.end) for s, ch in plan.prefill] == [("a", 100, 150), ("b", 0, 50)]
    assert plan.prefill_tokens == 100 and c.status is Status.WAITING  # no budget left: c waits, slot or not
    advance(plan)
    plan = sched.schedule()
    assert [(s.request_id, ch.start, ch.end) for s, ch in plan.prefill] == [("b", 50, 100), ("c", 0, 10)]
    assert [s.request_id for s in plan.decode] == ["a"]


def test_a_prompt_of_exactly_the_budget_takes_one_step_and_one_more_token_takes_two():
    for length, chunks in ((100, [(0, 100)]), (101, [(0, 100), (100, 101)])):
        sched = Scheduler(num_slots=1, max_prefill_tokens=100)
        s = seq("s", length, 0)
        sched.add(s)
        got = []
        for _ in range(5):
            if s.prefilled:
                break
            plan = sched.schedule()
            got += [(ch.start, ch.end) for _, ch in plan.prefill]
            advance(plan)
        assert got == chunks, (length, got)
        assert [x.request_id for x in sched.schedule().decode] == ["s"]


def test_every_slot_can_be_used_and_one_more_request_waits():
    sched = Scheduler(num_slots=3, max_prefill_tokens=1000)
    seqs = [seq(f"s{i}", 5, i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    advance(sched.schedule())
    assert sorted(s.slot for s in seqs[:3]) == [0, 1, 2] and sched.num_running == 3
    assert seqs[3].status is Status.WAITING and seqs[3].slot is None
    assert [s.request_id for s in sched.schedule().decode] == ["s0", "s1", "s2"]  # and nothing new joins
