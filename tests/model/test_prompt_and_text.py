from __future__ import annotations

import pytest

from model.detokenize import IncrementalDecoder, ReasoningSplitter
from model.prompt import build_prompt, chat_messages, render
from model.tiling import num_tiles
from engine.request import EngineRequest, ImagePart, Message, SamplingParams, TextPart
from service.jobs import to_input
from tests.model.tiny_helpers import make_job, noise_image


def test_template_renders_the_official_form(engine):
    job = make_job([noise_image(64, 64, 0)], "Caption the content of this image:")
    assert render(engine.runner.tokenizer, job) == (
        "<s><SPECIAL_10>System\n/no_think\n<SPECIAL_11>User\n<image>\nCaption the content of this image:\n"
        "<SPECIAL_11>Assistant\n<think></think>")


def test_missing_system_prompt_defaults_to_no_think_and_think_opens_reasoning(engine):
    job = make_job([], "hi", system=None)
    assert chat_messages(job)[0] == {"role": "system", "content": "/no_think"}
    no_think = build_prompt(engine.runner.tokenizer, job, [], engine.runner.image_tokens)
    think = build_prompt(engine.runner.tokenizer, make_job([], "hi", system="/think"), [], engine.runner.image_tokens)
    assert not no_think.reasoning and think.reasoning
    assert think.text.endswith("<SPECIAL_11>Assistant\n")


@pytest.mark.parametrize("sizes", [[(640, 480)], [(1920, 1080), (50, 50)], [(481, 202), (2775, 4190), (64, 64), (1024, 1024)]])
def test_image_tokens_are_256_per_tile_inside_img_tags(engine, sizes):
    images = [noise_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    tiles = [num_tiles(w, h, 12) for w, h in sizes]
    prompt = build_prompt(engine.runner.tokenizer, make_job(images, "Describe."), tiles, engine.runner.image_tokens)
    ids = prompt.input_ids
    it = engine.runner.image_tokens
    assert ids.count(it.context_id) == 256 * sum(tiles)
    assert ids.count(it.start_id) == ids.count(it.end_id) == len(sizes)
    starts = [i for i, t in enumerate(ids) if t == it.start_id]
    ends = [i for i, t in enumerate(ids) if t == it.end_id]
    assert [e - s - 1 for s, e in zip(starts, ends)] == [256 * n for n in tiles]
    assert ids[0] == engine.runner.tokenizer.bos_token_id and ids.count(engine.runner.tokenizer.bos_token_id) == 1


def test_multi_turn_and_text_only_jobs_render(engine):
    job = EngineRequest("r", [Message("system", [TextPart("/no_think")]), Message("user", [TextPart("a")]),
                              Message("assistant", [TextPart("b")]), Message("user", [TextPart("c")])],
                        SamplingParams(max_tokens=4))
    text = render(engine.runner.tokenizer, job)
    assert "User\na\n<SPECIAL_11>Assistant\nb\n<SPECIAL_11>User\nc\n" in text


def test_text_parts_of_one_message_are_joined_with_a_newline(engine):
    """As vLLM's chat code does: the page text and the instruction stay on separate lines."""
    user = Message("user", [TextPart("Text near this image:"), ImagePart(to_input(noise_image(64, 64, 0), 12)),
                            TextPart("Caption the content of this image:")])
    job = EngineRequest("r", [Message("system", [TextPart("/no_think")]), user], SamplingParams(max_tokens=4))
    assert "User\n<image>\nText near this image:\nCaption the content of this image:\n" in render(
        engine.runner.tokenizer, job)


def test_placeholder_count_must_match_images(engine):
    with pytest.raises(ValueError, match="placeholders"):
        build_prompt(engine.runner.tokenizer, make_job([noise_image(8, 8, 0)], "x"), [1, 1], engine.runner.image_tokens)


def test_incremental_decoding_never_splits_multibyte_characters(engine):
    tok = engine.runner.tokenizer
    text = "café naïve Zürich 東京 北京 Ελλάδα 😀 🚗 📊 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some characters span several byte tokens
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_reasoning_splitter_routes_by_think_tags():
    splitter = ReasoningSplitter(True, think_start_id=1, think_end_id=2)
    assert [splitter.route(t) for t in (1, 5, 6, 2, 7)] == [None, "reasoning", "reasoning", None, "content"]
    off = ReasoningSplitter(False, 1, 2)
    assert [off.route(t) for t in (5, 2, 6)] == ["content", None, "content"]
