"""engine/llm_engine.py on the mock runner: continuous batching, errors on one channel, abort, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.llm_engine import LLMEngine
from engine.request import EngineRequest, ImageInput, ImagePart, Message, SamplingParams, TextPart
from model.mock import MockRunner


def request(name: str, max_tokens: int = 50, priority: int = 0, words: int = 1, **params) -> EngineRequest:
    text = " ".join([name] * words)
    return EngineRequest(name, [Message("user", [TextPart(text)])], SamplingParams(max_tokens=max_tokens, **params),
                         priority)


def image_request(name: str, tiles: int, max_tokens: int = 5) -> EngineRequest:
    image = ImageInput(np.full((tiles, 512, 512, 3), 7, dtype=np.uint8), 512, 512)
    return EngineRequest(name, [Message("user", [ImagePart(image), TextPart("x")])], SamplingParams(max_tokens))


def drain(engine: LLMEngine, limit: int = 10_000) -> tuple[dict[str, list], dict[str, int]]:
    """Step until idle: outputs per request and the step at which each finished."""
    outputs: dict[str, list] = {}
    finished: dict[str, int] = {}
    for step in range(limit):
        if not engine.has_unfinished():
            return outputs, finished
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                finished[out.request_id] = step
    raise AssertionError("engine did not finish")


def test_a_short_request_joining_late_leaves_before_the_long_ones():
    engine = LLMEngine(MockRunner(8, 4096), 8, 2048)
    for i in range(4):
        engine.add_request(request(f"long{i}", max_tokens=200, ignore_eos=True))
    for _ in range(20):
        engine.step()
    engine.add_request(request("short", max_tokens=4))
    outputs, finished = drain(engine)
    assert finished["short"] <= 20 + 4 + 1  # its prefill step plus its own tokens
    assert all(finished[f"long{i}"] > finished["short"] + 100 for i in range(4))
    assert outputs["short"][-1].completion_tokens == 4 and outputs["short"][-1].finish_reason == "length"


def test_a_finished_sequence_gives_its_slot_to_the_next_request_at_once():
    engine = LLMEngine(MockRunner(1, 4096), 1, 2048)
    engine.add_request(request("first", max_tokens=3))
    engine.add_request(request("second", max_tokens=3))
    _, finished = drain(engine)
    assert finished == {"first": 2, "second": 5}  # no step without work in between


def test_priority_overtakes_the_queue_but_not_running_sequences():
    engine = LLMEngine(MockRunner(1, 4096), 1, 2048)
    for name in ("running", "queued1", "queued2"):
        engine.add_request(request(name, max_tokens=5))
    engine.step()
    engine.add_request(request("urgent", max_tokens=5, priority=-1))
    _, finished = drain(engine)
    assert sorted(finished, key=finished.get) == ["running", "urgent", "queued1", "queued2"]


def test_abort_frees_the_slot_within_a_step_and_sends_nothing_more():
    engine = LLMEngine(MockRunner(1, 4096), 1, 2048)
    engine.add_request(request("gone", max_tokens=100, ignore_eos=True))
    engine.add_request(request("next", max_tokens=3))
    engine.step()
    assert engine.abort("gone") and not engine.abort("gone")
    outputs, finished = drain(engine)
    assert "gone" not in outputs and finished["next"] <= 3
    assert engine.scheduler.num_running == 0


def test_chunked_prefill_spreads_a_long_prompt_over_steps_without_stalling_decoding():
    engine = LLMEngine(MockRunner(4, 8192), 4, 256)
    engine.add_request(request("decoding", max_tokens=60, ignore_eos=True))
    engine.step()
    engine.add_request(image_request("big", tiles=13))  # 3,330 prompt tokens: 14 chunks of 256
    prefill_steps = 0
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        outs = engine.step()
        if engine.stats.prefill_tokens:
            prefill_steps += 1
            assert engine.stats.prefill_tokens <= 256
            assert any(o.request_id == "decoding" for o in outs) or engine.stats.decode_rows == 0
    assert not engine.has_unfinished(), "the engine never finished"
    assert prefill_steps == 14


def test_a_request_that_can_never_fit_is_refused_with_400():
    engine = LLMEngine(MockRunner(2, 1000), 2, 2048)
    engine.add_request(image_request("too-big", tiles=13))
    engine.add_request(request("fits", max_tokens=5))
    outputs, _ = drain(engine)
    error = outputs["too-big"][-1].error
    assert error.status == 400 and error.code == "request_too_large" and "MAX_MODEL_LEN" in error.message
    assert outputs["fits"][-1].finish_reason == "length"


class FlakyRunner(MockRunner):
    """Fails the prefill of chosen requests (by prompt length) or the whole decoding step."""

    def __init__(self, *args, fail_prefill: dict[int, Exception] | None = None, fail_decode_at: int = -1, **kw):
        super().__init__(*args, **kw)
        self.fail_prefill = fail_prefill or {}
        self.fail_decode_at = fail_decode_at
        self.decodes = 0

    def prefill(self, chunks):
        for chunk in chunks:
            if chunk.prompt.length in self.fail_prefill:
                raise self.fail_prefill[chunk.prompt.length]
        return super().prefill(chunks)

    def decode(self, slots, tokens):
        self.decodes += 1
        if self.decodes == self.fail_decode_at:
            raise RuntimeError("device lost")
        return super().decode(slots, tokens)


def test_a_failing_prefill_costs_only_its_own_request():
    runner = FlakyRunner(8, 4096, fail_prefill={3: torch.OutOfMemoryError("CUDA out of memory"),
                                                4: ValueError("bad")})
    engine = LLMEngine(runner, 8, 2048)
    engine.add_request(request("running", max_tokens=30, ignore_eos=True))
    engine.step()
    engine.add_request(request("oom", words=3))
    engine.add_request(request("broken", words=4))
    engine.add_request(request("fine", words=5, max_tokens=6))
    outputs, _ = drain(engine)
    assert outputs["oom"][-1].error.status == 503 and outputs["oom"][-1].error.code == "gpu_out_of_memory"
    assert outputs["broken"][-1].error.status == 500
    assert outputs["running"][-1].completion_tokens == 30 and outputs["running"][-1].error is None
    assert outputs["fine"][-1].finish_reason == "length"


def test_a_failing_decoding_step_ends_the_sequences_in_it_and_the_engine_goes_on():
    engine = LLMEngine(FlakyRunner(4, 4096, fail_decode_at=3), 4, 2048)
    engine.add_request(request("a", max_tokens=20))
    engine.add_request(request("b", max_tokens=20))
    outputs, _ = drain(engine)
    assert {outputs[n][-1].error.status for n in "ab"} == {500}
    engine.add_request(request("after", max_tokens=3))
    outputs, _ = drain(engine)
    assert outputs["after"][-1].finish_reason == "length"


def test_request_sampling_defaults_come_from_the_runner():
    runner = MockRunner(1, 4096)
    runner.sampling_defaults = (0.0, 0.5)
    engine = LLMEngine(runner, 1, 2048)
    engine.add_request(request("defaults"))
    engine.add_request(request("own", temperature=0.7))
    waiting = {s.request_id: s.params for _, _, s in engine.scheduler._waiting}
    assert (waiting["defaults"].temperature, waiting["defaults"].top_p) == (0.0, 0.5)
    assert (waiting["own"].temperature, waiting["own"].top_p) == (0.7, 0.5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mock_captions_are_the_same_under_any_sampling(temperature):
    engine = LLMEngine(MockRunner(2, 4096), 2, 2048)
    engine.add_request(request("x", temperature=temperature, top_p=0.5))
    outputs, _ = drain(engine)
    assert "".join(o.content for o in outputs["x"]) == "No image was given; the prompt has 1 words."


# The mock's answer to `request(name)`: "No image was given; the prompt has 1 words." is 9 words, then EOS.
CAPTION = "No image was given; the prompt has 1 words."
EOS_AT = len(CAPTION.split()) + 1


@pytest.mark.parametrize("max_tokens, finish_reason, tokens", [
    (EOS_AT - 1, "length", EOS_AT - 1),  # cut one token before EOS
    (EOS_AT, "stop", EOS_AT),  # EOS as the very last allowed token ends it as EOS, not as the limit
    (EOS_AT + 1, "stop", EOS_AT),
])
def test_eos_exactly_at_max_tokens_is_a_stop(max_tokens, finish_reason, tokens):
    engine = LLMEngine(MockRunner(1, 4096), 1, 2048)
    engine.add_request(request("x", max_tokens=max_tokens, temperature=0.0))
    outputs, _ = drain(engine)
    last = outputs["x"][-1]
    assert (last.finish_reason, last.completion_tokens) == (finish_reason, tokens)
    assert "".join(o.content for o in outputs["x"]) == CAPTION


@pytest.mark.parametrize("min_tokens, tokens", [(0, EOS_AT), (EOS_AT - 1, EOS_AT), (EOS_AT, 2 * EOS_AT - 1)])
def test_min_tokens_holds_eos_back_until_that_many_tokens_then_no_longer(min_tokens, tokens):
    """min_tokens = n: EOS can be token n + 1 at the earliest (vLLM's rule). At EOS_AT - 1 the natural EOS is
    allowed; at EOS_AT it is held back, the mock's caption starts again in its place, and EOS follows it."""
    engine = LLMEngine(MockRunner(1, 4096), 1, 2048)
    engine.add_request(request("x", max_tokens=100, min_tokens=min_tokens, temperature=0.0))
    outputs, _ = drain(engine)
    last = outputs["x"][-1]
    assert (last.finish_reason, last.completion_tokens) == ("stop", tokens)


def test_ignore_eos_generates_exactly_max_tokens():
    engine = LLMEngine(MockRunner(1, 4096), 1, 2048)
    engine.add_request(request("x", max_tokens=3 * EOS_AT, ignore_eos=True, temperature=0.0))
    outputs, _ = drain(engine)
    assert (outputs["x"][-1].finish_reason, outputs["x"][-1].completion_tokens) == ("length", 3 * EOS_AT)


def test_a_request_of_exactly_the_slot_length_runs_and_one_token_more_is_refused():
    """Prompt plus max_tokens: at MAX_MODEL_LEN it runs, one over it gets 400."""
    engine = LLMEngine(MockRunner(2, 20), 2, 2048)  # the prompt of request(name, words=5) is 5 tokens
    engine.add_request(request("fits", max_tokens=15, words=5, ignore_eos=True))
    engine.add_request(request("over", max_tokens=16, words=5, ignore_eos=True))
    outputs, _ = drain(engine)
    assert outputs["fits"][-1].error is None and outputs["fits"][-1].completion_tokens == 15
    assert outputs["over"][-1].error.code == "request_too_large" and outputs["over"][-1].error.status == 400


def test_one_step_never_prefills_more_than_the_budget_with_a_continuing_and_a_new_prompt():
    engine = LLMEngine(MockRunner(4, 4096), 4, 100)
    engine.add_request(request("a", words=150, max_tokens=3))
    engine.step()
    assert engine.stats.prefill_tokens == 100
    engine.add_request(request("b", words=100, max_tokens=3))
    per_step = []
    for _ in range(50):
        if not engine.has_unfinished():
            break
        engine.step()
        per_step.append(engine.stats.prefill_tokens)
    assert per_step[:2] == [100, 50], per_step  # a's last 50 and b's first 50, then b's last 50
    assert max(per_step) <= 100 and sum(per_step) == 150


def test_each_output_says_how_many_rows_were_sampled_in_its_step():
    """The batch a token was decoded in: three requests together, then the two left after the short one."""
    engine = LLMEngine(MockRunner(4, 4096), 4, 2048)
    for name, tokens in (("a", 3), ("b", 6), ("c", 6)):
        engine.add_request(request(name, max_tokens=tokens, ignore_eos=True, words=4))
    outputs, _ = drain(engine)
    rows = {name: [out.step_rows for out in outs] for name, outs in outputs.items()}
    assert set(rows["a"]) == {3}
    assert rows["b"][0] == 3 and rows["b"][-1] == 2 and set(rows["b"]) == {3, 2}


def test_the_first_output_alone_says_how_long_its_prefill_took():
    engine = LLMEngine(MockRunner(2, 4096), 2, 2048)
    engine.add_request(request("a", max_tokens=5, ignore_eos=True, words=4))
    outputs, _ = drain(engine)
    first, *rest = outputs["a"]
    assert first.prefill_s is not None and first.prefill_s >= 0
    assert all(out.prefill_s is None for out in rest)
