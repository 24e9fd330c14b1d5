"""service/jobs.build_job: every limit checked before queuing, at the limit (admitted) and one over (refused)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.errors import APIError
from service.jobs import JobLimits, build_job
from service.protocol import ChatCompletionRequest
from tests.helpers import data_url, nv_ingest_body, png_bytes

URL = data_url(png_bytes(64, 48))
WIDE = data_url(png_bytes(2048, 512))  # 4 x 1 tiles at 12, plus the thumbnail
LIMITS = JobLimits(default_max_tokens=512, max_output_tokens=100, max_images=3, max_image_pixels=10**7,
                   max_num_tiles=4, max_prompt_chars=200, max_model_len=10**5)


def job(url: str = URL, images: int = 1, limits: JobLimits = LIMITS, text: str = "Caption:", **body):
    body.setdefault("max_tokens", 10)
    b = nv_ingest_body(url, **body)
    b["messages"][1]["content"] = [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": url}}] * images
    return build_job(ChatCompletionRequest.model_validate(b), limits)


def refused(code: str, **kw) -> APIError:
    with pytest.raises(APIError) as caught:
        job(**kw)
    assert caught.value.status == 400 and caught.value.code == code, caught.value.message
    return caught.value


def test_images_per_request_at_the_limit_and_one_over():
    assert len(job(images=3).images) == 3
    refused("too_many_images", images=4)


def test_max_tokens_at_the_limit_and_one_over():
    assert job(max_tokens=100).params.max_tokens == 100
    refused("max_tokens_exceeded", max_tokens=101)
    assert job(max_tokens=None, max_completion_tokens=100).params.max_tokens == 100
    refused("max_tokens_exceeded", max_tokens=None, max_completion_tokens=101)
    assert job(max_tokens=None).params.max_tokens == 100  # the default, bounded by the limit


def test_min_tokens_up_to_max_tokens_and_one_over():
    assert job(max_tokens=10, min_tokens=10).params.min_tokens == 10
    refused("invalid_min_tokens", max_tokens=10, min_tokens=11)


def test_prompt_characters_at_the_limit_and_one_over():
    system = len("/no_think")
    job(text="x" * (200 - system))
    refused("prompt_too_long", text="x" * (201 - system))


def test_the_tile_budget_a_request_asks_for_is_bounded_by_the_server_and_used():
    assert job(WIDE).images[0].num_tiles == 5  # the server's 4 tiles, plus the thumbnail
    assert job(WIDE, mm_processor_kwargs={"max_num_tiles": 4}).images[0].num_tiles == 5
    assert job(WIDE, mm_processor_kwargs={"max_num_tiles": 2}).images[0].num_tiles == 3
    assert job(WIDE, mm_processor_kwargs={"max_num_tiles": 1}).images[0].num_tiles == 1
    refused("invalid_max_num_tiles", url=WIDE, mm_processor_kwargs={"max_num_tiles": 5})
    with pytest.raises(ValidationError):
        job(WIDE, mm_processor_kwargs={"max_num_tiles": 0})


def test_images_alone_at_the_slot_length_and_one_token_over():
    image_tokens = 2 * (5 * 256 + 2)  # two images of 5 tiles, each between <img> and </img>
    limits = JobLimits(512, 4096, 3, 10**7, 4, 200, max_model_len=image_tokens + 50)
    assert job(WIDE, images=2, limits=limits, max_tokens=50).params.max_tokens == 50
    error = refused("request_too_large", url=WIDE, images=2, limits=limits, max_tokens=51)
    assert f"images alone are {image_tokens} prompt tokens" in error.message


def test_up_to_four_stop_strings():
    assert job(stop=["a", "b", "c", "d"]).params.stop == ["a", "b", "c", "d"]
    with pytest.raises(ValidationError):
        job(stop=["a", "b", "c", "d", "e"])


@pytest.mark.parametrize("field, at_limit, over", [("temperature", 2.0, 2.0001), ("top_p", 1.0, 1.0001)])
def test_sampling_values_at_their_bounds_and_just_over(field, at_limit, over):
    assert getattr(job(**{field: at_limit}).params, field) == at_limit
    with pytest.raises(ValidationError):
        job(**{field: over})
