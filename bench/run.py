"""Drive a running caption service over HTTP at a sweep of concurrency levels and report throughput.

    python -m bench.run --url http://127.0.0.1:8000 --concurrency 1,4,16,64 --requests 128 \
        --size 512x512 --max-tokens 128 --out bench/results/1tile

`--url` takes the base URL (`http://host:8000`, `.../v1`) or the `/v1/chat/completions` endpoint, as
client.py does. Before the sweep it checks that something serves that route, and exits 2 with one message
if nothing does. A level whose requests all failed reports their errors, not figures.

Closed loop: at level C, C client threads each send their next request as soon as the last one is
answered, until `--requests` requests have been answered. Per level: captions/s and output tokens/s
(from `usage.completion_tokens`) over the level's wall time, latency p50/p95/p99 and, with `--stream`,
time to first token (first SSE chunk carrying text). `--repeat-fraction F` makes that share of the
requests repeat an image sent earlier in the same level (exercises CAPTION_CACHE_SIZE; the cache
only takes sampled requests with CAPTION_CACHE_SAMPLED=1, so pair it with `--temperature 0` or that).
Images come from bench/images.py (seeded; distinct per request and per level unless repeated).
The client shares the machine with the service when run on the same host: on 2 cores its own JSON
and thread work is part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import requests

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.images import KINDS, BenchImage, make_image, parse_kinds, parse_size  # noqa: E402
from client import DEFAULT_MODEL, service_urls  # noqa: E402


@dataclass
class Sample:
    ok: bool
    status: int
    latency: float
    ttft: float | None = None
    completion_tokens: int = 0
    repeat: bool = False


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    captions_per_s: float
    output_tokens_per_s: float
    mean_completion_tokens: float
    latency_ms: dict[str, float]
    ttft_ms: dict[str, float] | None = None
    itl_ms: dict[str, float] | None = None  # (latency - TTFT) / (tokens - 1): decode time per token
    repeats: int = 0


@dataclass
class Plan:
    """Which image each request of a level sends: fresh ones in order, repeats of earlier ones."""

    image_ids: list[int]
    repeats: list[bool] = field(default_factory=list)


def plan_level(n: int, repeat_fraction: float, first_id: int, rng: np.random.Generator) -> Plan:
    ids, repeats = [], []
    fresh = first_id
    for i in range(n):
        if i > 0 and rng.random() < repeat_fraction:
            ids.append(ids[int(rng.integers(0, i))])
            repeats.append(True)
        else:
            ids.append(fresh)
            fresh += 1
            repeats.append(False)
    return Plan(ids, repeats)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values) * 1000.0
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def build_body(image: BenchImage, args: argparse.Namespace) -> dict:
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages.append({"role": "user", "content": [
        {"type": "text", "text": args.prompt},
        {"type": "image_url", "image_url": {"url": image.data_url}},
    ]})
    body = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "top_p": 1.0, "stream": bool(args.stream)}
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:  # vLLM's extensions: every caption is exactly max_tokens long
        body.update(min_tokens=args.max_tokens, ignore_eos=True)
    return body


def send(session: requests.Session, url: str, body: dict, headers: dict, timeout: float) -> tuple[Sample, str | None]:
    start = time.perf_counter()
    try:
        response = session.post(url, json=body, headers=headers, timeout=timeout, stream=bool(body["stream"]))
    except requests.RequestException as exc:
        return Sample(False, 0, time.perf_counter() - start), type(exc).__name__
    if response.status_code != 200:
        response.close()
        return Sample(False, response.status_code, time.perf_counter() - start), f"HTTP {response.status_code}"
    if not body["stream"]:
        try:
            usage = response.json().get("usage") or {}
        except ValueError:
            return Sample(False, 200, time.perf_counter() - start), "non-JSON 200"
        return Sample(True, 200, time.perf_counter() - start, None, int(usage.get("completion_tokens", 0))), None
    ttft, tokens, done, error = None, 0, False, None
    try:
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = "in-stream error"
                continue
            for choice in chunk.get("choices") or []:
                if ttft is None and (choice.get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = int(chunk["usage"].get("completion_tokens", 0))
    except (requests.RequestException, ValueError) as exc:
        error = type(exc).__name__
    latency = time.perf_counter() - start
    if error or not done:
        return Sample(False, 200, latency, ttft), error or "stream cut without [DONE]"
    return Sample(True, 200, latency, ttft, tokens), None


def run_level(concurrency: int, plan: Plan, images: dict[int, BenchImage], args: argparse.Namespace,
              headers: dict) -> LevelResult:
    url = service_urls(args.url)[1]
    bodies = [build_body(images[i], args) for i in plan.image_ids]
    samples: list[Sample] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    next_index = iter(range(len(bodies)))
    local = threading.local()

    def worker() -> None:
        local.session = requests.Session()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            sample, error = send(local.session, url, bodies[i], headers, args.timeout)
            sample.repeat = plan.repeats[i]
            with lock:
                samples.append(sample)
                if error:
                    errors[error] = errors.get(error, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    good = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens for s in good)
    ttfts = [s.ttft for s in good if s.ttft is not None]
    itls = [(s.latency - s.ttft) / (s.completion_tokens - 1) for s in good
            if s.ttft is not None and s.completion_tokens > 1]
    return LevelResult(
        concurrency=concurrency, requests=len(samples), ok=len(good), errors=errors, wall_s=wall,
        captions_per_s=len(good) / wall, output_tokens_per_s=tokens / wall,
        mean_completion_tokens=tokens / len(good) if good else 0.0,
        latency_ms=percentiles([s.latency for s in good]),
        ttft_ms=percentiles(ttfts) if args.stream else None, itl_ms=percentiles(itls) if args.stream else None,
        repeats=sum(plan.repeats))


def markdown(results: list[LevelResult], stream: bool) -> str:
    head = ["concurrency", "requests", "ok", "captions/s", "output tok/s", "tokens/caption",
            "p50 ms", "p95 ms", "p99 ms"]
    if stream:
        head += ["TTFT p50 ms", "TTFT p95 ms", "TTFT p99 ms", "ms/token p50"]
    head.append("errors")
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in results:
        cells = [str(r.concurrency), str(r.requests), str(r.ok), f"{r.captions_per_s:.2f}",
                 f"{r.output_tokens_per_s:.1f}", f"{r.mean_completion_tokens:.1f}",
                 *(_ms(r.latency_ms, p) for p in ("p50", "p95", "p99"))]
        if stream:
            cells += [_ms(r.ttft_ms, p) for p in ("p50", "p95", "p99")]
            cells.append(_ms(r.itl_ms, "p50", ".2f"))
        cells.append(error_summary(r.errors) or "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _ms(stats: dict[str, float] | None, key: str, spec: str = ".1f") -> str:
    """A figure, or '-' where no request gave one (never nan)."""
    return format(stats[key], spec) if stats and key in stats else "-"


def error_summary(errors: dict[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(errors.items()))


def plot(results: list[LevelResult], path: Path, title: str) -> None:
    """Two panels, drawn with Pillow (no plotting dependency): captions/s, and p50/p95 latency, vs concurrency."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, pad = 1000, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    draw.text((pad, 8), title, fill="black", font=font)
    xs = [r.concurrency for r in results]
    panels = [
        ("captions/s", [("captions/s", [r.captions_per_s for r in results], (31, 119, 180))]),
        ("latency ms", [("p50", [r.latency_ms.get("p50", 0) for r in results], (44, 160, 44)),
                        ("p95", [r.latency_ms.get("p95", 0) for r in results], (214, 39, 40))]),
    ]
    panel_w = (width - 3 * pad) // 2
    for k, (ylabel, series) in enumerate(panels):
        x0, y0, x1, y1 = pad + k * (panel_w + pad), 40, pad + k * (panel_w + pad) + panel_w, height - pad
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, y0 - 16), ylabel, fill="black", font=font)
        ymax = max([max(v) for _, v, _ in series] + [1e-9]) * 1.1
        lx = [np.log2(max(x, 1)) for x in xs]
        lo, hi = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1

        def px(i: int) -> float:
            return x0 + 10 + (lx[i] - lo) / (hi - lo) * (x1 - x0 - 20)

        for i, x in enumerate(xs):
            draw.text((px(i) - 6, y1 + 4), str(x), fill="black", font=font)
        draw.text(((x0 + x1) // 2 - 40, y1 + 22), "concurrency (log2)", fill="black", font=font)
        for frac in (0, 0.5, 1):
            y = y1 - frac * (y1 - y0) / 1.1
            draw.text((x0 - 55, y - 7), f"{ymax / 1.1 * frac:.3g}", fill="black", font=font)
        for j, (name, values, color) in enumerate(series):
            points = [(px(i), y1 - v / ymax * (y1 - y0)) for i, v in enumerate(values)]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            draw.text((x1 - 90, y0 + 6 + 16 * j), name, fill=color, font=font)
    image.save(path)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_levels(text: str) -> list[int]:
    levels = [int(v) for v in text.split(",") if v.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers, e.g. 1,4,16,64")
    return levels


def add_request_options(p: argparse.ArgumentParser) -> None:
    """What every request of a benchmark looks like (shared by the tools in bench/)."""
    p.add_argument("--size", type=parse_size, default=(512, 512),
                   help="image WIDTHxHEIGHT (sets the tile count: 512x512 is 1 tile, 640x480 13)")
    p.add_argument("--seed", type=int, default=0, help="image seed: the same seed draws the same images")
    p.add_argument("--max-num-tiles", type=int, default=12,
                   help="the server's MAX_NUM_TILES, to report each image's tile count (default: %(default)s)")
    p.add_argument("--prompt", default="Caption the content of this image:", help="user text (nv-ingest's by default)")
    p.add_argument("--system-prompt", default="/no_think", help="system message; '' sends none (default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the request's model field (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("NGC_API_KEY") or os.environ.get("NVIDIA_API_KEY"),
                   help="bearer key (default: $NGC_API_KEY, then $NVIDIA_API_KEY)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Throughput and latency sweep against a running caption service.")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="service base URL (http://host:8000 or .../v1) or its /v1/chat/completions endpoint")
    p.add_argument("--concurrency", type=parse_levels, default=[1, 4, 16, 64],
                   help="comma list of levels: requests in flight at once (default: 1,4,16,64)")
    p.add_argument("--requests", type=int, default=128, help="answered requests per concurrency level")
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before the sweep")
    p.add_argument("--stream", action="store_true", help="use SSE and measure time to first token")
    p.add_argument("--max-tokens", type=int, default=128, help="caption length cap in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="1.0 is what nv-ingest sends")
    p.add_argument("--ignore-eos", action="store_true", help="fixed-length captions of exactly --max-tokens")
    p.add_argument("--repeat-fraction", type=float, default=0.0,
                   help="share of requests that resend an earlier image of the level, in [0, 1) (default: 0)")
    p.add_argument("--kinds", type=parse_kinds, default=KINDS,
                   help=f"comma list of image kinds, used in turn (default: {','.join(KINDS)})")
    add_request_options(p)
    p.add_argument("--out", type=Path, help="write results.json, results.md and plot.png here")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not 0.0 <= args.repeat_fraction < 1.0:
        p.error("--repeat-fraction must be in [0, 1)")
    if args.requests < 1:
        p.error("--requests must be >= 1")
    args.url = service_urls(args.url)[0]  # the base URL, whichever form was given (bench/gpu.py reads it too)
    return args


def check_service(url: str, headers: dict) -> str | None:
    """None when something serves the chat route at `url`, else why not: checked before any image is made."""
    chat = service_urls(url)[1]
    try:  # a GET costs the service nothing: 405 (or 401) means the POST route is there, 404 that it is not
        status = requests.get(chat, headers=headers, timeout=10).status_code
    except requests.RequestException as exc:
        return f"no caption service answers at URL: {chat} ({type(exc).__name__})"
    return f"no caption service answers at URL: {chat} (HTTP 404)" if status == 404 else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    headers = {"Accept": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    problem = check_service(args.url, headers)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    plans, next_id = [], 1_000_000  # warm-up images use ids below this, so they never count as repeats
    for _ in args.concurrency:
        plan = plan_level(args.requests, args.repeat_fraction, next_id, rng)
        plans.append(plan)
        next_id = max(plan.image_ids) + 1
    needed = sorted({i for plan in plans for i in plan.image_ids} | set(range(args.warmup)))
    started = time.perf_counter()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PNG encoding releases the GIL
        images = dict(zip(needed, pool.map(
            lambda i: make_image(i, *args.size, args.kinds, args.seed, args.max_num_tiles), needed)))
    tiles = sorted({im.tiles for im in images.values()})
    print(f"{len(images)} images {args.size[0]}x{args.size[1]} ({','.join(args.kinds)}), tiles {tiles}, "
          f"base64 chars max {max(len(im.b64) for im in images.values())}, made in "
          f"{time.perf_counter() - started:.1f}s", file=sys.stderr)
    if args.warmup:
        run_level(1, Plan(list(range(args.warmup)), [False] * args.warmup), images, args, headers)
    results = []
    for level, plan in zip(args.concurrency, plans):
        result = run_level(level, plan, images, args, headers)
        results.append(result)
        if result.ok:
            print(f"concurrency {level}: {result.captions_per_s:.2f} captions/s, "
                  f"p50 {_ms(result.latency_ms, 'p50')} ms, errors: {error_summary(result.errors) or 'none'}", file=sys.stderr)
        else:
            print(f"concurrency {level}: all {result.requests} requests failed: {error_summary(result.errors)}",
                  file=sys.stderr)
    table = markdown(results, args.stream)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        config = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                  for k, v in vars(args).items() if k != "api_key"}
        meta = {"date": date.today().isoformat(), "commit": git_commit(), "cpu_count": os.cpu_count(),
                "tiles": tiles, "config": config}
        (args.out / "results.json").write_text(json.dumps({**meta, "levels": [asdict(r) for r in results]}, indent=2))
        (args.out / "results.md").write_text(
            f"Run {meta['date']}, commit {meta['commit']}, {args.size[0]}x{args.size[1]} images ({tiles} tiles), "
            f"max_tokens {args.max_tokens}, temperature {args.temperature}, stream {args.stream}, "
            f"repeat fraction {args.repeat_fraction}, {args.requests} requests per level.\n\n" + table)
        plot(results, args.out / "plot.png",
             f"{args.url} | {args.size[0]}x{args.size[1]} ({tiles} tiles) | max_tokens {args.max_tokens}")
    failed = sum(r.requests - r.ok for r in results)
    return 1 if failed == sum(r.requests for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
