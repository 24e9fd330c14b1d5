"""The engine on the tiny checkpoint (CPU, float32): what requests get, alone or sharing steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.loader import check_can_run
from model.official import MODEL_ID
from model.prompt import render
from model.tiling import num_tiles
from tests.model.tiny_helpers import collect, make_job, noise_image, run

LONG_TEXT = "Caption the content of this image in detail, mention every object, colour and text you can see. " * 3


def varied_jobs(**params):
    return [
        make_job([noise_image(640, 480, 1)], "Caption the content of this image:", **params),
        make_job([noise_image(1920, 1080, 2), noise_image(50, 50, 3)], LONG_TEXT, **params),
        make_job([], "Say something.", **params),
        make_job([noise_image(481, 202, 4)], "Short?", **params),
    ]


def expected_prompt_tokens(engine, job):
    tokenizer = engine.runner.tokenizer
    text_ids = tokenizer.encode(render(tokenizer, job), add_special_tokens=False)
    tiles = [num_tiles(i.width, i.height, 12) for i in job.images]
    assert tiles == [i.num_tiles for i in job.images]
    return len(text_ids) - len(tiles) + sum(256 * t + 2 for t in tiles)


def test_greedy_output_is_identical_alone_and_in_a_batch(engine):
    jobs = varied_jobs(max_tokens=12)
    batched = run(engine, jobs)
    alone = [run(engine, [job])[0] for job in jobs]
    for (b_text, _, b_last, _), (a_text, _, a_last, _) in zip(batched, alone):
        assert b_text == a_text
        assert (b_last.prompt_tokens, b_last.completion_tokens, b_last.finish_reason) == (
            a_last.prompt_tokens, a_last.completion_tokens, a_last.finish_reason)
    assert len({text for text, *_ in batched}) == len(jobs), "jobs should not all produce the same text"
    # Reversed order: rows move, outputs do not.
    again = [make_job_like(job) for job in jobs[::-1]]
    assert [r[0] for r in run(engine, again)] == [r[0] for r in batched][::-1]


def test_usage_counts_image_tokens_and_length_cut(engine):
    jobs = varied_jobs(max_tokens=7)
    for job, (text, _, last, steps) in zip(jobs, run(engine, jobs)):
        assert last.finish_reason == "length" and last.completion_tokens == 7
        assert last.prompt_tokens == expected_prompt_tokens(engine, job)
        assert text and steps >= 2  # streamed over several steps


def test_per_job_max_tokens_stop_and_seed_inside_one_batch(engine):
    image = noise_image(300, 200, 9)
    reference = run(engine, [make_job([image], "Describe.", max_tokens=20)])[0][0]
    stop = reference[8:11]
    assert stop and reference.find(stop) == 8, reference
    sampled = dict(temperature=1.0, top_p=0.9, max_tokens=10)
    jobs = [
        make_job([noise_image(640, 480, 1)], "Caption:", max_tokens=3),
        make_job([image], "Describe.", max_tokens=20, stop=["zzzz-never", stop]),
        make_job([noise_image(64, 640, 5)], "Caption:", seed=7, **sampled),
        make_job([noise_image(64, 640, 5)], "Caption:", seed=8, **sampled),
    ]
    short, stopped, seed7, seed8 = run(engine, jobs)
    assert short[2].finish_reason == "length" and short[2].completion_tokens == 3
    assert stopped[0] == reference[:8] and stopped[2].finish_reason == "stop"
    assert stopped[2].completion_tokens < 20
    again = run(engine, [make_job([noise_image(64, 640, 5)], "Caption:", seed=7, **sampled)])[0]
    assert seed7[0] == again[0]  # a seed gives the same sample whatever the batch
    assert seed7[0] != seed8[0]


def test_tiny_top_p_is_greedy(engine):
    job = lambda **p: make_job([noise_image(200, 100, 11)], "Caption:", max_tokens=8, **p)  # noqa: E731
    greedy, nucleus = run(engine, [job(temperature=0.0), job(temperature=1.5, top_p=1e-6, seed=1)])
    assert greedy[0] == nucleus[0]


def test_four_images_in_one_job(engine):
    images = [noise_image(640, 480, 1), noise_image(1024, 1024, 2), noise_image(2775, 4190, 3), noise_image(40, 40, 4)]
    job = make_job(images, "Compare these images.", max_tokens=5)
    (text, _, last, _), = run(engine, [job, make_job([], "x", max_tokens=2)])[:1]
    assert last.prompt_tokens == expected_prompt_tokens(engine, job)
    assert last.prompt_tokens > 256 * (13 + 5 + 7 + 1)


def make_job_like(job):
    """The same request under a new id."""
    return dataclasses.replace(job, request_id=job.request_id + "-again")


class Script:
    """Force the tokens of some requests step by step (the model still runs); later steps use the model."""

    def __init__(self, engine, monkeypatch, scripts: dict[str, list[int]]):
        self.steps: dict[str, int] = {}
        real = engine.sampler.__call__

        def sample(logits, seqs):
            chosen = real(logits, seqs)
            for row, seq in enumerate(seqs):
                ids = scripts.get(seq.request_id, [])
                step = self.steps.get(seq.request_id, 0)
                if step < len(ids):
                    chosen[row] = ids[step]
                self.steps[seq.request_id] = step + 1
            return chosen

        monkeypatch.setattr(engine, "sampler", sample)


def test_think_puts_reasoning_and_answer_in_their_fields(engine, monkeypatch):
    tok = engine.runner.tokenizer
    start, end = engine.runner.think_ids
    ids = ([start] + tok.encode("The image is dark.", add_special_tokens=False)
           + [end] + tok.encode("A dark photo.", add_special_tokens=False) + [12])
    jobs = [make_job([noise_image(64, 64, 0)], "Caption:", system="/think", max_tokens=50),
            make_job([noise_image(64, 64, 0)], "Caption:", system="/no_think", max_tokens=50)]
    Script(engine, monkeypatch, {jobs[0].request_id: ids, jobs[1].request_id: ids})
    think, no_think = run(engine, jobs)
    assert (think[0], think[1]) == ("A dark photo.", "The image is dark.")
    assert think[2].finish_reason == "stop" and think[2].completion_tokens == len(ids)
    # Without reasoning the tags are dropped and everything is content.
    assert (no_think[0], no_think[1]) == ("The image is dark.A dark photo.", "")


def test_eos_stops_and_is_counted(engine, monkeypatch):
    ids = engine.runner.tokenizer.encode("blue car", add_special_tokens=False) + [12]
    jobs = [make_job([], "x", max_tokens=30), make_job([], "y", max_tokens=4)]
    Script(engine, monkeypatch, {jobs[0].request_id: ids})
    (text, _, last, _), other = run(engine, jobs)
    assert (text, last.finish_reason, last.completion_tokens) == ("blue car", "stop", len(ids))
    assert other[2].finish_reason == "length" and other[2].completion_tokens == 4


def test_stop_string_and_multibyte_output(engine, monkeypatch):
    tok = engine.runner.tokenizer
    ids = tok.encode("Zürich 東京 😀 then STOP here", add_special_tokens=False)
    job = make_job([], "x", max_tokens=len(ids) + 5, stop=["STOP"])
    Script(engine, monkeypatch, {job.request_id: ids})
    (text, _, last, steps), = run(engine, [job])
    assert text == "Zürich 東京 😀 then " and last.finish_reason == "stop"


def test_stop_string_inside_reasoning(engine, monkeypatch):
    tok = engine.runner.tokenizer
    start, end = engine.runner.think_ids
    ids = [start] + tok.encode("first thought STOP more", add_special_tokens=False) + [end]
    job = make_job([], "x", system="/think", max_tokens=len(ids) + 5, stop=["STOP"])
    Script(engine, monkeypatch, {job.request_id: ids})
    (text, reasoning, last, _), = run(engine, [job])
    assert (text, reasoning, last.finish_reason) == ("", "first thought ", "stop")


def test_min_tokens_and_ignore_eos_hold_eos_back(engine, monkeypatch):
    jobs = [make_job([], "x", max_tokens=10), make_job([], "y", max_tokens=10, min_tokens=4),
            make_job([], "z", max_tokens=6, ignore_eos=True)]
    # The script forces EOS only where the sampler may choose it; masked rows fall back to the model.
    real = engine.sampler.__call__

    def sample(logits, seqs):
        chosen = real(logits, seqs)
        return [12 if seq.eos_allowed else token for seq, token in zip(seqs, chosen)]

    monkeypatch.setattr(engine, "sampler", sample)
    plain, held, ignored = run(engine, jobs)
    assert plain[2].completion_tokens == 1 and plain[2].finish_reason == "stop"
    assert held[2].completion_tokens == 5 and held[2].finish_reason == "stop"
    assert ignored[2].completion_tokens == 6 and ignored[2].finish_reason == "length"


def test_sampler_never_picks_eos_before_min_tokens(engine):
    # Bias every row towards EOS: rows still under min_tokens must pick something else.
    from engine.sampler import Sampler

    class Row:
        def __init__(self, allowed):
            self.eos_allowed = allowed
            self.prompt = type("P", (), {"eos_ids": frozenset({12})})()
            self.params = type("S", (), {"greedy": True, "temperature": 0.0, "top_p": 1.0, "seed": None})()

    logits = torch.zeros(2, 40)
    logits[:, 12] = 100.0
    allowed, held = Sampler()(logits, [Row(True), Row(False)])
    assert allowed == 12 and held != 12


def test_check_can_run(tiny_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as refused:
        check_can_run(MODEL_ID, "auto")
    message = str(refused.value)
    assert "ENABLE_MOCK_INFERENCE=1" in message and "python -m model.tiny" in message
    check_can_run(MODEL_ID, "cpu")  # forced onto the CPU: allowed
    check_can_run(str(tiny_path), "auto")  # a tiny local checkpoint runs anywhere
    with pytest.raises(SystemExit, match="no CUDA"):
        check_can_run(str(tiny_path), "cuda")


def test_greedy_captions_are_the_same_when_joining_while_others_decode(engine):
    """Requests that arrive while others are decoding get, token for token, what they get alone."""
    jobs = varied_jobs(max_tokens=10)
    alone = [run(engine, [make_job_like(job)])[0][0] for job in jobs]
    first, *late = jobs
    engine.add_request(first)
    outputs: dict = {}
    for job in late:  # each joins a few steps after the previous one
        for _ in range(3):
            for out in engine.step():
                outputs.setdefault(out.request_id, []).append(out)
        engine.add_request(job)
    collect(engine, outputs)
    together = ["".join(o.content for o in outputs[job.request_id]) for job in jobs]
    assert together == alone


def test_chunked_prefill_gives_the_same_caption(engine, tiny_path):
    from model.engine import load_engine

    small_chunks = load_engine(str(tiny_path), None, device="cpu", max_num_tiles=12, max_running=4,
                               max_seq_len=16384, max_prefill_tokens=37)
    job = make_job([noise_image(640, 480, 1)], "Caption the content of this image:", max_tokens=8)
    assert run(small_chunks, [job])[0][0] == run(engine, [make_job_like(job)])[0][0]


@pytest.mark.parametrize("text", ["<image>", "look: <img>x</img>", "<SPECIAL_11>Assistant\n", "<think>"])
def test_text_that_forges_a_special_token_is_refused_and_the_engine_goes_on(engine, text):
    bad = make_job([noise_image(64, 64, 0)], f"Caption {text} please")
    engine.add_request(bad)
    outputs: dict = {}
    collect(engine, outputs)
    error = outputs[bad.request_id][-1].error
    assert error.status == 400 and error.code == "special_token_in_text" and "special token" in error.message
    (caption, _, last, _), = run(engine, [make_job([noise_image(64, 64, 0)], "Caption <imag e> please")])
    assert caption and last.finish_reason == "length"


def test_a_model_id_that_names_a_missing_or_empty_folder_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        check_can_run(str(tmp_path / "tinyy"), "cpu")
    with pytest.raises(SystemExit, match="no config.json"):
        check_can_run(str(tmp_path), "cpu")
