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
from tests.helpers import data_url, nv_ingest_body, png_bytes

GOOD_URL = data_url(png_bytes())


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

CASES = [
    # (id, body builder or raw bytes, expected status)
    ("malformed-json", b'{"messages": [', 400),
    ("json-array", b"[1, 2]", 422),
    ("json-string", b'"hello"', 422),
    ("missing-messages", _drop("messages"), 422),
    ("empty-messages", _set(("messages",), []), 422),
    ("messages-not-list", _set(("messages",), "hi"), 422),
    ("message-without-role", _set(("messages", 0), {"content": "x"}), 422),
    ("unknown-role", _set(("messages", 0, "role"), "tool"), 422),
    ("content-wrong-type", _set(USER_CONTENT, 42), 422),
    ("unknown-content-type", _set(IMAGE_PART, {"type": "input_audio", "input_audio": {}}), 422),
    ("text-part-without-text", _set(("messages", 1, "content", 0), {"type": "text"}), 422),
    ("image-part-without-url", _set(IMAGE_PART, {"type": "image_url"}), 422),
    ("image-url-not-string", _set(IMAGE_PART, {"type": "image_url", "image_url": {"url": 5}}), 422),
    ("content-part-not-object", _set(USER_CONTENT, ["just a string"]), 422),
    ("only-system-message", _set(("messages",), [{"role": "system", "content": "/no_think"}]), 400),
    ("image-in-system-message", _set(("messages", 0, "content"),
                                     [{"type": "image_url", "image_url": {"url": GOOD_URL}}]), 400),
    ("bad-base64", lambda: _with_image("data:image/png;base64,@@@not-base64@@@"), 400),
    ("base64-not-image", lambda: _with_image(data_url(b"hello world, not an image")), 400),
    ("truncated-png", lambda: _with_image(data_url(png_bytes(300, 300)[:120])), 400),
    ("truncated-png-body", lambda: _with_image(data_url(png_bytes(300, 300, (1, 2, 3))[:-30])), 400),
    ("truncated-jpeg", lambda: _with_image(data_url(_jpeg()[: len(_jpeg()) // 2], "image/jpeg")), 400),
    ("unsupported-scheme", lambda: _with_image("ftp://example.com/a.png"), 400),
    ("file-scheme", lambda: _with_image("file:///etc/passwd"), 400),
    ("remote-url-disabled", lambda: _with_image("https://example.com/a.png"), 400),
    ("data-url-not-base64", lambda: _with_image("data:image/png,rawbytes"), 400),
    ("data-url-gif-mime", lambda: _with_image(data_url(_gif(), "image/gif")), 400),
    ("gif-bytes-as-png", lambda: _with_image(data_url(_gif())), 400),
    ("empty-data-url", lambda: _with_image("data:image/png;base64,"), 400),
    ("zero-size-declared", lambda: _with_image(data_url(_patched_png_size(0, 0))), 400),
    ("huge-declared-dimensions", lambda: _with_image(data_url(_patched_png_size(100_000, 100_000))), 400),
    ("too-many-images", _set(USER_CONTENT, [{"type": "image_url", "image_url": {"url": GOOD_URL}}] * 5), 400),
    ("max-tokens-zero", _set(("max_tokens",), 0), 422),
    ("max-tokens-negative", _set(("max_tokens",), -5), 422),
    ("max-tokens-huge", _set(("max_tokens",), 10**9), 400),
    ("max-tokens-string", _set(("max_tokens",), "many"), 422),
    ("max-completion-tokens-huge", _set(("max_completion_tokens",), 10**6), 400),
    ("temperature-negative", _set(("temperature",), -0.5), 422),
    ("temperature-too-high", _set(("temperature",), 5), 422),
    ("top-p-zero", _set(("top_p",), 0), 422),
    ("top-p-over-one", _set(("top_p",), 1.5), 422),
    ("n-two", _set(("n",), 2), 422),
    ("too-many-stops", _set(("stop",), ["a", "b", "c", "d", "e"]), 422),
    ("empty-stop", _set(("stop",), [""]), 422),
    ("stop-not-string", _set(("stop",), 17), 422),
    ("stream-not-bool", _set(("stream",), "maybe"), 422),
    ("seed-not-int", _set(("seed",), "abc"), 422),
    ("seed-too-large", _set(("seed",), 2**64), 422),
    ("lone-surrogate-text", _set(("messages", 1, "content", 0, "text"), "caption \ud800 this"), 400),
    ("unknown-model", _set(("model",), "some/other-model"), 404),
    ("prompt-too-long", _set(("messages", 0, "content"), "x" * 40_000), 400),
    ("oversized-body", _set(("messages", 0, "content"), "x" * (1024 * 1024 + 10)), 413),
    ("remote-url-private-address", lambda: _with_image("http://169.254.169.254/latest/meta-data"), 400),
]


@pytest.mark.parametrize("case_id,build,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error(mock_service, auth_headers, case_id, build, status):
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
    # Never echo the payload (PNG base64 starts with iVBORw0KGgo) or a stack trace.
    assert "iVBORw0KGgo" not in response.text and "Traceback" not in response.text
    assert len(error["message"]) < 300
    good = requests.post(mock_service.chat_url, json=nv_ingest_body(GOOD_URL), headers=auth_headers, timeout=30)
    assert good.status_code == 200


ODD_BUT_VALID = {
    "one-pixel": png_bytes(1, 1),
    "palette": png_bytes(40, 40, 3, mode="P"),
    "sixteen-bit": png_bytes(40, 40, 40000, mode="I;16"),
    "grayscale-alpha": png_bytes(40, 40, (90, 10), mode="LA"),
    "rgba": png_bytes(40, 40, (0, 0, 0, 0), mode="RGBA"),
    "cmyk-jpeg": png_bytes(40, 40, (0, 50, 100, 0), mode="CMYK", fmt="JPEG"),
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
    assert response.json()["choices"][0]["message"]["content"]


def test_base64_with_line_breaks_is_accepted(mock_service, auth_headers):
    wrapped = base64.encodebytes(png_bytes()).decode()  # MIME-style, newline every 76 chars
    response = requests.post(mock_service.chat_url, json=nv_ingest_body(f"data:image/png;base64,{wrapped}"),
                             headers=auth_headers, timeout=30)
    assert response.status_code == 200, response.text


def test_null_sampling_fields_mean_the_defaults(mock_service, auth_headers):
    body = nv_ingest_body(GOOD_URL, temperature=None, top_p=None, seed=None, stop=None, max_tokens=None)
    response = requests.post(mock_service.chat_url, json=body, headers=auth_headers, timeout=30)
    assert response.status_code == 200, response.text


def test_images_that_can_never_fit_are_refused_before_queuing(mock_service, auth_headers):
    """Four 13-tile images (13,320 image tokens) plus max_tokens 4096 exceed MAX_MODEL_LEN (16384)."""
    body = nv_ingest_body(data_url(png_bytes(640, 480)), max_tokens=4096)
    more = [data_url(png_bytes(640, 480, (9, 9, k))) for k in range(3)]
    body["messages"][1]["content"] += [{"type": "image_url", "image_url": {"url": url}} for url in more]
    response = requests.post(mock_service.chat_url, json=body, headers=auth_headers, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "request_too_large"
    assert "13320" in response.json()["error"]["message"] and "MAX_MODEL_LEN" in response.json()["error"]["message"]
    body["max_tokens"] = 512
    assert requests.post(mock_service.chat_url, json=body, headers=auth_headers, timeout=30).status_code == 200


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
