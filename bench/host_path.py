"""How many tokens the service's host side carries when the model costs nothing.

    python -m bench.host_path --checkout new=. --checkout base=/tmp/base --reps 3 --out bench/results/host-path
    # a third run of the base with one torch thread, to tell the transport's share from the threads':
    python -m bench.host_path --checkout new=. --checkout base=/tmp/base --checkout base1=/tmp/base \
        --env base1:OMP_NUM_THREADS=1 --reps 2

Each checkout's `python server.py` runs in mock mode at zero delay (ENABLE_MOCK_INFERENCE=1,
MOCK_TOKEN_DELAY=0, MAX_BATCH_SIZE=64), so every token/s it reaches is a ceiling of the host path:
the scheduler, the sampler, detokenising, the worker-to-API-server transport, the HTTP answers.
For every repetition the checkouts run back to back (one server at a time), each with one wave of
`--concurrency` greedy requests of `--max-tokens` tokens with `ignore_eos`, once not streamed and
once streamed, after a short warm-up. Completion tokens/s = the tokens the answers' `usage` reports
over the wave's wall time. The client is raw asyncio sockets (no JSON parsing per chunk), so it
takes as little of a small machine's CPU as it can.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python server.py` of one checkout, in its own process group."""

    def __init__(self, checkout: Path, env: dict[str, str], log: Path):
        self.port = free_port()
        full = {k: v for k, v in os.environ.items() if k not in ("NGC_API_KEY", "NVIDIA_API_KEY",
                                                                 "PROMETHEUS_MULTIPROC_DIR")}
        full.update({"ENABLE_MOCK_INFERENCE": "1", "MOCK_TOKEN_DELAY": "0", "MAX_BATCH_SIZE": "64",
                     "MAX_QUEUED_REQUESTS": "512", "REQUEST_TIMEOUT": "900", "HOST": "127.0.0.1",
                     "PORT": str(self.port), "LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"})
        full.update(env)
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "server.py"], cwd=checkout, env=full, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server in {checkout} exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server in {checkout} not ready after 120 s; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


def body(max_tokens: int, stream: bool, index: int) -> bytes:
    request = {"model": "", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
               "messages": [{"role": "system", "content": "/no_think"},
                            {"role": "user", "content": f"Caption request {index}: say something long."}]}
    if stream:
        request["stream_options"] = {"include_usage": True}
    return json.dumps(request).encode()


async def one_request(port: int, payload: bytes, stream: bool) -> int:
    """Send one request over a fresh connection; return its completion tokens (0 when it failed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
    await writer.drain()
    chunks = []
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        chunks.append(data)
    writer.close()
    raw = b"".join(chunks)
    if not raw.startswith(b"HTTP/1.1 200") or (stream and b"data: [DONE]" not in raw):
        return 0
    found = USAGE.findall(raw[-4096:])  # streamed: the usage chunk is the last before [DONE]
    return int(found[-1]) if found else 0


async def wave(port: int, concurrency: int, max_tokens: int, stream: bool) -> dict:
    started = time.perf_counter()
    tokens = await asyncio.gather(*(one_request(port, body(max_tokens, stream, i), stream)
                                    for i in range(concurrency)))
    wall = time.perf_counter() - started
    return {"stream": stream, "ok": sum(1 for t in tokens if t == max_tokens), "requests": concurrency,
            "completion_tokens": sum(tokens), "wall_s": round(wall, 3),
            "tokens_per_s": round(sum(tokens) / wall, 1)}


def run_checkout(checkout: Path, env: dict[str, str], args: argparse.Namespace, log: Path) -> list[dict]:
    server = Server(checkout, env, log)
    try:
        asyncio.run(wave(server.port, 4, 32, False))  # warm-up: imports, first connections
        asyncio.run(wave(server.port, 4, 32, True))
        return [asyncio.run(wave(server.port, args.concurrency, args.max_tokens, stream)) for stream in (False, True)]
    finally:
        server.stop()


def git_commit(checkout: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def summarise(runs: list[dict], labels: list[str]) -> dict:
    summary = {}
    for label in labels:
        for stream in (False, True):
            rates = [w["tokens_per_s"] for r in runs if r["label"] == label for w in r["waves"] if w["stream"] == stream]
            summary[f"{label}/{'stream' if stream else 'json'}"] = {"median": statistics.median(rates),
                                                                     "all": rates}
    return summary


def _rate(result: dict, rep: int, label: str, mode: str) -> float:
    run = next(r for r in result["runs"] if r["rep"] == rep and r["label"] == label)
    return next(w["tokens_per_s"] for w in run["waves"] if w["stream"] == (mode == "stream"))


def markdown(result: dict) -> str:
    labels = [c["label"] for c in result["checkouts"]]
    lines = ["| checkout | commit | extra env | answers | completion tokens/s, median (each repetition) |",
             "|---|---|---|---|---|"]
    for c in result["checkouts"]:
        env = " ".join(f"{k}={v}" for k, v in c["env"].items()) or "-"
        for mode in ("json", "stream"):
            s = result["summary"][f"{c['label']}/{mode}"]
            each = ", ".join(f"{v:,.0f}" for v in s["all"])
            lines.append(f"| {c['label']} | {c['commit']} | {env} | {mode} | {s['median']:,.0f} ({each}) |")
    base = result["baseline"]
    for label in labels:
        for mode in ("json", "stream"):
            if label != base:
                ratio = result["summary"][f"{label}/{mode}"]["median"] / max(1e-9, result["summary"][f"{base}/{mode}"]["median"])
                paired = [_rate(result, rep, label, mode) / max(1e-9, _rate(result, rep, base, mode))
                          for rep in range(result["reps"])]
                lines.append(f"\n{label} / {base}, {mode}: {ratio:.2f}x (medians); per repetition, back to back: "
                             + ", ".join(f"{r:.2f}x" for r in paired))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", action="append", required=True, help="LABEL=PATH of a checkout (repeatable)")
    p.add_argument("--env", action="append", default=[], help="LABEL:KEY=VALUE, an extra variable for that "
                                                              "checkout's server (repeatable)")
    p.add_argument("--baseline", help="the label the others are compared with (default: the last checkout)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("bench/results/host-path"))
    args = p.parse_args(argv)
    checkouts = [(label, Path(path).resolve()) for label, _, path in (c.partition("=") for c in args.checkout)]
    envs: dict[str, dict[str, str]] = {}
    for item in args.env:
        label, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        envs.setdefault(label, {})[key] = value
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for rep in range(args.reps):
        for label, path in checkouts:  # back to back: both see the same load from other processes
            waves = run_checkout(path, envs.get(label, {}), args, args.out / f"server-{label}.log")
            runs.append({"rep": rep, "label": label, "waves": waves})
            print(f"rep {rep} {label}: " + ", ".join(f"{'stream' if w['stream'] else 'json'} "
                                                     f"{w['tokens_per_s']:,.0f} tok/s ({w['ok']}/{w['requests']} ok)"
                                                     for w in waves), flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "reps": args.reps,
              "checkouts": [{"label": label, "path": str(path), "commit": git_commit(path), "env": envs.get(label, {})}
                            for label, path in checkouts],
              "baseline": args.baseline or checkouts[-1][0],
              "runs": runs, "summary": summarise(runs, [label for label, _ in checkouts])}
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
