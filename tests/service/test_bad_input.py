"""Table of bad requests: each gets its 4xx in the OpenAI error shape, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
import requests
from PIL import Image

from service.errors import APIError
from service.jobs import JobLimits, build_job
from service.protocol import ChatCompletionRequest
from tests.helpers import data_url, expected_tiles, mock_caption_for, noise_png, nv_ingest_body, png_bytes

GOOD_URL = data_url(png_bytes())
# The mock's caption of GOOD_URL (64x48, (200, 30, 30)), computed once and pasted: mean 87 -> dark, 64 > 48 ->
# wide, #c81e1e = (200, 30, 30); the hash (SHA-256 of the tiles and the size) pins the exact pixels.
GOOD_CAPTION = "A dark wide image of 64x48 pixels with mean colour #c81e1e and content hash 5556a38f02."


def _with_image(url: str) -> dict:
    return nv_ingest_body(url)


def _patched_png_size(width: int, height: int) -> bytes:
    """A real PNG whose header declares another size (with a valid CRC): a decompression bomb's shape."""
    raw = bytearray(png_bytes(8, 8))
    ihdr = raw[12:29]  # b"IHDR" + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(raw)


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def _jpeg() -> bytes:
    return png_bytes(64, 64, fmt="JPEG")


def _set(path, value):
    def build():
        body = nv_ingest_body(GOOD_URL)
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return body
    return build


def _drop(key):
    def build():
        body = nv_ingest_body(GOOD_URL)
        body.pop(key)
        return body
    return build


USER_CONTENT = ("messages", 1, "content")
IMAGE_PART = ("messages", 1, "content", 1)
IMAGE = "messages.1.content.1.image_url"  # the param of every refused image of nv-ingest's body

CASES = [
    # (id, body builder or raw bytes, expected status, param, code); a param ending in "*" is a prefix
    # (pydantic names the union branch it tried last after it, e.g. "messages.1.content.str").
    ("malformed-json", b'{"messages": [', 400, None, "invalid_json"),
    ("json-array", b"[1, 2]", 422, None, "invalid_request"),
    ("json-string", b'"hello"', 422, None, "invalid_request"),
    ("missing-messages", _drop("messages"), 422, "messages", "invalid_request"),
    ("empty-messages", _set(("messages",), []), 422, "messages", "invalid_request"),
    ("messages-not-list", _set(("messages",), "hi"), 422, "messages", "invalid_request"),
    ("message-without-role", _set(("messages", 0), {"content": "x"}), 422, "messages.0.role", "invalid_request"),
    ("unknown-role", _set(("messages", 0, "role"), "tool"), 422, "messages.0.role", "invalid_request"),
    ("content-wrong-type", _set(USER_CONTENT, 42), 422, "messages.1.content*", "invalid_request"),
    ("unknown-content-type", _set(IMAGE_PART, {"type": "input_audio", "input_audio": {}}),
     422, "messages.1.content*", "invalid_request"),
    ("text-part-without-text", _set(("messages", 1, "content", 0), {"type": "text"}),
     422, "messages.1.content*", "invalid_request"),
    ("image-part-without-url", _set(IMAGE_PART, {"type": "image_url"}), 422, "messages.1.content*", "invalid_request"),
    ("image-url-not-string", _set(IMAGE_PART, {"type": "image_url", "image_url": {"url": 5}}),
     422, "messages.1.content*", "invalid_request"),
    ("content-part-not-object", _set(USER_CONTENT, ["just a string"]), 422, "messages.1.content*", "invalid_request"),
    ("only-system-message", _set(("messages",), [{"role": "system", "content": "/no_think"}]),
     400, "messages", "invalid_request"),
    ("image-in-system-message", _set(("messages", 0, "content"),
                                     [{"type": "image_url", "image_url": {"url": GOOD_URL}}]),
     400, "messages.0.content.0", "invalid_request"),
    ("bad-base64", lambda: _with_image("data:image/png;base64,@@@not-base64@@@"), 400, IMAGE, "invalid_image"),
    ("base64-not-image", lambda: _with_image(data_url(b"hello world, not an image")), 400, IMAGE, "invalid_image"),
    ("truncated-png", lambda: _with_image(data_url(png_bytes(300, 300)[:120])), 400, IMAGE, "invalid_image"),
    ("truncated-png-body", lambda: _with_image(data_url(png_bytes(300, 300, (1, 2, 3))[:-30])),
     400, IMAGE, "invalid_image"),
    ("truncated-jpeg", lambda: _with_image(data_url(_jpeg()[: len(_jpeg()) // 2], "image/jpeg")),
     400, IMAGE, "invalid_image"),
    ("unsupported-scheme", lambda: _with_image("ftp://example.com/a.png"), 400, IMAGE, "invalid_image"),
    ("file-scheme", lambda: _with_image("file:///etc/passwd"), 400, IMAGE, "invalid_image"),
    ("remote-url-disabled", lambda: _with_image("https://example.com/a.png"), 400, IMAGE, "invalid_image"),
    ("data-url-not-base64", lambda: _with_image("data:image/png,rawbytes"), 400, IMAGE, "invalid_image"),
    ("data-url-gif-mime", lambda: _with_image(data_url(_gif(), "image/gif")), 400, IMAGE, "invalid_image"),
    ("gif-bytes-as-png", lambda: _with_image(data_url(_gif())), 400, IMAGE, "invalid_image"),
    ("empty-data-url", lambda: _with_image("data:image/png;base64,"), 400, IMAGE, "invalid_image"),
    ("zero-size-declared", lambda: _with_image(data_url(_patched_png_size(0, 0))), 400, IMAGE, "invalid_image"),
    ("huge-declared-dimensions", lambda: _with_image(data_url(_patched_png_size(100_000, 100_000))),
     400, IMAGE, "invalid_image"),
    ("too-many-images", _set(USER_CONTENT, [{"type": "image_url", "image_url": {"url": GOOD_URL}}] * 5),
     400, "messages.1.content.4", "too_many_images"),
    ("max-tokens-zero", _set(("max_tokens",), 0), 422, "max_tokens", "invalid_request"),
    ("max-tokens-negative", _set(("max_tokens",), -5), 422, "max_tokens", "invalid_request"),
    ("max-tokens-huge", _set(("max_tokens",), 10**9), 400, "max_tokens", "max_tokens_exceeded"),
    ("max-tokens-string", _set(("max_tokens",), "many"), 422, "max_tokens", "invalid_request"),
    ("max-completion-tokens-huge", _set(("max_completion_tokens",), 10**6),
     400, "max_completion_tokens", "max_tokens_exceeded"),
    ("temperature-negative", _set(("temperature",), -0.5), 422, "temperature", "invalid_request"),
    ("temperature-too-high", _set(("temperature",), 5), 422, "temperature", "invalid_request"),
    ("top-p-zero", _set(("top_p",), 0), 422, "top_p", "invalid_request"),
    ("top-p-over-one", _set(("top_p",), 1.5), 422, "top_p", "invalid_request"),
    ("n-two", _set(("n",), 2), 422, "n", "invalid_request"),
    ("too-many-stops", _set(("stop",), ["a", "b", "c", "d", "e"]), 422, "stop", "invalid_request"),
    ("empty-stop", _set(("stop",), [""]), 422, "stop", "invalid_request"),
    ("stop-not-string", _set(("stop",), 17), 422, "stop*", "invalid_request"),
    ("stream-not-bool", _set(("stream",), "maybe"), 422, "stream", "invalid_request"),
    ("seed-not-int", _set(("seed",), "abc"), 422, "seed", "invalid_request"),
    ("seed-too-large", _set(("seed",), 2**64), 422, "seed", "invalid_request"),
    ("lone-surrogate-text", _set(("messages", 1, "content", 0, "text"), "caption \ud800 this"),
     400, None, "invalid_json"),
    ("unknown-model", _set(("model",), "some/other-model"), 404, "model", "model_not_found"),
    ("prompt-too-long", _set(("messages", 0, "content"), "x" * 40_000), 400, "messages", "prompt_too_long"),
    ("oversized-body", _set(("messages", 0, "content"), "x" * (1024 * 1024 + 10)), 413, None, "request_too_large"),
    ("remote-url-private-address", lambda: _with_image("http://169.254.169.254/latest/meta-data"),
     400, IMAGE, "invalid_image"),
]


@pytest.mark.parametrize("case_id,build,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error(mock_service, auth_headers, case_id, build, status, param, code):
    payload = build if isinstance(build, bytes) else None
    headers = {**auth_headers, "Content-Type": "application/json"}
    if payload is not None:
        response = requests.post(mock_service.chat_url, data=payload, headers=headers, timeout=30)
    else:
        response = requests.post(mock_service.chat_url, json=build(), headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param is not None and param.endswith("*"):
        assert error["param"].startswith(param[:-1]), error
    else:
        assert error["param"] == param, error
    # Never echo the payload (PNG base64 starts with iVBORw0KGgo) or a stack trace.
    assert "iVBORw0KGgo" not in response.text and "Traceback" not in response.text
    assert len(error["message"]) < 300
    good = requests.post(mock_service.chat_url, json=nv_ingest_body(GOOD_URL), headers=auth_headers, timeout=30)
    assert good.status_code == 200
    assert good.json()["choices"][0]["message"]["content"] == GOOD_CAPTION


ODD_BUT_VALID = {
    "one-pixel": png_bytes(1, 1),
    "palette": png_bytes(40, 40, 3, mode="P"),
    "sixteen-bit": png_bytes(40, 40, 40000, mode="I;16"),
    "grayscale-alpha": png_bytes(40, 40, (90, 10), mode="LA"),
    "rgba": png_bytes(40, 40, (0, 0, 0, 0), mode="RGBA"),
    "cmyk-jpeg": png_bytes(40, 40, (0, 50, 100, 0), mode="CMYK", fmt="JPEG"),
}
# What each is as plain 8-bit RGB, worked out by hand: its caption must be that image's caption exactly.
AS_RGB = {
    "one-pixel": (1, 1, (200, 30, 30)),
    "palette": (40, 40, (0, 0, 0)),  # index 3 of a palette-less "P" image: Pillow writes black
    "sixteen-bit": (40, 40, (156, 156, 156)),  # 40000 / 65535 * 255 = 155.6, scaled down, not clipped to 255
    "grayscale-alpha": (40, 40, (249, 249, 249)),  # grey 90 at alpha 10/255 over white: 255 - 165 * 10/255 = 248.5
    "rgba": (40, 40, (255, 255, 255)),  # fully transparent over white
    "cmyk-jpeg": (40, 40, (255, 205, 155)),  # C=0, M=50, Y=100, K=0: (255 - 0, 255 - 50, 255 - 100)
    "animated-png": (20, 20, (255, 0, 0)),  # the first frame
}


def _animated_png() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("name", [*ODD_BUT_VALID, "animated-png"])
def test_odd_but_valid_images_are_captioned(mock_service, auth_headers, name):
    raw = _animated_png() if name == "animated-png" else ODD_BUT_VALID[name]
    mime = "image/jpeg" if name.endswith("jpeg") else "image/png"
    response = requests.post(mock_service.chat_url, json=nv_ingest_body(data_url(raw, mime)),
                             headers=auth_headers, timeout=30)
    assert response.status_code == 200, response.text
    width, height, color = AS_RGB[name]
    assert response.json()["choices"][0]["message"]["content"] == mock_caption_for(png_bytes(width, height, color))


def _caption(service, headers, body) -> dict:
    response = requests.post(service.chat_url, json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_base64_with_line_breaks_is_accepted(mock_service, auth_headers, fmt, newline):
    """MIME-style base64 (a line break every 76 characters) is the same image as unbroken base64. A noise image
    makes many lines; a JPEG with a line lost still decodes (to other pixels), so only the caption shows it."""
    raw = noise_png(64, 48, seed=11, fmt=fmt)
    mime = f"image/{fmt.lower()}"
    wrapped = base64.encodebytes(raw).decode().replace("\n", newline)
    assert wrapped.count(newline) > 10
    unwrapped = _caption(mock_service, auth_headers, nv_ingest_body(data_url(raw, mime)))
    result = _caption(mock_service, auth_headers, nv_ingest_body(f"data:{mime};base64,{wrapped}"))
    assert result["choices"][0]["message"]["content"] == unwrapped["choices"][0]["message"]["content"]
    assert result["choices"][0]["message"]["content"] == mock_caption_for(raw)


def test_null_sampling_fields_mean_the_defaults(mock_service, auth_headers):
    """null is the default, exactly as an absent field: max_tokens null is DEFAULT_MAX_TOKENS (1024: the whole
    caption, not a cut one), stop null stops nothing. (temperature and top_p null: the mock's words are certain
    under any sampler; tests/test_server_real_engine.py checks them on the tiny model.)"""
    nulls = dict(temperature=None, top_p=None, seed=None, stop=None, max_tokens=None, max_completion_tokens=None)
    absent = nv_ingest_body(GOOD_URL)
    for field in ("temperature", "top_p", "max_tokens"):
        absent.pop(field)
    with_nulls = _caption(mock_service, auth_headers, nv_ingest_body(GOOD_URL, **nulls))
    without = _caption(mock_service, auth_headers, absent)
    assert with_nulls["choices"] == without["choices"] and with_nulls["usage"] == without["usage"]
    assert with_nulls["choices"][0] == {"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": GOOD_CAPTION}}
    assert with_nulls["usage"]["completion_tokens"] == 16  # 15 words and the end token
    # A caption longer than a small default would be: ignore_eos runs to max_tokens, so null must mean 1024.
    long = _caption(mock_service, auth_headers, nv_ingest_body(GOOD_URL, max_tokens=None, ignore_eos=True))
    assert long["usage"]["completion_tokens"] == 1024 and long["choices"][0]["finish_reason"] == "length"


def test_images_that_can_never_fit_are_refused_before_queuing(mock_service, auth_headers):
    """Four 13-tile images (13,320 image tokens) plus max_tokens 4096 exceed MAX_MODEL_LEN (16384)."""
    body = nv_ingest_body(data_url(png_bytes(640, 480)), max_tokens=4096)
    more = [data_url(png_bytes(640, 480, (9, 9, k))) for k in range(3)]
    body["messages"][1]["content"] += [{"type": "image_url", "image_url": {"url": url}} for url in more]
    response = requests.post(mock_service.chat_url, json=body, headers=auth_headers, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "request_too_large"
    assert "13320" in response.json()["error"]["message"] and "MAX_MODEL_LEN" in response.json()["error"]["message"]
    body["max_tokens"] = 512
    result = _caption(mock_service, auth_headers, body)
    # All four images captioned, in order (the mock joins its sentences with a space), from 4 x 13 tiles.
    urls = [data_url(png_bytes(640, 480)), *more]
    assert result["choices"][0]["message"]["content"] == " ".join(mock_caption_for(url) for url in urls)
    assert result["usage"]["prompt_tokens"] == 7 + 4 * 256 * expected_tiles(640, 480) == 7 + 13312


@pytest.mark.parametrize("shape", ["messages", "parts"])
def test_too_many_messages_or_parts_get_422_fast(mock_service, auth_headers, shape):
    body = nv_ingest_body(data_url(png_bytes()))
    if shape == "messages":
        body["messages"] = [{"role": "user", "content": ""}] * 2000 + body["messages"]
    else:
        body["messages"][1]["content"] += [{"type": "text", "text": ""}] * 2000
    response = requests.post(mock_service.chat_url, json=body, headers=auth_headers, timeout=30)
    assert response.status_code == 422 and response.json()["error"]["param"].startswith("messages")
    assert requests.get(f"{mock_service.url}/v1/health/live", timeout=5).status_code == 200


def test_the_request_pixel_budget_is_checked_on_headers_across_images():
    """Three 5-megapixel images against a 12-megapixel budget: the third is refused before decoding."""
    big = data_url(png_bytes(2500, 2000))
    body = nv_ingest_body(big)
    body["messages"][1]["content"] += [{"type": "image_url", "image_url": {"url": big}}] * 2
    request = ChatCompletionRequest.model_validate(body)
    limits = dict(default_max_tokens=64, max_output_tokens=4096, max_images=4, max_image_pixels=50_000_000,
                  max_num_tiles=12, max_prompt_chars=32000)
    with pytest.raises(APIError) as refused:
        build_job(request, JobLimits(**limits, max_request_pixels=12_000_000))
    assert refused.value.status == 400 and refused.value.param == "messages.1.content.3.image_url"
    assert "MAX_REQUEST_PIXELS" in refused.value.message and "2000000 pixels" in refused.value.message
    assert len(build_job(request, JobLimits(**limits, max_request_pixels=15_000_000)).images) == 3


@pytest.mark.parametrize("url", ["data:image/" + "x" * 1_000_000 + ";base64,AAAA",
                                 "x" * 1_000_000 + "://example.com/a.png"], ids=["mime", "scheme"])
def test_a_huge_mime_type_or_scheme_is_not_echoed_whole(mock_service, auth_headers, url):
    r = requests.post(mock_service.chat_url, json=nv_ingest_body(url), headers=auth_headers, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert len(r.text) < 1000 and "..." in r.json()["error"]["message"]
