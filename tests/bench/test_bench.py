"""bench/images.py and bench/run.py: seeded images with controlled tile counts, and a sweep over loopback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import run
from bench.images import make_image, make_images
from client import MAX_BASE64_CHARS


def test_images_are_seeded_distinct_and_within_budget():
    first = make_images(3, 512, 512)
    again = make_images(3, 512, 512)
    assert [im.b64 for im in first] == [im.b64 for im in again]
    assert len({im.b64 for im in first}) == 3
    assert [im.kind for im in first] == ["document", "chart", "photo"]
    assert all(len(im.b64) <= MAX_BASE64_CHARS and im.tiles == 1 for im in first)
    assert make_image(0, 512, 512, seed=1).b64 != first[0].b64


def test_aspect_ratio_sets_the_tile_count_even_after_shrinking():
    photo = make_image(2, 640, 480)  # noisy photo: shrunk to fit the base64 budget
    assert photo.width < 640 and len(photo.b64) <= MAX_BASE64_CHARS
    assert photo.tiles == 13
    assert make_image(0, 640, 480).tiles == 13
    assert make_image(1, 1024, 512).tiles == 3  # 2x1 grid + thumbnail


def test_plan_repeats_only_earlier_images():
    plan = run.plan_level(200, 0.3, 1000, np.random.default_rng(0))
    assert plan.image_ids[0] == 1000 and not plan.repeats[0]
    seen = set()
    for image_id, repeat in zip(plan.image_ids, plan.repeats):
        assert (image_id in seen) == repeat
        seen.add(image_id)
    assert 0.2 < sum(plan.repeats) / 200 < 0.4
    assert run.plan_level(50, 0.0, 0, np.random.default_rng(0)).image_ids == list(range(50))


def test_sweep_against_the_mock_service(mock_service, tmp_path):
    from tests.conftest import API_KEY

    code = run.main(["--url", mock_service.chat_url, "--concurrency", "1,3", "--requests", "6", "--max-tokens", "5",
                     "--stream", "--repeat-fraction", "0.3", "--warmup", "1", "--api-key", API_KEY,
                     "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [lvl["concurrency"] for lvl in data["levels"]] == [1, 3]
    for level in data["levels"]:
        assert level["ok"] == 6 and not level["errors"]
        assert level["mean_completion_tokens"] == 5  # mock captions are longer than 5 words
        assert 0 < level["ttft_ms"]["p50"] <= level["latency_ms"]["p50"]
        assert 0 <= level["itl_ms"]["p50"] < level["latency_ms"]["p50"]
        assert level["output_tokens_per_s"] == pytest.approx(level["captions_per_s"] * 5)
    assert "| 3 | 6 | 6 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_counts_failures(mock_service, tmp_path, capsys):
    code = run.main(["--url", f"{mock_service.url}/v1", "--concurrency", "2", "--requests", "4", "--warmup", "0",
                     "--stream", "--api-key", "wrong-key", "--out", str(tmp_path)])
    assert code == 1  # every request failed
    level = json.loads((tmp_path / "results.json").read_text())["levels"][0]
    assert level["ok"] == 0 and level["errors"] == {"HTTP 401": 4}
    out, err = capsys.readouterr()
    assert "concurrency 2: all 4 requests failed: HTTP 401 x4" in err
    assert "| 2 | 4 | 0 |" in out and "| HTTP 401 x4 |" in out
    assert "nan" not in out + err + (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("given", ["http://h:8000", "http://h:8000/v1/", "http://h:8000/v1/chat/completions"])
def test_url_accepts_the_base_or_the_endpoint(given):
    assert run.parse_args(["--url", given]).url == "http://h:8000"


def test_no_service_stops_before_the_sweep_with_one_message(mock_service, capsys):
    from tests.helpers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    assert run.main(["--url", dead, "--requests", "2", "--warmup", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: no caption service answers at URL: {dead}/v1/chat/completions (ConnectionError)\n"
    assert run.main(["--url", f"{mock_service.url}/elsewhere", "--requests", "2", "--warmup", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no caption service answers at URL" in err and "(HTTP 404)" in err and "nan" not in err


def test_help_describes_every_option():
    assert all(action.help for action in run.build_parser()._actions)
