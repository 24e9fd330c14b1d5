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


def mock_caption_for(image) -> str:
    """The mock engine's caption of a decoded image, as the service would tile it (MAX_NUM_TILES=12)."""
    from model.mock import describe
    from service.jobs import to_input

    return describe(to_input(image, 12))
