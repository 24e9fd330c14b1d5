"""Mixed-length throughput and short-request latency under load, against a running caption service.

    python -m bench.mixed --url http://127.0.0.1:8000 --label new --out /tmp/after.json
    python -m bench.mixed --compare before.json after.json     # side-by-side markdown of two runs

Two measurements, both over HTTP (the driver knows nothing of the engine behind the URL):

1. Mixed lengths: `--requests` requests, one 512x512 image (1 tile) each, `max_tokens` drawn with a
   seeded RNG from `--max-tokens-choices` (8,32,128,256), temperature 0, sent closed loop at
   `--concurrency`. Reported: completion tokens/s (sum of `usage.completion_tokens` / wall seconds),
   captions/s and latency p50/p95, overall and per max_tokens value (each request is in `samples`).
   An engine that batches whole requests holds the short ones back until the longest of their batch
   ends; one that batches per iteration does not.
2. Short request under load: a `--short-tokens` (4) request alone (median of `--alone-repeats`),
   then `--long-count` (4) requests of `--long-tokens` (200) started together, and `--load-delay`
   (1.0 s) later the same short request; its latency under load over its latency alone is the ratio.
   `long_running_at_send` says how many long requests were still unanswered when the short one was
   sent (if 0, the load was over before it started and the ratio says nothing), `long_running_at_answer`
   how many when it came back (an engine that batches whole requests answers it only after them).

Images come from bench/images.py, request bodies and the HTTP client from bench/run.py. The JSON
(`--out`) also stores `os.getloadavg()` at the start, right before the timed part (after making the
images and the warm-up) and at the end: on a 2-core machine the client and anything else running
share the CPU with the server.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests

if __package__ in (None, ""):  # `python bench/mixed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.images import KINDS, BenchImage, make_image  # noqa: E402
from bench.run import Sample, add_request_options, build_body, git_commit, percentiles, send  # noqa: E402
from client import service_urls  # noqa: E402

MAX_TOKENS_CHOICES = (8, 32, 128, 256)


def parse_choices(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("max_tokens choices must be positive integers, e.g. 8,32,128,256")
    return values


def draw_max_tokens(n: int, seed: int, choices: tuple[int, ...] = MAX_TOKENS_CHOICES) -> list[int]:
    """`n` max_tokens values, uniform over `choices`, the same for the same seed on every machine."""
    rng = np.random.default_rng([seed, 7919])  # its own stream: independent of the image seeds
    return [int(v) for v in rng.choice(np.asarray(choices), size=n)]


def summarize_mixed(samples: list[Sample], errors: dict[str, int], wall_s: float, concurrency: int,
                    max_tokens: list[int]) -> dict:
    good = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens for s in good)
    return {
        "requests": len(samples), "ok": len(good), "errors": errors, "concurrency": concurrency,
        "wall_s": wall_s, "completion_tokens": tokens, "requested_max_tokens": sum(max_tokens),
        "completion_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "captions_per_s": len(good) / wall_s if wall_s > 0 else 0.0,
        "mean_completion_tokens": tokens / len(good) if good else 0.0,
        "latency_ms": percentiles([s.latency for s in good]),
        "max_tokens_counts": {str(c): max_tokens.count(c) for c in sorted(set(max_tokens))},
        # Short requests held back behind long ones show here, not in the overall percentiles.
        "latency_ms_by_max_tokens": {
            str(c): percentiles([s.latency for s, m in zip(samples, max_tokens) if s.ok and m == c])
            for c in sorted(set(max_tokens))},
        "samples": [{"max_tokens": m, "ok": s.ok, "latency_ms": s.latency * 1000.0,
                     "completion_tokens": s.completion_tokens} for s, m in zip(samples, max_tokens)],
    }


def summarize_short(alone_s: list[float], under_load_s: float | None, long_latencies_s: list[float],
                    running_at_send: int, running_at_answer: int, short_tokens: int, long_tokens: int,
                    delay_s: float) -> dict:
    alone_ms = [v * 1000.0 for v in alone_s]
    median = statistics.median(alone_ms) if alone_ms else None
    loaded = under_load_s * 1000.0 if under_load_s is not None else None
    return {
        "short_max_tokens": short_tokens, "long_max_tokens": long_tokens, "long_count": len(long_latencies_s),
        "load_delay_s": delay_s, "alone_ms": alone_ms, "alone_median_ms": median, "under_load_ms": loaded,
        "ratio": loaded / median if loaded is not None and median else None,
        "long_latency_ms": [v * 1000.0 for v in long_latencies_s], "long_running_at_send": running_at_send,
        "long_running_at_answer": running_at_answer,
    }


class Driver:
    """Request bodies and one HTTP session per thread, for one service."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.base_url, self.url = service_urls(args.url)
        self.headers = {"Accept": "application/json"}
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"
        self._local = threading.local()
        self._images: dict[int, BenchImage] = {}

    def images(self, indices: list[int]) -> None:
        """Make (in parallel: PNG encoding releases the GIL) the images these request indices send."""
        needed = [i for i in indices if i not in self._images]
        a = self.args
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            made = pool.map(lambda i: make_image(i, *a.size, KINDS, a.seed, a.max_num_tiles), needed)
            self._images.update(zip(needed, made))

    def body(self, image_index: int, max_tokens: int) -> dict:
        options = argparse.Namespace(**{**vars(self.args), "max_tokens": max_tokens})
        return build_body(self._images[image_index], options)  # stream and ignore_eos are off here

    def send(self, body: dict) -> tuple[Sample, str | None]:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return send(session, self.url, body, self.headers, self.args.timeout)

    def metadata(self) -> dict | None:
        try:
            response = requests.get(self.base_url + "/v1/metadata", headers=self.headers, timeout=10)
            return response.json() if response.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None


def run_mixed(driver: Driver, max_tokens: list[int], first_image: int) -> dict:
    """Closed loop: `concurrency` threads, each sending its next request as soon as the last is answered."""
    bodies = [driver.body(first_image + i, m) for i, m in enumerate(max_tokens)]
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def one(body: dict) -> Sample:
        sample, error = driver.send(body)
        if error:
            with lock:
                errors[error] = errors.get(error, 0) + 1
        return sample

    start = time.perf_counter()
    with ThreadPoolExecutor(driver.args.concurrency) as pool:  # a free thread takes the next body
        samples = list(pool.map(one, bodies))
    wall = time.perf_counter() - start
    return summarize_mixed(samples, errors, wall, driver.args.concurrency, max_tokens)


def run_short(driver: Driver, first_image: int) -> dict:
    a = driver.args
    alone = []
    for k in range(a.alone_repeats):
        sample, error = driver.send(driver.body(first_image + k, a.short_tokens))
        if error:
            raise RuntimeError(f"short request alone failed: {error}")
        alone.append(sample.latency)
    long_bodies = [driver.body(first_image + a.alone_repeats + k, a.long_tokens) for k in range(a.long_count)]
    short_body = driver.body(first_image + a.alone_repeats + a.long_count, a.short_tokens)
    with ThreadPoolExecutor(a.long_count) as pool:
        futures = [pool.submit(driver.send, b) for b in long_bodies]
        time.sleep(a.load_delay)
        at_send = sum(not f.done() for f in futures)
        sample, error = driver.send(short_body)
        at_answer = sum(not f.done() for f in futures)
        longs = []
        for f in futures:
            long_sample, long_error = f.result()
            if long_error:
                raise RuntimeError(f"long request failed: {long_error}")
            longs.append(long_sample.latency)
    if error:
        raise RuntimeError(f"short request under load failed: {error}")
    if at_send == 0:
        print(f"warning: all {a.long_count} long requests had ended before the short one was sent: "
              "no load was measured (raise --long-tokens or lower --load-delay)", file=sys.stderr)
    return summarize_short(alone, sample.latency, longs, at_send, at_answer, a.short_tokens, a.long_tokens,
                           a.load_delay)


def markdown(result: dict) -> str:
    return compare_markdown([result])


def _rows(result: dict) -> list[tuple[str, str]]:
    def f(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    rows = []
    m, s = result.get("mixed"), result.get("short")
    if m:
        lat = m["latency_ms"] or {}
        rows += [
            ("mixed: ok / requests", f"{m['ok']} / {m['requests']}"),
            ("mixed: completion tokens/s", f(m["completion_tokens_per_s"], ".1f")),
            ("mixed: captions/s", f(m["captions_per_s"], ".3f")),
            ("mixed: latency p50 ms", f(lat.get("p50"), ".0f")),
            ("mixed: latency p95 ms", f(lat.get("p95"), ".0f")),
        ]
        for c, by in (m.get("latency_ms_by_max_tokens") or {}).items():
            rows.append((f"mixed: p50 / p95 ms at max_tokens {c}",
                         f"{f(by.get('p50'), '.0f')} / {f(by.get('p95'), '.0f')}"))
        rows.append(("mixed: wall s", f(m["wall_s"], ".1f")))
    if s:
        rows += [
            ("short: its max_tokens; the load", f"{s['short_max_tokens']}; {s['long_count']} x {s['long_max_tokens']} "
                                                f"tok, short sent {s['load_delay_s']:g} s later"),
            ("short alone, median ms", f(s["alone_median_ms"], ".0f")),
            ("short under load ms", f(s["under_load_ms"], ".0f")),
            ("short: under load / alone", f(s["ratio"], ".2f")),
            ("long requests running when short sent / answered",
             f"{s['long_running_at_send']} / {s['long_running_at_answer']} (of {s['long_count']})"),
            ("long requests: latency ms (mean)", f(statistics.fmean(s["long_latency_ms"]), ".0f")),
        ]
    rows.append(("load average before (1/5/15 min)", " / ".join(f"{v:.2f}" for v in result["loadavg_before"])))
    return rows


def compare_markdown(results: list[dict]) -> str:
    """One column per run, headed by its label; a row missing from a run reads '-'."""
    head = ["metric"] + [r.get("label") or f"run {i + 1}" for i, r in enumerate(results)]
    columns = [dict(_rows(r)) for r in results]
    names = list(dict.fromkeys(name for r in results for name, _ in _rows(r)))
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(results)]
    for name in names:
        lines.append("| " + " | ".join([name] + [col.get(name, "-") for col in columns]) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mixed-length throughput and short-request latency under load.")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="service base URL (or its /v1/chat/completions endpoint)")
    p.add_argument("--label", default="", help="stored in the JSON and used as the table's column head")
    p.add_argument("--requests", type=int, default=48, help="mixed-length requests")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop concurrency of the mixed run")
    p.add_argument("--max-tokens-choices", type=parse_choices, default=MAX_TOKENS_CHOICES)
    p.add_argument("--short-tokens", type=int, default=4)
    p.add_argument("--long-tokens", type=int, default=200)
    p.add_argument("--long-count", type=int, default=4)
    p.add_argument("--load-delay", type=float, default=1.0, help="seconds between the long requests and the short")
    p.add_argument("--alone-repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) first")
    p.add_argument("--skip-mixed", action="store_true")
    p.add_argument("--skip-short", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    add_request_options(p)
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--compare", nargs="+", type=Path, metavar="JSON",
                   help="print a side-by-side table of these result files and exit")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.long_count < 1 or args.alone_repeats < 1:
        p.error("--requests, --concurrency, --long-count and --alone-repeats must be >= 1")
    args.stream, args.ignore_eos = False, False  # what bench.run.build_body reads
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(compare_markdown([json.loads(p.read_text()) for p in args.compare]), end="")
        return 0
    loadavg_before = list(os.getloadavg())
    driver = Driver(args)
    max_tokens = draw_max_tokens(args.requests, args.seed, args.max_tokens_choices)
    # Image indices: warm-up, then the mixed run, then the short-latency run; all distinct.
    mixed_first = args.warmup
    short_first = mixed_first + args.requests
    short_count = args.alone_repeats + args.long_count + 1
    started = time.perf_counter()
    driver.images(list(range(short_first + short_count)))
    print(f"{short_first + short_count} images {args.size[0]}x{args.size[1]} made in "
          f"{time.perf_counter() - started:.1f}s; load average {loadavg_before}", file=sys.stderr)
    for i in range(args.warmup):
        sample, error = driver.send(driver.body(i, 8))
        if error:
            print(f"warm-up request failed: {error}", file=sys.stderr)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    loadavg_timed = list(os.getloadavg())
    mixed = None if args.skip_mixed else run_mixed(driver, max_tokens, mixed_first)
    if mixed:
        print(f"mixed: {mixed['completion_tokens_per_s']:.1f} tok/s, {mixed['captions_per_s']:.2f} captions/s, "
              f"errors {mixed['errors'] or 0}", file=sys.stderr)
    short = None if args.skip_short else run_short(driver, short_first)
    config = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
              for k, v in vars(args).items() if k not in ("api_key", "compare", "stream", "ignore_eos")}
    result = {
        "label": args.label, "started_at": started_at, "url": args.url, "bench_commit": git_commit(),
        "cpu_count": os.cpu_count(), "loadavg_before": loadavg_before,
        "loadavg_before_timed": loadavg_timed, "loadavg_after": list(os.getloadavg()),
        "server_metadata": driver.metadata(), "config": config, "max_tokens": max_tokens,
        "mixed": mixed, "short": short,
    }
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if mixed and mixed["ok"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
