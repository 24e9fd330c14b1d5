"""The whole GPU benchmark in one command: `python -m bench.gpu --out DIR` (`--tiny` on a CPU).

It builds the full-size architecture with random bf16 weights directly on the GPU (LOAD_FORMAT=dummy:
no download, no 25 GB file; speed does not depend on weight values), then measures in this process:
decode ms/token at batch 1, 16 and 64 (1-tile prompts, EOS ignored), prefill ms of a 1-tile and a
13-tile image (vision encoder included, until the first token), vision-encoder ms per tile, batch
invariance (share of 16 requests whose first 32 greedy tokens are the same alone and batched) and
peak GPU memory; then starts `python server.py` on the same random-weight model and measures
captions/s over HTTP for 1-tile and 13-tile images at concurrency 16 and 64, 128-token captions.
It writes DIR/results.json (keys below) and DIR/results.md (each figure against bench/roofline.py).
`--tiny` runs the same code on the CPU with the tiny checkpoint, as the test suite does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import requests
import torch

from bench.images import make_image
from bench.roofline import figures
from bench.run import Plan, git_commit, parse_args, run_level
from engine.llm_engine import LLMEngine
from engine.request import EngineRequest, ImagePart, Message, SamplingParams, TextPart
from model.official import OFFICIAL_CONFIG
from model.engine import random_image
from model.runner import NemotronRunner, load_runner
from model.tiny import build_tokenizer, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DECODE_BATCHES = (1, 16, 64)
IMAGE_SIZES = {1: "512x512", 13: "640x480"}  # image sizes that give these tile counts
CONCURRENCY = (16, 64)
HTTP_LEVELS = ((1, 64), (13, 64), (1, 16), (13, 16))  # (tiles, concurrency), the targets first
OUTPUT_TOKENS = 128
MAX_SEQ_LEN = 8192


def log(message: str) -> None:
    print(f"[bench.gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- the model -----------------------------------------------------------------------------------------

def write_dummy_checkpoint(out: Path) -> Path:
    """Config, tokenizer and chat template of a full-size checkpoint, without weights (LOAD_FORMAT=dummy)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = json.loads(json.dumps(OFFICIAL_CONFIG))
    config["img_context_token_id"] = tokenizer.convert_tokens_to_ids("<image>")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 12]}))
    tokenizer.save_pretrained(str(out))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def caption_request(request_id: str, tiles: int, seed: int, max_tokens: int, ignore_eos: bool = True) -> EngineRequest:
    user = Message("user", [ImagePart(random_image(tiles, seed)), TextPart("Caption the content of this image:")])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, min_tokens=max_tokens if ignore_eos else 0,
                            ignore_eos=ignore_eos)
    return EngineRequest(request_id, [Message("system", [TextPart("/no_think")]), user], params)


def run_all(engine: LLMEngine, requests_: list[EngineRequest]) -> dict[str, str]:
    for request in requests_:
        engine.add_request(request)
    texts: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"{out.request_id}: {out.error.message}")
            texts[out.request_id] = texts.get(out.request_id, "") + out.content
    return texts


# ---- in-process measurements ---------------------------------------------------------------------------

def vit_ms_per_tile(runner: NemotronRunner, repeats: int) -> float:
    tiles = random_image(13, 1).tiles
    runner._encode([tiles])  # warm-up
    times = []
    for _ in range(repeats):
        sync(runner.device)
        start = time.perf_counter()
        runner._encode([tiles])
        sync(runner.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 / len(tiles)


def prefill_ms(runner: NemotronRunner, tiles: int, repeats: int) -> float:
    """One request alone: vision encoder, every prefill chunk and the first token."""
    engine = LLMEngine(runner, 1, 2048)
    times = []
    for i in range(repeats + 1):
        sync(runner.device)
        start = time.perf_counter()
        run_all(engine, [caption_request(f"p{tiles}-{i}", tiles, i, 1)])
        sync(runner.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def decode_ms(runner: NemotronRunner, batch: int, steps: int) -> float:
    """Median time of one engine step while `batch` sequences decode (nothing prefilling)."""
    engine = LLMEngine(runner, batch, 2048)
    for i in range(batch):
        engine.add_request(caption_request(f"d{batch}-{i}", 1, 100 + i, steps + 8))
    times = []
    while engine.has_unfinished():
        sync(runner.device)
        start = time.perf_counter()
        engine.step()
        sync(runner.device)
        stats = engine.stats
        if stats.prefill_tokens == 0 and stats.decode_rows == batch:
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:steps]) * 1e3


def batch_invariance(runner: NemotronRunner, n: int = 16, tokens: int = 32) -> float:
    engine = LLMEngine(runner, n, 2048)
    requests_ = [caption_request(f"b{i}", 1, 500 + i, tokens) for i in range(n)]
    alone = {}
    for request in requests_:
        alone.update(run_all(engine, [request]))
    together = run_all(engine, [caption_request(r.request_id, 1, 500 + i, tokens) for i, r in enumerate(requests_)])
    return sum(alone[k] == together[k] for k in alone) / n


@torch.inference_mode()
def step_consistency(runner: NemotronRunner) -> dict:
    """Prefill of N+1 tokens vs prefill of N then one decoding step (graphs on a GPU): same next token?"""
    prompt = runner.prepare(caption_request("c", 1, 7, 4))
    runner.encode_images([prompt])
    embeds = prompt.payload.embeds
    ids = prompt.payload.input_ids
    n = len(ids) - 1
    full = runner.forward.prefill([0], [embeds], [0])
    runner.forward.prefill([0], [embeds[:n]], [0])
    stepped = runner.forward.decode([0], [ids[n]])
    diff = float((full - stepped).abs().max() / full.abs().max())
    return {"relative_max_diff": round(diff, 5), "same_argmax": bool(full.argmax() == stepped.argmax())}


def in_process(checkpoint: Path, device: str, load_format: str, tiny: bool, extra: dict,
               compare_eager: bool = False) -> dict:
    torch_device = torch.device(device)
    log(f"loading the model on {device} ({load_format})")
    start = time.perf_counter()
    runner = load_runner(str(checkpoint), None, device, "auto", max(DECODE_BATCHES), MAX_SEQ_LEN,
                         load_format=load_format)
    sync(torch_device)
    log(f"loaded in {time.perf_counter() - start:.1f}s")
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    repeats = 2 if tiny else 5
    out = {"vit_ms_per_tile": round(vit_ms_per_tile(runner, repeats), 3)}
    out["prefill_ms"] = {"1_tile": round(prefill_ms(runner, 1, repeats), 2),
                         "13_tiles": round(prefill_ms(runner, 13, repeats), 2)}
    log(f"vision {out['vit_ms_per_tile']} ms/tile, prefill {out['prefill_ms']}")
    out["decode_ms_per_token"] = {}
    for batch in DECODE_BATCHES:
        out["decode_ms_per_token"][str(batch)] = round(decode_ms(runner, batch, 16 if tiny else OUTPUT_TOKENS), 3)
        log(f"decode batch {batch}: {out['decode_ms_per_token'][str(batch)]} ms/step")
    out["batch_invariance"] = batch_invariance(runner)
    log(f"batch invariance {out['batch_invariance']:.2f}")
    extra["step_consistency"] = step_consistency(runner)
    log(f"prefill N+1 vs prefill N + one step: {extra['step_consistency']}")
    if compare_eager and runner.forward.graphs is not None:  # what the graphs save
        graphs, runner.forward.graphs = runner.forward.graphs, None
        extra["decode_ms_per_token_eager"] = {str(b): round(decode_ms(runner, b, 32), 3) for b in (1, 64)}
        runner.forward.graphs = graphs
        log(f"eager decode: {extra['decode_ms_per_token_eager']}")
    out["peak_memory_gb"] = (round(torch.cuda.max_memory_allocated(torch_device) / 1e9, 2)
                             if torch_device.type == "cuda" else None)
    del runner
    gc.collect()  # the runner and its graphs refer to each other: only the collector frees them
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()
        log(f"GPU memory still allocated here: {torch.cuda.memory_allocated(torch_device) / 1e9:.2f} GB")
    return out


# ---- over HTTP -----------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, device: str, load_format: str, log_path: Path, timeout: float) -> tuple:
    port = free_port()
    env = {**os.environ, "MODEL_ID": str(checkpoint), "LOAD_FORMAT": load_format, "DEVICE": device,
           "NIM_REQUIRE_AUTH": "0", "MAX_BATCH_SIZE": str(max(CONCURRENCY)), "MAX_QUEUED_REQUESTS": "1024",
           "MAX_MODEL_LEN": str(MAX_SEQ_LEN), "REQUEST_TIMEOUT": "900", "HOST": "127.0.0.1", "PORT": str(port),
           "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "server.py"], cwd=ROOT, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not ready after {timeout:.0f}s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def over_http(checkpoint: Path, device: str, load_format: str, out_dir: Path, tiny: bool,
              deadline: float) -> tuple[dict, dict]:
    log("starting python server.py on the same model")
    started = time.perf_counter()
    proc, url = start_server(checkpoint, device, load_format, out_dir / "server.log", 600)
    log(f"server ready in {time.perf_counter() - started:.1f}s")
    rates, details = {}, {}
    try:
        for tiles, concurrency in HTTP_LEVELS:
            key = f"{tiles}tile_{OUTPUT_TOKENS}tok_c{concurrency}"
            if time.monotonic() > deadline:
                log(f"{key}: skipped, out of time (--budget)")
                continue
            n = (4 if tiles == 1 else 2) if tiny else 2 * concurrency  # tiny: a smoke run of the same path
            args = parse_args(["--url", url, "--max-tokens", str(OUTPUT_TOKENS), "--ignore-eos", "--size",
                               IMAGE_SIZES[tiles], "--requests", str(n), "--warmup", "0"])
            images = {i: make_image(i, *args.size, args.kinds, args.seed, args.max_num_tiles) for i in range(n + 2)}
            assert {im.tiles for im in images.values()} == {tiles}, "image size does not give the tile count"
            run_level(2, Plan([n, n + 1], [False, False]), images, args, {})  # warm-up
            result = run_level(concurrency, Plan(list(range(n)), [False] * n), images, args, {})
            rates[key] = round(result.captions_per_s, 3) if result.ok == result.requests else None
            details[key] = {"requests": result.requests, "ok": result.ok, "errors": result.errors,
                            "wall_s": round(result.wall_s, 2), "latency_ms": result.latency_ms,
                            "output_tokens_per_s": round(result.output_tokens_per_s, 1)}
            log(f"{key}: {result.captions_per_s:.2f} captions/s ({result.ok}/{result.requests} ok, "
                f"errors {result.errors or 0})")
    finally:
        stop_server(proc)
    return rates, details


# ---- report --------------------------------------------------------------------------------------------

def share(measured: float | None, bound: float, higher_is_better: bool) -> str:
    if not measured:
        return "n/a"
    return f"{(measured / bound if higher_is_better else bound / measured) * 100:.0f}%"


def markdown(results: dict) -> str:
    roof = results["roofline"]
    lines = [f"# GPU benchmark: {results['device']}, commit {results['commit']}, {results['date']}", "",
             "Random bf16 weights in the full-size architecture (LOAD_FORMAT=dummy); decode and prefill in-process, "
             f"captions/s through `python server.py` over HTTP ({OUTPUT_TOKENS}-token captions, EOS ignored). "
             f"Roofline: bench/roofline.py for {roof['device']}.", "",
             "| figure | measured | roofline bound | share of roofline |", "|---|---:|---:|---:|"]
    for batch, value in results["decode_ms_per_token"].items():
        bound = roof["decode_ms_per_token"][batch]
        lines.append(f"| decode ms/token, batch {batch} | {value} | {bound} | {share(value, bound, False)} |")
    for key, value in results["prefill_ms"].items():
        bound = roof["prefill_ms"][key]
        lines.append(f"| prefill ms, {key.replace('_', ' ')} | {value} | {bound} | {share(value, bound, False)} |")
    lines.append(f"| vision encoder ms/tile | {results['vit_ms_per_tile']} | {roof['vit_ms_per_tile']} | "
                 f"{share(results['vit_ms_per_tile'], roof['vit_ms_per_tile'], False)} |")
    for key, bound in roof["captions_per_s"].items():
        value = results["captions_per_s"].get(key)
        lines.append(f"| captions/s, {key} | {value} | {bound} | {share(value, bound, True)} |")
    lines.append(f"| peak GPU memory GB (in-process part) | {results['peak_memory_gb']} | "
                 f"{roof['peak_memory_gb']} (13 tiles, c64) | |")
    lines.append(f"| batch invariance (first 32 greedy tokens, alone vs batch of 16) | "
                 f"{results['batch_invariance']:.2f} | 1.00 | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU (the test suite's run)")
    p.add_argument("--skip-http", action="store_true", help="in-process figures only")
    p.add_argument("--compare-eager", action="store_true", help="also time decoding without CUDA graphs")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: HTTP levels that would start after this are skipped (a lease's time limit)")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget if args.budget else float("inf")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible: run with --tiny on a CPU")
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    if args.tiny:
        checkpoint, device, load_format = write_tiny_checkpoint(work / "tiny"), "cpu", "safetensors"
        name = "cpu (tiny random checkpoint)"
    else:
        checkpoint, device, load_format = write_dummy_checkpoint(work / "full"), "cuda", "dummy"
        name = torch.cuda.get_device_name(0)
    # A copy of the tree on another machine may carry stale git metadata: BENCH_COMMIT names the commit sent.
    results = {"device": name, "commit": os.environ.get("BENCH_COMMIT") or git_commit(),
               "date": date.today().isoformat()}
    extra: dict = {"date": results["date"]}
    results.update(in_process(checkpoint, device, load_format, args.tiny, extra, args.compare_eager))
    results["captions_per_s"], results["roofline"] = {}, figures()
    save(args.out, results, extra)  # the in-process figures survive a failure over HTTP
    if not args.skip_http:
        results["captions_per_s"], extra["http"] = over_http(checkpoint, device, load_format, args.out, args.tiny,
                                                                    deadline)
        save(args.out, results, extra)
    print(markdown(results))
    return 0


def save(out: Path, results: dict, extra: dict) -> None:
    ordered = {k: results[k] for k in ("device", "commit", "decode_ms_per_token", "prefill_ms", "vit_ms_per_tile",
                                       "captions_per_s", "peak_memory_gb", "batch_invariance", "roofline")}
    (out / "results.json").write_text(json.dumps(ordered, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    (out / "extra.json").write_text(json.dumps(extra, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
