"""The whole GPU benchmark in one command: `python -m bench.gpu [--out DIR]` (`--tiny` on a CPU).

In this order, each phase logged with a timestamp and the results rewritten after each (a run cut short
still leaves its figures):
1. the card: its name picks the roofline (bench/roofline.py, spec-sheet bandwidth and dense bf16 FLOP/s),
   and the run measures its device-to-device bandwidth (a 1 GiB copy, read + write counted) and its bf16
   GEMM TFLOP/s (8192^3); an unknown card is scored against what was measured;
2. the full-size architecture with random bf16 weights built on the GPU (LOAD_FORMAT=dummy), with a
   tokenizer that covers all 131,072 ids of the head (bench/dummy.py), so every generated token decodes
   to text;
3. in-process: the vision encoder per tile; prefill of one 1-tile and one 13-tile request alone (vision
   encoder, every chunk, first token); one engine step in which 1, 4 or 7 one-tile requests join, and
   the first 2,048-token step of a 13-tile prompt (the batched prefill); the engine step while 1, 16 or
   64 sequences decode, with 1-tile and 13-tile contexts, greedy and at temperature 1.0; a profile of
   one eager decode step at batch 64 and of one 7-request prefill step (top kernels, kernels per step,
   SDPA backend per attention shape); batch invariance; peak GPU memory (graph capture included);
4. over HTTP: `python server.py` on the same model with STEP_LOG set, then a closed loop of 64 clients
   per level (1-tile and 13-tile images, 128-token captions, temperature 1.0, EOS ignored): a warm-up,
   then answers counted in a measured window; each level has a wall-clock budget. The step log is
   summarised per level (absent: said so, and the run goes on).
Optional pieces (the measured bandwidth and GEMM, the profiles, the step log) fail soft: the error is
logged and recorded under `errors`, and the run continues.

It writes into DIR (default bench/results/<card>, e.g. bench/results/h200): results.json, results.md
(each figure against the card's own bound), extra.json (profiles, HTTP and step-log details, phase
times), server.log and steps.jsonl. `--tiny` runs the same code on the CPU with the tiny checkpoint.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # the run's budget counts from here, imports included

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import requests
import torch

from bench.dummy import write_dummy_checkpoint
from bench.http_loop import Limits, closed_loop
from bench.images import make_image
from bench.profiling import profile_step
from bench.roofline import GPU, card, figures, weights_floor_ms
from bench.run import build_body, git_commit, parse_args
from bench.steps import read_steps, summarize_steps
from engine.llm_engine import LLMEngine
from engine.request import EngineRequest, ImagePart, Message, SamplingParams, TextPart
from model.engine import random_image
from model.runner import NemotronRunner, load_runner
from model.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DECODE_BATCHES = (1, 16, 64)
PREFILL_JOINING = (1, 4, 7)  # one-tile requests joining in one step
JOIN_BUDGET = 4096  # prompt tokens of such a step: room for 7 whole one-tile prompts (~300 tokens each)
IMAGE_SIZES = {1: "512x512", 13: "640x480"}  # image sizes that give these tile counts
TILE_TOKENS = 256
OUTPUT_TOKENS = 128
MAX_SEQ_LEN = 8192
MAX_PREFILL_TOKENS = 2048
BATCH = 64  # the server's MAX_BATCH_SIZE and the HTTP concurrency
# (tiles, warm-up cap s, window cap s, drain cap s): the targets; 1 tile first, since its requests drain
# quickly; the last level is not drained (the server stops).
HTTP_LEVELS = ((1, 20.0, 30.0, 15.0), (13, 40.0, 60.0, 0.0))
TOTAL_BUDGET_S = 330.0  # the whole run, install excluded; HTTP levels shrink to fit in it
RESULT_KEYS = ("device", "commit", "date", "quantization", "measured_bandwidth_tb_s", "measured_gemm_tflops",
               "decode_ms_per_token", "decode_ms", "prefill_ms", "prefill_step_ms", "vit_ms_per_tile",
               "captions_per_s", "peak_memory_gb", "memory_after_load_gb", "batch_invariance", "kernels_per_step",
               "step_log", "errors", "roofline")


def log(message: str) -> None:
    print(f"[bench.gpu {time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:5.0f}s] {message}", file=sys.stderr,
          flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the run's record ---------------------------------------------------------------------------------

class Run:
    """Results, extra details and errors, saved to DIR after every phase."""

    def __init__(self, out: Path, device_name: str, commit: str, tiny: bool):
        self.out, self.tiny = out, tiny
        self.results: dict = {k: None for k in RESULT_KEYS}
        self.results.update({"device": device_name, "commit": commit, "date": date.today().isoformat(),
                             "quantization": "bf16" if not tiny else "float32 (tiny, CPU)", "decode_ms": {},
                             "decode_ms_per_token": {}, "prefill_ms": {}, "prefill_step_ms": {},
                             "captions_per_s": {}, "kernels_per_step": {}, "errors": {}})
        self.extra: dict = {"date": self.results["date"], "phases_s": {}}
        self.gpu: GPU = card(device_name)

    @contextlib.contextmanager
    def phase(self, name: str):
        log(f"{name}: start")
        started = time.monotonic()
        try:
            yield
        finally:
            self.extra["phases_s"][name] = round(time.monotonic() - started, 1)
            log(f"{name}: {self.extra['phases_s'][name]}s")
            self.save()

    def soft(self, name: str, fn, default=None):
        """fn(), or `default` with the error logged and recorded (an optional piece must not stop the run)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
            message = f"{type(exc).__name__}: {exc}"[:500]
            log(f"{name} failed: {message}")
            self.results["errors"][name] = message
            return default

    @property
    def quantization(self) -> str:
        """"bf16" or "fp8": the weights whose roofline applies (the tiny run's float32 is scored against none)."""
        return "fp8" if self.results["quantization"] == "fp8" else "bf16"

    def set_card(self, measured_bandwidth: float | None, measured_flops: float | None) -> None:
        self.gpu = card(self.results["device"], measured_bandwidth, measured_flops)
        self.results["roofline"] = figures(gpu=self.gpu, quantization=self.quantization)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.results["roofline"] is None:
            self.results["roofline"] = figures(gpu=self.gpu, quantization=self.quantization)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown(self.results, self.extra))
        (self.out / "extra.json").write_text(json.dumps(self.extra, indent=2) + "\n")


# ---- the card ------------------------------------------------------------------------------------------

def measure_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes/s of a device-to-device copy, read and write both counted."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * nbytes * repeats / seconds


def measure_gemm(device: torch.device, n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n matmul in bf16 (float32 on a CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


# ---- requests ------------------------------------------------------------------------------------------

def caption_request(request_id: str, tiles: int, seed: int, max_tokens: int, temperature: float = 0.0,
                    ignore_eos: bool = True) -> EngineRequest:
    user = Message("user", [ImagePart(random_image(tiles, seed)), TextPart("Caption the content of this image:")])
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                            min_tokens=max_tokens if ignore_eos else 0, ignore_eos=ignore_eos)
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
    engine = LLMEngine(runner, 1, MAX_PREFILL_TOKENS)
    times = []
    for i in range(repeats + 1):
        sync(runner.device)
        start = time.perf_counter()
        run_all(engine, [caption_request(f"p{tiles}-{i}", tiles, i, 1)])
        sync(runner.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def first_step_ms(runner: NemotronRunner, requests_: list[EngineRequest], profile: bool = False,
                  budget: int = MAX_PREFILL_TOKENS):
    """Time (and optionally profile) the first engine step of requests that all join at once (a step of at
    most `budget` prompt tokens); then drop them."""
    engine = LLMEngine(runner, max(len(requests_), 1), budget)
    for request in requests_:
        engine.add_request(request)
    sync(runner.device)
    start = time.perf_counter()
    prof = profile_step(engine.step, runner.device) if profile else engine.step()
    sync(runner.device)
    seconds = time.perf_counter() - start
    tokens = engine.stats.prefill_tokens
    for request in requests_:
        engine.abort(request.request_id)
    return seconds * 1e3, tokens, (prof if profile else None)


def prefill_steps(run: Run, runner: NemotronRunner, repeats: int) -> None:
    """The batched prefill: n one-tile requests joining in one step, and the first step of a 13-tile prompt."""
    out, tokens_per_s = run.results["prefill_step_ms"], {}
    for n in PREFILL_JOINING:
        times, tokens = [], 0
        for i in range(repeats + 1):
            ms, tokens, _ = first_step_ms(runner, [caption_request(f"j{n}-{i}-{k}", 1, 300 + k, 1) for k in range(n)],
                                          budget=JOIN_BUDGET)
            times.append(ms)
        out[f"{n}x1_tile"] = round(statistics.median(times[1:]), 2)
        tokens_per_s[f"{n}x1_tile"] = round(tokens / (out[f"{n}x1_tile"] / 1e3))
        run.extra.setdefault("prefill_step_tokens", {})[f"{n}x1_tile"] = tokens
    times = []
    for i in range(repeats + 1):
        ms, tokens, _ = first_step_ms(runner, [caption_request(f"c13-{i}", 13, 400 + i, 1)])
        times.append(ms)
    out["13_tiles_first_2048"] = round(statistics.median(times[1:]), 2)
    run.extra.setdefault("prefill_step_tokens", {})["13_tiles_first_2048"] = tokens
    tokens_per_s["13_tiles_first_2048"] = round(tokens / (out["13_tiles_first_2048"] / 1e3))
    run.extra["prefill_step_tokens_per_s"] = tokens_per_s
    log(f"prefill steps (ms): {out}; prompt tokens/s: {tokens_per_s}")


def steady_decode(engine: LLMEngine, batch: int, limit: int = 100_000) -> None:
    """Step until a step ran `batch` decoding rows and no prefill."""
    for _ in range(limit):
        engine.step()
        if engine.stats.prefill_tokens == 0 and engine.stats.decode_rows == batch:
            return
    raise RuntimeError(f"never reached {batch} decoding rows")


def timed_steps(engine: LLMEngine, device: torch.device, batch: int, steps: int) -> float:
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        engine.step()
        sync(device)
        if engine.stats.prefill_tokens == 0 and engine.stats.decode_rows == batch:
            times.append(time.perf_counter() - start)
    if len(times) < 3:
        raise RuntimeError(f"only {len(times)} steps with {batch} decoding rows")
    return round(statistics.median(times[2:]) * 1e3, 3)


def grow_contexts(runner: NemotronRunner, slots: range, tokens: int) -> None:
    """Make each decoding slot's context `tokens` longer, as if its prompt had 12 more tiles: attention then
    reads that much more KV per step (zeros beyond the real prompt: the same bytes a real one would read)."""
    lengths = runner.pool.lengths
    if min(lengths[s] for s in slots) <= 0:
        raise RuntimeError("the decoding slots are not where expected (slots 0..batch-1)")
    for s in slots:
        lengths[s] += tokens


def eager_profile(run: Run, name: str, runner: NemotronRunner, engine: LLMEngine) -> dict | None:
    """One decode step without CUDA graphs, profiled (after one eager warm-up step)."""
    def go():
        graphs, runner.forward.graphs = runner.forward.graphs, None
        try:
            engine.step()  # warm-up of the eager path at this shape
            return profile_step(engine.step, runner.device)
        finally:
            runner.forward.graphs = graphs
    return run.soft(name, go)


def decode_run(run: Run, runner: NemotronRunner, batch: int, temperature: float, steps: int) -> dict:
    """Median engine step while `batch` sequences decode, with 1-tile and then 13-tile contexts."""
    engine = LLMEngine(runner, batch, MAX_PREFILL_TOKENS)
    label = "greedy" if temperature == 0.0 else f"t{temperature:g}"
    requests_ = [caption_request(f"d{batch}-{label}-{i}", 1, 100 + i, 2 * steps + 40, temperature)
                 for i in range(batch)]
    for request in requests_:
        engine.add_request(request)
    out: dict = {}
    try:
        steady_decode(engine, batch)
        out["1_tile"] = timed_steps(engine, runner.device, batch, steps)
        profile = batch == max(DECODE_BATCHES) and temperature != 0.0
        if profile:
            run.extra.setdefault("profile", {})["decode_b64_1_tile_eager"] = eager_profile(
                run, "profile decode batch 64", runner, engine)
        grown = run.soft(f"13-tile context (batch {batch}, {label})",
                         lambda: grow_contexts(runner, range(batch), 12 * TILE_TOKENS) or True, False)
        if grown:
            out["13_tiles"] = timed_steps(engine, runner.device, batch, steps)
            if profile:
                run.extra["profile"]["decode_b64_13_tiles_eager"] = eager_profile(
                    run, "profile decode batch 64, 13 tiles", runner, engine)
    finally:
        for request in requests_:
            engine.abort(request.request_id)
    return out


def decode_all(run: Run, runner: NemotronRunner, steps: int) -> None:
    decode = run.results["decode_ms"]
    for temperature, label in ((0.0, "greedy"), (1.0, "t1")):
        for batch in DECODE_BATCHES:
            got = run.soft(f"decode batch {batch} {label}", lambda: decode_run(run, runner, batch, temperature, steps),
                           {})
            for context, ms in got.items():
                decode.setdefault(f"{context}_{label}", {})[str(batch)] = ms
            if temperature == 0.0 and "1_tile" in got:
                run.results["decode_ms_per_token"][str(batch)] = got["1_tile"]
            log(f"decode batch {batch} {label}: {got} ms/step")
            run.save()


def batch_invariance(runner: NemotronRunner, n: int = 16, tokens: int = 32) -> float:
    engine = LLMEngine(runner, n, MAX_PREFILL_TOKENS)
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


def kernels_per_step(run: Run) -> None:
    profiles = run.extra.get("profile") or {}
    counts = {name: (p or {}).get("kernels") for name, p in profiles.items()}
    run.results["kernels_per_step"] = {k: v for k, v in counts.items() if v is not None} or None
    backends = {}
    for name, p in profiles.items():
        for shape, chosen in ((p or {}).get("sdpa_backends") or {}).items():
            backends[f"{name}: {shape}"] = chosen
    run.extra["sdpa_backends"] = backends


def in_process(run: Run, checkpoint: Path, device: str, load_format: str, compare_eager: bool,
               quantization: str = "bf16") -> None:
    torch_device = torch.device(device)
    tiny = run.tiny
    with run.phase("card"):
        big = torch_device.type == "cuda"
        bandwidth = run.soft("measured bandwidth", lambda: measure_bandwidth(
            torch_device, (1 << 30) if big else (1 << 24), 20 if big else 3))
        flops = run.soft("measured GEMM", lambda: measure_gemm(torch_device, 8192 if big else 256, 10 if big else 2))
        run.results["measured_bandwidth_tb_s"] = round(bandwidth / 1e12, 3) if bandwidth else None
        run.results["measured_gemm_tflops"] = round(flops / 1e12, 3) if flops else None
        run.set_card(bandwidth, flops)
        log(f"{run.results['device']}: roofline of {run.gpu.name} ({run.gpu.bandwidth / 1e12:.2f} TB/s, "
            f"{run.gpu.bf16_flops / 1e12:.0f} TFLOP/s); measured {run.results['measured_bandwidth_tb_s']} TB/s, "
            f"{run.results['measured_gemm_tflops']} TFLOP/s")
        if bandwidth:
            run.extra["decode_floor_ms_at_measured_bandwidth"] = round(weights_floor_ms(bandwidth, run.quantization), 3)
    with run.phase("load"):
        if big:
            torch.cuda.reset_peak_memory_stats(torch_device)
        runner = load_runner(str(checkpoint), None, device, "auto", max(DECODE_BATCHES), MAX_SEQ_LEN,
                             load_format=load_format, quantization="auto" if quantization == "bf16" else quantization)
        sync(torch_device)
        if big:  # weights, slot pool and the captured graphs; the peak is never reset after this
            run.results["memory_after_load_gb"] = round(torch.cuda.memory_allocated(torch_device) / 1e9, 2)
            run.extra["peak_memory_gb_during_load"] = round(torch.cuda.max_memory_allocated(torch_device) / 1e9, 2)
        run.extra["vocab"] = {"tokenizer": len(runner.tokenizer),
                              "head": int(runner.model.language_model.lm_head.weight.shape[0])}
    repeats = 1 if tiny else 5
    with run.phase("prefill alone"):
        run.results["vit_ms_per_tile"] = run.soft("vision encoder", lambda: round(vit_ms_per_tile(runner, repeats), 3))
        for key, tiles in (("1_tile", 1), ("13_tiles", 13)):
            run.results["prefill_ms"][key] = run.soft(f"prefill {key}", lambda: round(prefill_ms(runner, tiles,
                                                                                                   repeats), 2))
        log(f"vision {run.results['vit_ms_per_tile']} ms/tile, prefill alone {run.results['prefill_ms']} ms")
    with run.phase("prefill steps"):
        run.soft("prefill steps", lambda: prefill_steps(run, runner, 1 if tiny else 3))
        run.extra.setdefault("profile", {})["prefill_7x1_tile"] = run.soft("profile prefill step", lambda: first_step_ms(
            runner, [caption_request(f"prof-{k}", 1, 600 + k, 1) for k in range(7)], profile=True,
            budget=JOIN_BUDGET)[2])
    with run.phase("decode"):
        decode_all(run, runner, 8 if tiny else 48)
        kernels_per_step(run)
    with run.phase("checks"):
        run.results["batch_invariance"] = run.soft("batch invariance", lambda: batch_invariance(
            runner, *((4, 8) if tiny else (16, 32))))
        run.extra["step_consistency"] = run.soft("step consistency", lambda: step_consistency(runner))
        log(f"batch invariance {run.results['batch_invariance']}, prefill N+1 vs N + one step: "
            f"{run.extra['step_consistency']}")
        if compare_eager and runner.forward.graphs is not None:  # what the graphs save
            def eager() -> dict:
                graphs, runner.forward.graphs = runner.forward.graphs, None
                try:
                    return {str(b): decode_run(run, runner, b, 0.0, 16)["1_tile"] for b in (1, 64)}
                finally:
                    runner.forward.graphs = graphs
            run.extra["decode_ms_per_token_eager"] = run.soft("eager decode", eager)
    if big:
        run.results["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(torch_device) / 1e9, 2)
    del runner
    gc.collect()  # the runner and its graphs refer to each other: only the collector frees them
    if big:
        torch.cuda.empty_cache()
        log(f"GPU memory still allocated here: {torch.cuda.memory_allocated(torch_device) / 1e9:.2f} GB")


# ---- over HTTP -----------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, device: str, load_format: str, log_path: Path, step_log: Path,
                 timeout: float, quantization: str = "bf16") -> tuple:
    port = free_port()
    env = {**os.environ, "MODEL_ID": str(checkpoint), "LOAD_FORMAT": load_format, "DEVICE": device,
           "NIM_REQUIRE_AUTH": "0", "MAX_BATCH_SIZE": str(BATCH), "MAX_QUEUED_REQUESTS": "1024",
           "MAX_MODEL_LEN": str(MAX_SEQ_LEN), "REQUEST_TIMEOUT": "900", "HOST": "127.0.0.1", "PORT": str(port),
           "PYTHONUNBUFFERED": "1", "STEP_LOG": str(step_log), "SHUTDOWN_GRACE_PERIOD": "1"}
    if quantization != "bf16":
        env["QUANTIZATION"] = quantization
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


def stop_server(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def level_limits(warmup_s: float, window_s: float, drain_s: float, concurrency: int, remaining: float,
                 reserve: float = 15.0) -> Limits | None:
    """The level's bounds, shrunk to the run's remaining time (less `reserve` for stopping and writing);
    None when not even a short level fits."""
    available = remaining - reserve
    if available < 10.0:
        return None
    scale = min(1.0, available / (warmup_s + window_s + drain_s))
    return Limits(warmup_s * scale, window_s * scale, 4 * concurrency, drain_s * scale)


def over_http(run: Run, checkpoint: Path, device: str, load_format: str, deadline: float,
              quantization: str = "bf16") -> None:
    tiny = run.tiny
    step_log = run.out / "steps.jsonl"
    step_log.unlink(missing_ok=True)
    concurrency = 2 if tiny else BATCH
    max_tokens = 8 if tiny else OUTPUT_TOKENS
    with run.phase("server start"):
        proc, url = start_server(checkpoint, device, load_format, run.out / "server.log", step_log,
                                 max(60.0, min(240.0, deadline - time.monotonic() - 30.0)), quantization)
    details = run.extra.setdefault("http", {})
    try:
        for tiles, warmup_s, window_s, drain_s in HTTP_LEVELS:
            key = f"{tiles}tile_{OUTPUT_TOKENS}tok_c{BATCH}"
            if tiny:  # a smoke run of the same path on a slow CPU: wait for a few answers
                warmup_s, window_s, drain_s = 20.0, 30.0, 10.0 if drain_s else 0.0
            limits = level_limits(warmup_s, window_s, drain_s, concurrency, deadline - time.monotonic())
            if limits is not None and tiny:
                limits.min_completions = concurrency
            if limits is None:
                log(f"{key}: skipped, out of time")
                run.results["errors"][f"http {key}"] = "skipped: out of time"
                continue
            with run.phase(f"http {key}"):
                args = parse_args(["--url", url, "--max-tokens", str(max_tokens), "--ignore-eos", "--size",
                                   IMAGE_SIZES[tiles], "--temperature", "1.0"])
                count = 8 if tiny else 32
                with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                    images = list(pool.map(lambda i: make_image(i, *args.size, args.kinds, args.seed,
                                                                args.max_num_tiles), range(count)))
                assert {im.tiles for im in images} == {tiles}, "image size does not give the tile count"
                bodies = [build_body(im, args) for im in images]  # --ignore-eos: exactly max_tokens each
                result = closed_loop(f"{url}/v1/chat/completions", bodies, concurrency, limits, log=log)
                result["limits"] = {"warmup_s": round(limits.warmup_s, 1), "window_s": round(limits.window_s, 1),
                                    "min_completions": limits.min_completions, "drain_s": round(limits.drain_s, 1)}
                result["max_tokens"] = max_tokens
                details[key] = result
                run.results["captions_per_s"][key] = result["captions_per_s"] if result["ok"] else None
                log(f"{key}: {result['captions_per_s']} captions/s ({result['ok']} ok in the window, errors "
                    f"{result['errors'] or 0})")
    finally:
        with run.phase("server stop"):
            stop_server(proc)
        summarize_step_log(run, step_log)


def summarize_step_log(run: Run, path: Path) -> None:
    def go() -> None:
        records = read_steps(path)
        if records is None:
            run.results["step_log"] = {"present": False,
                                       "note": "the service wrote no STEP_LOG file (feature absent in this commit)"}
            log("step log: none written (STEP_LOG not supported by this service)")
            return
        levels = {key: summarize_steps(records, *d["window_unix"])
                  for key, d in (run.extra.get("http") or {}).items() if d.get("window_unix")}
        run.results["step_log"] = {"present": True, "lines": len(records), "levels": levels}
        log(f"step log: {len(records)} steps; per level {levels}")
    run.soft("step log", go)
    cap_file(path)
    cap_file(run.out / "server.log")


def cap_file(path: Path, limit: int = 15 << 20) -> None:
    """Keep a file under `limit` bytes: its head and tail, with a note between."""
    with contextlib.suppress(OSError):
        if path.stat().st_size <= limit:
            return
        data = path.read_bytes()
        half = limit // 2 - 100
        path.write_bytes(data[:half] + b"\n[... cut to stay under the size limit ...]\n" + data[-half:])


# ---- report --------------------------------------------------------------------------------------------

def share(measured: float | None, bound: float | None, higher_is_better: bool) -> str:
    if not measured or not bound:
        return "n/a"
    return f"{(measured / bound if higher_is_better else bound / measured) * 100:.0f}%"


def _fmt(value) -> str:
    return "n/a" if value is None else str(value)


def markdown(results: dict, extra: dict | None = None) -> str:
    extra = extra or {}
    tiny = str(results.get("quantization") or "").startswith("float32 (tiny")
    # The tiny run is the code path on a CPU, not a measurement of anything: it is scored against nothing.
    roof = {} if tiny else (results["roofline"] or {})
    if tiny:
        lines = [f"# GPU benchmark, tiny run: {results['device']}, commit {results['commit']}, {results['date']}", "",
                 "The tiny random checkpoint (float32) on the CPU, through the same code as the GPU run: decode and "
                 "prefill in-process, then `python server.py` over HTTP with 2 clients and 8-token captions (the "
                 "level names keep the GPU run's). A check that the benchmark works, not a figure of the service: "
                 "no roofline applies.", "",
                 "| figure | measured | roofline bound | share of roofline |", "|---|---:|---:|---:|"]
    else:
        lines = [f"# GPU benchmark: {results['device']}, commit {results['commit']}, {results['date']}", "",
                 f"Random {results['quantization']} weights in the full-size architecture (LOAD_FORMAT=dummy), a "
                 "tokenizer that covers every id of the head; decode and prefill in-process, captions/s through "
                 f"`python server.py` over HTTP (closed loop of {BATCH} clients, answers counted in a window after a "
                 f"warm-up; {OUTPUT_TOKENS}-token captions, EOS ignored, temperature 1.0).", "",
                 f"Roofline: bench/roofline.py for **{roof.get('device')}** ({roof.get('bandwidth_tb_s')} TB/s, "
                 f"{roof.get('tflops')} TFLOP/s dense bf16"
                 + (f", {roof.get('fp8_tflops')} TFLOP/s dense FP8 for the FP8 linears, whose weights it counts at one "
                    "byte" if roof.get("quantization") == "fp8" else "")
                 + "). Measured on this card: device-to-device copy "
                 f"{_fmt(results['measured_bandwidth_tb_s'])} TB/s "
                 f"({share(results['measured_bandwidth_tb_s'], roof.get('bandwidth_tb_s'), True)} of the spec), "
                 f"bf16 GEMM 8192^3 {_fmt(results['measured_gemm_tflops'])} TFLOP/s "
                 f"({share(results['measured_gemm_tflops'], roof.get('tflops'), True)}).", "",
                 "| figure | measured | roofline bound | share of roofline |", "|---|---:|---:|---:|"]
    decode = results.get("decode_ms") or {}
    for key, label, bounds in (("1_tile_greedy", "1-tile context, greedy", "decode_ms_per_token"),
                               ("1_tile_t1", "1-tile context, temperature 1", "decode_ms_per_token"),
                               ("13_tiles_greedy", "13-tile context, greedy", "decode_ms_per_token_13_tiles"),
                               ("13_tiles_t1", "13-tile context, temperature 1", "decode_ms_per_token_13_tiles")):
        for batch, value in (decode.get(key) or {}).items():
            bound = (roof.get(bounds) or {}).get(batch)
            lines.append(f"| decode ms/step, batch {batch}, {label} | {value} | {bound} | "
                         f"{share(value, bound, False)} |")
    floor = extra.get("decode_floor_ms_at_measured_bandwidth")
    one = (results.get("decode_ms_per_token") or {}).get("1")
    if floor and one and not tiny:
        target = 1.5 if results.get("quantization") == "fp8" else 1.35
        lines.append(f"| decode batch 1 over the measured-bandwidth floor (target <= {target}x) | {one / floor:.2f}x | "
                     f"{floor} ms | {share(one, floor, False)} |")
    for key, value in (results.get("prefill_ms") or {}).items():
        bound = (roof.get("prefill_ms") or {}).get(key)
        lines.append(f"| prefill ms, {key.replace('_', ' ')} alone | {value} | {bound} | {share(value, bound, False)} |")
    tokens_per_s = extra.get("prefill_step_tokens_per_s") or {}
    for key, value in (results.get("prefill_step_ms") or {}).items():
        bound = (roof.get("prefill_step_ms") or {}).get(key)
        what = (f"first step of a 13-tile prompt (13 tiles + 2,048 tokens)" if key.startswith("13")
                else f"step of {key.split('x')[0]} one-tile requests joining")
        lines.append(f"| prefill ms, {what} ({_fmt(tokens_per_s.get(key))} prompt tokens/s) | {value} | {bound} | "
                     f"{share(value, bound, False)} |")
    lines.append(f"| vision encoder ms/tile | {_fmt(results['vit_ms_per_tile'])} | {roof.get('vit_ms_per_tile')} | "
                 f"{share(results['vit_ms_per_tile'], roof.get('vit_ms_per_tile'), False)} |")
    for key, value in (results.get("captions_per_s") or {}).items():
        bound = (roof.get("captions_per_s") or {}).get(key)
        lines.append(f"| captions/s, {key} (HTTP) | {_fmt(value)} | {bound} | {share(value, bound, True)} |")
    lines.append(f"| peak GPU memory GB, in-process part, graph capture included | {_fmt(results['peak_memory_gb'])} | "
                 f"{roof.get('peak_memory_gb')} (13 tiles, c64) | |")
    lines.append(f"| GPU memory GB after load (weights, 64-slot pool, graphs) | "
                 f"{_fmt(results.get('memory_after_load_gb'))} | | |")
    inv = results.get("batch_invariance")
    lines.append(f"| batch invariance (first 32 greedy tokens, alone vs batch of 16) | "
                 f"{'n/a' if inv is None else f'{inv:.2f}'} | 1.00 | |")
    lines += _profile_lines(extra.get("profile") or {}, results.get("kernels_per_step") or {})
    lines += _http_lines(extra.get("http") or {}, results.get("step_log"))
    if results.get("errors"):
        lines += ["", "## Pieces that failed (the run went on)", ""]
        lines += [f"- {name}: {message}" for name, message in results["errors"].items()]
    if extra.get("phases_s"):
        lines += ["", "Phase times (s): " + ", ".join(f"{k} {v}" for k, v in extra["phases_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def _profile_lines(profiles: dict, counts: dict) -> list[str]:
    if not profiles:
        return []
    lines = ["", "## Profile (torch.profiler, one step each)", ""]
    lines += ["| step | kernels (memcpy, memset) | GPU ms | SDPA backend per attention shape |", "|---|---:|---:|---|"]
    for name, p in profiles.items():
        if not p:
            lines.append(f"| {name} | failed | | |")
            continue
        backends = "; ".join(f"{shape}: {', '.join(f'{b} x{n}' for b, n in chosen.items())}"
                             for shape, chosen in (p.get("sdpa_backends") or {}).items()) or "-"
        lines.append(f"| {name} | {_fmt(p.get('kernels'))} ({p.get('memcpys')}, {p.get('memsets')}) | "
                     f"{p.get('total_ms')} | {backends} |")
    for name, p in profiles.items():
        if not p or not p.get("top"):
            continue
        lines += ["", f"Top {p['what']} of {name} by time:", "", "| name | calls | ms | share |", "|---|---:|---:|---:|"]
        lines += [f"| `{t['name'].replace('|', '/')}` | {t['calls']} | {t['ms']} | {t['share'] * 100:.0f}% |"
                  for t in p["top"][:10]]
    return lines


def _http_lines(http: dict, step_log: dict | None) -> list[str]:
    if not http and not step_log:
        return []
    lines = ["", "## Over HTTP", "",
             "| level | warm-up s (answers) | window s | ok in window | errors | captions/s | output tok/s | "
             "p50 / p95 latency ms | still out after drain |", "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for key, d in http.items():
        lat = d.get("latency_ms") or {}
        lines.append(f"| {key} | {d.get('warmup_s')} ({d.get('warmup_answers')}) | {d.get('window_s')} | {d.get('ok')} | "
                     f"{d.get('errors') or '-'} | {d.get('captions_per_s')} | {d.get('output_tokens_per_s')} | "
                     f"{round(lat.get('p50', 0))} / {round(lat.get('p95', 0))} | {d.get('still_out_after_drain')} |")
    lines += ["", "Engine steps during each measured window (the service's STEP_LOG):", ""]
    if not step_log or not step_log.get("present"):
        lines.append(f"- not available: {(step_log or {}).get('note', 'no summary')}")
        return lines
    lines += ["| level | steps | mean decode rows | steps with prefill | gpu_ms mean / p50 / p90 | "
              "host_ms mean / p50 / p90 | host share of wall |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, s in (step_log.get("levels") or {}).items():
        g, h = s.get("gpu_ms") or {}, s.get("host_ms") or {}
        lines.append(f"| {key} | {s['steps']} | {_fmt(s['mean_decode_rows'])} | {_fmt(s['share_with_prefill'])} | "
                     f"{_fmt(g.get('mean'))} / {_fmt(g.get('p50'))} / {_fmt(g.get('p90'))} | "
                     f"{_fmt(h.get('mean'))} / {_fmt(h.get('p50'))} / {_fmt(h.get('p90'))} | "
                     f"{_fmt(s['host_share_of_wall'])} |")
    return lines


# ---- main ----------------------------------------------------------------------------------------------

def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds through the finally blocks: the server stops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/<card>)")
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU (the test suite's run)")
    p.add_argument("--skip-http", action="store_true", help="in-process figures only")
    p.add_argument("--compare-eager", action="store_true", help="also time decoding without CUDA graphs")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run (default {TOTAL_BUDGET_S:.0f} on a GPU): HTTP levels shrink or are "
                        "skipped to end within it")
    p.add_argument("--quantization", choices=("bf16", "fp8"), default="bf16",
                   help="fp8: random FP8 weights with per-tensor scales in the language model's linears (W8A8 from "
                        "compute capability 8.9), scored against the roofline of FP8 linears; results in "
                        "bench/results/<card>/fp8 by default")
    args = p.parse_args(argv)
    if args.tiny and args.quantization != "bf16":
        p.error("--quantization is for the full-size model on a GPU")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    deadline = _T0 + (args.budget or (float("inf") if args.tiny else TOTAL_BUDGET_S))
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible: run with --tiny on a CPU")
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    if args.tiny:
        checkpoint, device, load_format = write_tiny_checkpoint(work / "tiny"), "cpu", "safetensors"
        name = "cpu (tiny random checkpoint)"
    else:
        checkpoint, device, load_format = write_dummy_checkpoint(work / "full"), "cuda", "dummy"
        name = torch.cuda.get_device_name(0)
    default_out = ROOT / "bench" / "results" / card(name).slug
    out = (args.out or (default_out / "fp8" if args.quantization == "fp8" else default_out)).resolve()
    # A copy of the tree on another machine may carry stale git metadata: BENCH_COMMIT names the commit sent.
    run = Run(out, name, os.environ.get("BENCH_COMMIT") or git_commit(), args.tiny)
    if not args.tiny:
        run.results["quantization"] = args.quantization
    log(f"{name}: results in {out}")
    run.save()
    try:
        in_process(run, checkpoint, device, load_format, args.compare_eager, args.quantization)
        if not args.skip_http:  # a server that does not start costs the HTTP figures, not the others
            run.soft("http", lambda: over_http(run, checkpoint, device, load_format, deadline, args.quantization))
    finally:
        run.save()
    print(markdown(run.results, run.extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
