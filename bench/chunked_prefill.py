"""What chunked prefill costs and saves: `python -m bench.chunked_prefill [--tiny] [--out FILE]`.

Four sequences decode; then one 13-tile request (3,375 prompt tokens) joins. For each
MAX_PREFILL_TOKENS budget this reports the longest engine step while the prompt is read (how long
the running captions stall), the joining request's time to its first token, and the running
sequences' mean step time over the whole run. In-process, on the engine, with the tiny checkpoint on
a CPU (`--tiny`) or the full-size random-weight model on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu import caption_request, sync, write_dummy_checkpoint
from engine.llm_engine import LLMEngine
from model.runner import load_runner
from model.tiny import write_tiny_checkpoint

BUDGETS = (256, 512, 1024, 2048, 4096)


def measure(runner, budget: int) -> dict:
    engine = LLMEngine(runner, 5, budget)
    for i in range(4):
        engine.add_request(caption_request(f"run{i}", 1, i, 400))
    while engine.stats.decode_rows < 4 or engine.stats.prefill_tokens:
        engine.step()
    engine.add_request(caption_request("joiner", 13, 99, 1))
    steps, joined_at, first_token = [], time.perf_counter(), None
    while first_token is None:
        sync(runner.device)
        start = time.perf_counter()
        outputs = engine.step()
        sync(runner.device)
        steps.append(time.perf_counter() - start)
        if any(o.request_id == "joiner" for o in outputs):
            first_token = time.perf_counter() - joined_at
    for request_id in [f"run{i}" for i in range(4)]:
        engine.abort(request_id)
    return {"max_prefill_tokens": budget, "steps_to_first_token": len(steps),
            "longest_step_ms": round(max(steps) * 1e3, 1), "mean_step_ms": round(statistics.mean(steps) * 1e3, 1),
            "joiner_ttft_ms": round(first_token * 1e3, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-chunks-"))
    if args.tiny:
        runner = load_runner(str(write_tiny_checkpoint(work / "tiny")), None, "cpu", "auto", 5, 8192)
    else:
        runner = load_runner(str(write_dummy_checkpoint(work / "full")), None, "cuda", "auto", 5, 8192,
                             load_format="dummy")
    measure(runner, 2048)  # warm-up
    rows = [measure(runner, budget) for budget in BUDGETS]
    device = "cpu (tiny checkpoint)" if args.tiny else torch.cuda.get_device_name(0)
    print(f"device: {device}\n")
    print("| MAX_PREFILL_TOKENS | steps to first token | longest step ms | mean step ms | joiner TTFT ms |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['max_prefill_tokens']} | {r['steps_to_first_token']} | {r['longest_step_ms']} | "
              f"{r['mean_step_ms']} | {r['joiner_ttft_ms']} |")
    if args.out:
        args.out.write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
