"""Shared test helpers: images, request bodies, and a real `python server.py` process."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "nvidia/nemotron-nano-12b-v2-vl"


def png_bytes(width: int = 64, height: int = 48, color=(200, 30, 30), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def noise_png(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """An image of random pixels (PNG by default): every tile differs, and it compresses badly (long base64)."""
    import numpy as np

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def nv_ingest_body(url: str, **overrides) -> dict:
    """nv-ingest's caption request, verbatim (REFERENCE.md)."""
    body = {
        "model": MODEL_NAME,
        "messages": [
            {"role": "system", "content": "/no_think"},
            {"role": "user", "content": [
                {"type": "text", "text": "Caption the content of this image:"},
                {"type": "image_url", "image_url": {"url": url}},
            ]},
        ],
        "max_tokens": 512,
        "temperature": 1.0,
        "top_p": 1.0,
        "stream": False,
    }
    body.update(overrides)
    return body


def metric_values(service: "Service") -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{service.url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def decode_steps_since(service: "Service", before: dict[tuple, float], rows: int, timeout: float = 10.0):
    """(rows decoded, engine steps that decoded, steps that decoded more than one sequence together) since
    `before` (a `metric_values` reading), from the `caption_batch_size` histogram (one observation per step,
    of its decoding rows). The worker records a step after sending its output, so this waits (up to `timeout`)
    until `rows` rows are counted."""
    deadline = time.monotonic() + timeout
    while True:
        after = metric_values(service)
        delta = {key: after.get(key, 0) - before.get(key, 0) for key in (
            ("caption_batch_size_sum", ()), ("caption_batch_size_count", ()),
            ("caption_batch_size_bucket", (("le", "1.0"),)))}
        if delta[("caption_batch_size_sum", ())] >= rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    steps = delta[("caption_batch_size_count", ())]
    single = delta[("caption_batch_size_bucket", (("le", "1.0"),))]
    return delta[("caption_batch_size_sum", ())], steps, steps - single


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`python server.py` in its own process group, stopped with SIGTERM like a container runtime does."""

    def __init__(self, env: dict[str, str], log_path: Path, startup_timeout: float = 120.0,
                 wait_for: str = "/v1/health/ready"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Each server gets its own metrics directory (the test process may have set one on import).
        inherited = ("NGC_API_KEY", "NVIDIA_API_KEY", "PROMETHEUS_MULTIPROC_DIR")
        full_env = {k: v for k, v in os.environ.items() if k not in inherited}
        full_env.update({"PORT": str(self.port), "HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"})
        full_env.update(env)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "server.py"], cwd=ROOT, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(startup_timeout, wait_for)

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"

    def _wait_ready(self, timeout: float, path: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def pids(self) -> dict[str, list[int]]:
        """Child processes by role: LitServe spawns inference workers and forks API servers."""
        roles: dict[str, list[int]] = {"worker": [], "other": []}
        for pid in _children(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            roles["worker" if "spawn_main" in cmdline and "resource_tracker" not in cmdline else "other"].append(pid)
        return roles

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # nothing of ours may outlive the test
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.proc.returncode


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


# --- The mock's caption, computed here without the service's or the model's code ------------------------
#
# model/mock.py captions each image from what the engine receives: the decoded image's size, and its tiles as
# the service cuts them (InternVL dynamic tiling into 512x512 tiles, PIL bicubic, plus a whole-image thumbnail
# when there is more than one tile). Its caption reads
#     "A {bright|dark} {wide|tall|square} image of {W}x{H} pixels with mean colour #{rrggbb}
#      and content hash {first 10 hex digits of sha256(tiles as uint8 bytes + b"WxH")}."
# where the mean colour is the per-channel mean of the last tile (the thumbnail, or the only tile), rounded,
# and "bright" means the mean of that colour's three channels is at least 128. What follows re-implements
# that from the raw image with PIL, numpy and hashlib only, so that a bug in the service's decoding, tiling
# or the mock shows as a difference instead of on both sides of the comparison.

_TILE = 512


def _grid(width: int, height: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of tiles: the grid of at most `max_tiles` tiles whose aspect ratio is closest to the
    image's; among grids equally close, a larger one is taken only when the image covers more than half of
    it (InternVL's `find_closest_aspect_ratio`)."""
    grids = sorted({(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles},
                   key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(width / height - c / r)
        if diff < best_diff or (diff == best_diff and width * height > 0.5 * _TILE * _TILE * c * r):
            best, best_diff = (c, r), min(diff, best_diff)
    return best


def expected_tiles(width: int, height: int, max_tiles: int = 12) -> int:
    """How many 512x512 tiles (thumbnail included) the model sees for an image of this size."""
    c, r = _grid(width, height, max_tiles)
    return c * r + (1 if c * r > 1 else 0)


def _decoded(image) -> Image.Image:
    """A PIL image, raw PNG/JPEG bytes or a base64 data URL -> the RGB image (alpha onto white)."""
    if isinstance(image, str):
        image = base64.b64decode(image.split(",", 1)[1])
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    if image.mode in ("RGBA", "LA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def mock_caption_for(image, max_tiles: int = 12) -> str:
    """The mock engine's caption of one image (a PIL image, raw PNG/JPEG bytes, or a data URL), as a server
    with MAX_NUM_TILES=`max_tiles` cuts it; computed without model/ or service/ code (see above)."""
    import hashlib

    import numpy as np

    image = _decoded(image)
    w, h = image.size
    cols, rows = _grid(w, h, max_tiles)
    grid = np.asarray(image.resize((cols * _TILE, rows * _TILE), Image.Resampling.BICUBIC), dtype=np.uint8)
    tiles = [grid[r * _TILE:(r + 1) * _TILE, c * _TILE:(c + 1) * _TILE] for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(np.asarray(image.resize((_TILE, _TILE), Image.Resampling.BICUBIC), dtype=np.uint8))
    digest = hashlib.sha256(np.ascontiguousarray(np.stack(tiles)).tobytes() + f"{w}x{h}".encode()).hexdigest()
    red, green, blue = (int(round(v)) for v in tiles[-1].reshape(-1, 3).mean(axis=0, dtype=np.float64))
    tone = "bright" if (red + green + blue) / 3 >= 128 else "dark"
    shape = "wide" if w > h else "tall" if h > w else "square"
    return (f"A {tone} {shape} image of {w}x{h} pixels with mean colour #{red:02x}{green:02x}{blue:02x} "
            f"and content hash {digest[:10]}.")


def wait_in_flight(service, n: int, timeout: float = 10.0) -> None:
    """Wait until `n` requests are admitted (from /metrics), so that a signal finds them in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in requests.get(f"{service.url}/metrics", timeout=5).text.splitlines():
            if line.startswith("caption_requests_in_flight ") and float(line.split()[1]) >= n:
                return
        time.sleep(0.05)
    raise AssertionError(f"{n} requests never got in flight")
