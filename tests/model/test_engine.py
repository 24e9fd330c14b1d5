"""Engine behaviour on the tiny checkpoint (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from model.loader import DEFAULT_MODEL_ID, check_can_run
from model.prompt import render
from model.tiling import num_tiles
from tests.model.tiny_helpers import make_job, noise_image, run

LONG_TEXT = "Caption the content of this image in detail, mention every object, colour and text you can see. " * 3


def varied_jobs(**params):
    return [
        make_job([noise_image(640, 480, 1)], "Caption the content of this image:", **params),
        make_job([noise_image(1920, 1080, 2), noise_image(50, 50, 3)], LONG_TEXT, **params),
        make_job([], "Say something.", **params),
        make_job([noise_image(481, 202, 4)], "Short?", **params),
    ]


def expected_prompt_tokens(engine, job):
    text_ids = engine.tokenizer.encode(render(engine.tokenizer, job), add_special_tokens=False)
    tiles = [num_tiles(i.width, i.height, 12) for i in job.images]
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
    assert [r[0] for r in run(engine, jobs[::-1])] == [r[0] for r in batched][::-1]


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


class Script:
    """Force the first rows' tokens step by step (the model still runs); later steps use the model."""

    def __init__(self, engine, monkeypatch, scripts: dict[int, list[int]]):
        self.step = 0
        real = engine._choose

        def choose(logits, states):
            chosen = real(logits, states)
            for row, ids in scripts.items():
                if self.step < len(ids):
                    chosen[row] = ids[self.step]
            self.step += 1
            return chosen

        monkeypatch.setattr(engine, "_choose", choose)


def test_think_puts_reasoning_and_answer_in_their_fields(engine, monkeypatch):
    tok = engine.tokenizer
    ids = ([engine.think_start_id] + tok.encode("The image is dark.", add_special_tokens=False)
           + [engine.think_end_id] + tok.encode("A dark photo.", add_special_tokens=False) + [12])
    Script(engine, monkeypatch, {0: ids, 1: ids})
    jobs = [make_job([noise_image(64, 64, 0)], "Caption:", system="/think", max_tokens=50),
            make_job([noise_image(64, 64, 0)], "Caption:", system="/no_think", max_tokens=50)]
    think, no_think = run(engine, jobs)
    assert (think[0], think[1]) == ("A dark photo.", "The image is dark.")
    assert think[2].finish_reason == "stop" and think[2].completion_tokens == len(ids)
    # Without reasoning the tags are dropped and everything is content.
    assert (no_think[0], no_think[1]) == ("The image is dark.A dark photo.", "")


def test_eos_stops_and_is_counted(engine, monkeypatch):
    ids = engine.tokenizer.encode("blue car", add_special_tokens=False) + [12]
    Script(engine, monkeypatch, {0: ids})
    (text, _, last, _), other = run(engine, [make_job([], "x", max_tokens=30), make_job([], "y", max_tokens=4)])
    assert (text, last.finish_reason, last.completion_tokens) == ("blue car", "stop", len(ids))
    assert other[2].finish_reason == "length" and other[2].completion_tokens == 4


def test_stop_string_inside_reasoning_and_multibyte_output(engine, monkeypatch):
    tok = engine.tokenizer
    ids = tok.encode("Zürich 東京 😀 then STOP here", add_special_tokens=False)
    Script(engine, monkeypatch, {0: ids})
    (text, _, last, steps), = run(engine, [make_job([], "x", max_tokens=len(ids) + 5, stop=["STOP"])])
    assert text == "Zürich 東京 😀 then " and last.finish_reason == "stop"


def test_check_can_run(tiny_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as refused:
        check_can_run(DEFAULT_MODEL_ID, "auto")
    message = str(refused.value)
    assert "ENABLE_MOCK_INFERENCE=1" in message and "python -m model.tiny" in message
    check_can_run(DEFAULT_MODEL_ID, "cpu")  # forced onto the CPU: allowed
    check_can_run(str(tiny_path), "auto")  # a tiny local checkpoint runs anywhere
    with pytest.raises(SystemExit, match="no CUDA"):
        check_can_run(str(tiny_path), "cuda")
