"""client.py against a running service, and its nv-ingest-style image budget."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import client
from client import MAX_BASE64_CHARS, encode_png_within, load_image, service_urls

from tests.conftest import API_KEY
from tests.helpers import ROOT, free_port, mock_caption_for


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


def _photo(width, height, seed=0) -> Image.Image:
    """Smooth colour fields plus mild noise: compresses like a photo, unlike pure noise."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 90 + 128
    noise = np.random.default_rng(seed).normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _largest_fitting_width(image, budget) -> int:
    """Fine search (every width) with the same resampling: what the fast search should come close to."""
    lo, hi = 1, image.width
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(client._png_b64(client._scaled(image, mid / image.width))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@pytest.mark.parametrize("make", [_noise, _photo])
@pytest.mark.parametrize("budget", [40_000, MAX_BASE64_CHARS])
def test_shrinking_fits_and_stays_close_to_the_largest_size_that_fits(make, budget):
    image = make(900, 600)
    encoded, size = client.shrink_to_fit(image, budget)
    assert len(encoded) <= budget
    assert Image.open(io.BytesIO(base64.b64decode(encoded))).size == size
    assert abs(size[0] / size[1] - 1.5) < 0.02
    assert size[0] >= 0.85 * _largest_fitting_width(image, budget)


def test_zero_budget_never_shrinks():
    image = _noise(400, 300)
    assert client.shrink_to_fit(image, 0)[1] == (400, 300)
    assert Image.open(io.BytesIO(base64.b64decode(encode_png_within(image, 0)))).size == (400, 300)


@pytest.mark.parametrize("given", [
    "http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
    "http://h:8000/v1/chat/completions", "http://h:8000/v1/chat/completions/", " h:8000/v1 "])
def test_url_accepts_the_base_or_the_endpoint(given):
    assert service_urls(given) == ("http://h:8000", "http://h:8000/v1/chat/completions")
    prefixed = service_urls("https://proxy/prefix/v1")
    assert prefixed == ("https://proxy/prefix", "https://proxy/prefix/v1/chat/completions")


def test_help_describes_every_option():
    parser = client.build_parser()
    assert all(action.help for action in parser._actions)
    text = parser.format_help()
    assert "--max-base64-chars" in text and "flattened onto white" in text and "shrunk" in text


def test_big_image_is_shrunk_with_a_note_unless_the_budget_is_zero(mock_service, tmp_path, capsys):
    path = tmp_path / "big.png"
    _noise(400, 300).save(path)  # 480,000 base64 characters: over the budget, under the mock's 1 MiB body limit
    assert client.main([str(path), "--url", mock_service.url, "--api-key", API_KEY]) == 0
    out, err = capsys.readouterr()
    sent = re.search(r"(\d+)x(\d+) pixels", out).groups()
    assert int(sent[0]) < 400
    assert err.strip() == f"note: {path}: 400x300 sent as {sent[0]}x{sent[1]} to fit --max-base64-chars 180000 " \
                          "(0 sends it as is)"

    assert client.main([str(path), "--url", f"{mock_service.url}/v1", "--api-key", API_KEY,
                        "--max-base64-chars", "0"]) == 0
    out, err = capsys.readouterr()
    assert "400x300 pixels" in out and err == ""


def test_nothing_listening_or_no_chat_route_fails_clearly(mock_service, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(client.time, "sleep", lambda s: None)  # skip the retry back-off
    path = tmp_path / "a.png"
    Image.new("RGB", (10, 10)).save(path)
    dead = f"http://127.0.0.1:{free_port()}"
    assert client.main([str(path), "--url", dead, "--api-key", API_KEY]) == 1
    assert f"cannot reach {dead}/v1/chat/completions" in capsys.readouterr().err
    assert client.main([str(path), "--url", f"{mock_service.url}/elsewhere", "--api-key", API_KEY]) == 1
    assert f"no caption service answers at {mock_service.url}/elsewhere/v1/chat/completions (HTTP 404)" \
        in capsys.readouterr().err


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
