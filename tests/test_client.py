"""client.py against a running service, and its nv-ingest-style image budget."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
from PIL import Image

from client import MAX_BASE64_CHARS, encode_png_within, load_image

from tests.conftest import API_KEY
from tests.helpers import ROOT, mock_caption_for


def _noise(width, height, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_large_image_is_shrunk_under_the_budget():
    image = _noise(800, 600)
    encoded = encode_png_within(image)
    assert len(encoded) <= MAX_BASE64_CHARS
    shrunk = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert shrunk.width < 800 and abs(shrunk.width / shrunk.height - 800 / 600) < 0.02


def test_small_image_is_sent_unchanged_in_size():
    image = Image.new("RGBA", (50, 40), (1, 2, 3, 4))
    shrunk = Image.open(io.BytesIO(base64.b64decode(encode_png_within(image))))
    assert shrunk.size == (50, 40) and shrunk.mode == "RGB"


def _run(args, env_key=None):
    env = {"PATH": "/usr/bin:/bin"}
    if env_key:
        env["NGC_API_KEY"] = env_key
    return subprocess.run([sys.executable, "client.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


def test_client_prints_one_caption_per_image(mock_service, tmp_path):
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (9, 9, 9)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (30 + i, 20), color).save(path)
        paths.append(str(path))
    result = _run([*paths, "--url", mock_service.chat_url, "--concurrency", "3"], env_key=API_KEY)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [f"{p}: {mock_caption_for(Image.open(p).convert('RGB'))}" for p in paths]

    single = _run([paths[0], "--url", mock_service.chat_url, "--api-key", API_KEY, "--max-tokens", "4"])
    assert single.returncode == 0
    assert single.stdout.strip() == " ".join(mock_caption_for(Image.open(paths[0]).convert("RGB")).split()[:4])


def test_client_fails_readably(mock_service, tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (10, 10)).save(path)
    unauthorized = _run([str(path), "--url", mock_service.chat_url])
    assert unauthorized.returncode == 1
    assert "HTTP 401" in unauthorized.stderr and "Traceback" not in unauthorized.stderr
    missing = _run([str(tmp_path / "nope.png"), "--url", mock_service.chat_url, "--api-key", API_KEY])
    assert missing.returncode == 1 and "no such file" in missing.stderr
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    bad = _run([str(not_image), "--url", mock_service.chat_url, "--api-key", API_KEY])
    assert bad.returncode == 1 and "not a readable image" in bad.stderr


def test_transparent_pixels_are_sent_white_as_the_service_sees_them(tmp_path):
    """A black logo on a transparent background must not come out all black."""
    logo = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # transparent black everywhere...
    logo.paste((0, 0, 0, 255), (10, 10, 20, 20))  # ...and one opaque black square
    path = tmp_path / "logo.png"
    logo.save(path)
    sent = Image.open(io.BytesIO(base64.b64decode(load_image(str(path)))))
    assert sent.mode == "RGB"
    assert sent.getpixel((0, 0)) == (255, 255, 255) and sent.getpixel((15, 15)) == (0, 0, 0)
