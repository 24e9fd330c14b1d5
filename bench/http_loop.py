"""Captions/s over HTTP in steady state: a closed loop, a warm-up, then completions counted in a window.

`concurrency` client threads each send their next request as soon as the last one is answered, for
as long as the level lasts (not a fixed list: no synchronised waves, no ramp or tail in the figure).
The warm-up lasts until `concurrency` requests have been answered (the first wave, which starts all at
once, is over) or `warmup_s` has passed; the measured window then lasts until `min_completions`
requests have been answered in it or `window_s` has passed, whichever comes first. Captions/s is the
answers that arrived inside the window over its length. Every bound is in seconds, so a level never
takes longer than warmup_s + window_s + drain_s, however slow the service.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import requests

from bench.run import percentiles, send


@dataclass
class Completion:
    start: float  # time.monotonic() when sent
    end: float  # when the answer (or the failure) arrived
    ok: bool
    tokens: int = 0
    error: str | None = None


@dataclass
class Limits:
    warmup_s: float  # warm-up at most this long (it ends earlier once `concurrency` answers arrived)
    window_s: float  # measured window at most this long
    min_completions: int  # the window ends early once this many answers arrived in it
    drain_s: float  # after the window: wait this long at most for the requests still out


def window_summary(completions: list[Completion], window_start: float, window_end: float) -> dict:
    """Figures of the answers that arrived in [window_start, window_end)."""
    inside = [c for c in completions if window_start <= c.end < window_end]
    good = [c for c in inside if c.ok]
    wall = max(window_end - window_start, 1e-9)
    errors: dict[str, int] = {}
    for c in inside:
        if not c.ok:
            errors[c.error or "failed"] = errors.get(c.error or "failed", 0) + 1
    tokens = sum(c.tokens for c in good)
    return {"window_s": round(wall, 3), "answered": len(inside), "ok": len(good), "errors": errors,
            "captions_per_s": round(len(good) / wall, 3), "output_tokens_per_s": round(tokens / wall, 1),
            "mean_completion_tokens": round(tokens / len(good), 1) if good else 0.0,
            "latency_ms": {k: round(v, 1) for k, v in percentiles([c.end - c.start for c in good]).items()}}


def closed_loop(url: str, bodies: list[dict], concurrency: int, limits: Limits, headers: dict | None = None,
                timeout: float = 300.0, log=None) -> dict:
    """Run one level; returns window_summary(...) plus the warm-up's and the window's bounds and counts.

    `url` is the chat-completions endpoint; the bodies are sent in turn (cycled)."""
    headers = headers or {"Accept": "application/json"}
    completions: list[Completion] = []
    lock = threading.Lock()
    stop = threading.Event()
    order = itertools.cycle(range(len(bodies)))
    in_flight = [0]

    def worker() -> None:
        session = requests.Session()
        while not stop.is_set():
            with lock:
                body = bodies[next(order)]
                in_flight[0] += 1
            start = time.monotonic()
            sample, error = send(session, url, body, headers, timeout)
            with lock:
                in_flight[0] -= 1
                completions.append(Completion(start, time.monotonic(), sample.ok, sample.completion_tokens, error))

    threads = [threading.Thread(target=worker, daemon=True, name=f"client-{i}") for i in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    # Warm-up: the first wave (all sent at once) is over, or time is up.
    while time.monotonic() - started < limits.warmup_s:
        with lock:
            if len(completions) >= concurrency:
                break
        time.sleep(0.05)
    window_start, window_start_unix = time.monotonic(), time.time()
    with lock:
        warmup_answers = len(completions)
    while time.monotonic() - window_start < limits.window_s:
        with lock:
            if sum(c.end >= window_start for c in completions) >= limits.min_completions:
                break
        time.sleep(0.05)
    window_end, window_end_unix = time.monotonic(), time.time()
    stop.set()
    drain_until = window_end + limits.drain_s
    for t in threads:
        t.join(max(0.0, drain_until - time.monotonic()))
    with lock:
        done = list(completions)
        still_out = in_flight[0]
    out = window_summary(done, window_start, window_end)
    out.update({"concurrency": concurrency, "warmup_s": round(window_start - started, 2),
                "warmup_answers": warmup_answers, "sent": len(done) + still_out,
                "still_out_after_drain": still_out,
                "window_unix": [round(window_start_unix, 3), round(window_end_unix, 3)]})
    if log:
        log(f"  warm-up {out['warmup_s']}s ({warmup_answers} answers), window {out['window_s']}s: {out['ok']} ok, "
            f"{out['captions_per_s']} captions/s, {still_out} still out after the drain")
    return out
