"""Kernel launches per engine step, counted on the CPU: `python -m bench.ops --out DIR` (writes DIR/ops.json).

The model is the official architecture at full depth (62 language-model layers in the official hybrid
pattern, 32 ViT layers, 1,024 patches per tile) with small widths (and a Mamba chunk of 32 tokens), so a count takes
seconds on a CPU and launch work can be tracked between GPU runs. Every ATen op that is not a view or a
metadata op (empty, detach, alias, sizes...) counts as one kernel, read with a TorchDispatchMode after
composite ops are decomposed (so `.to()` counts only when it copies, `linear` as its one GEMM); each
Triton kernel launch counts as one, and so that the count follows the GPU's choice, the model code's
"use Triton?" question (model/kernels/backend.py) answers yes and Triton launches are counted without
running (outputs then hold garbage, which the counts do not depend on). Where Triton is not installed,
its kernels are counted as their PyTorch fallbacks.

Counted per measured engine step, by part: `vision` (the tiles through the ViT and projector),
`prefill` (the language model over the prompt chunks), `decode` (one decoding step of the language
model: what the CUDA graph holds on a GPU), `sample` (the sampler) and `engine` (the rest of the step).
Host reads (`.item()`, `.tolist()`) and tensors made from host lists are counted apart: on a GPU they are
copies and syncs, not kernels. On a GPU, SDPA's backend may differ from the CPU's (one fused kernel here;
the math fallback would be several), and the decode graph adds three input copies per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.llm_engine import LLMEngine
from engine.request import EngineRequest, ImagePart, Message, SamplingParams, TextPart
from model.config import translate_config
from model.engine import random_image
from model.loader import build_random_model
from model.official import HYBRID_PATTERN
from model.runner import NemotronRunner
from model.tiny import build_tokenizer, tiny_official_config

# ATen ops that launch nothing on a GPU (allocation, aliasing, metadata).
NO_KERNEL = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "detach_", "alias",
    "resize_", "set_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_unsafe_view",
    "_reshape_alias", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream", "is_pinned",
    "_nested_tensor_from_mask_left_aligned", "result_type", "_fused_sdp_choice",
})
HOST_READS = frozenset({"_local_scalar_dense", "item", "equal"})
HOST_COPIES = frozenset({"lift_fresh", "lift_fresh_copy"})
JOIN_BUDGET = 4096


def small_config(vocab_size: int, img_context_token_id: int) -> dict:
    """The official config.json at full depth (62 layers, 32 ViT layers) with small widths. The scan's op
    count does not depend on the chunk size (no loop over chunks); a smaller chunk makes the 64 short
    prompts that precede the batch-64 count cheap on a CPU."""
    return tiny_official_config(vocab_size, img_context_token_id, HYBRID_PATTERN, vit_depth=None, chunk_size=32)


class OpCounter(TorchDispatchMode):
    """Counts, per part of the step, the ATen ops that launch a kernel (and, apart, host reads and copies)."""

    def __init__(self):
        super().__init__()
        self.part = "engine"
        self.active = False
        self.kernels: Counter = Counter()  # (part, op name) -> calls
        self.host: Counter = Counter()  # "reads" / "copies" -> calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Inside inference mode an op reaches this mode before its composite decomposition: decompose it here,
        # so that what is counted is what runs (`to` is a copy only when the dtype changes, linear is one mm).
        if func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:  # the parts come back through this mode
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        if self.active:
            name = func.overloadpacket.__name__
            if name in HOST_READS:
                self.host["reads"] += 1
            elif name in HOST_COPIES:
                self.host["copies"] += 1
            elif not (func.is_view or name in NO_KERNEL):
                self.kernels[(self.part, name)] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def counting(self):
        self.kernels.clear()
        self.host.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def in_part(self, part: str, fn):
        def wrapped(*args, **kwargs):
            outer, self.part = self.part, part
            try:
                return fn(*args, **kwargs)
            finally:
                self.part = outer
        return wrapped

    def by_part(self) -> dict[str, int]:
        out: Counter = Counter()
        for (part, _), n in self.kernels.items():
            out[part] += n
        return dict(out)


class TritonLaunches:
    """Counts Triton kernel launches (each outermost `run` of a jitted, autotuned or heuristic kernel) without
    running them, and routes the model's kernels to Triton, as on a GPU."""

    def __init__(self, counter: OpCounter, force: bool = True):
        self.counter = counter
        self.force = force
        self.available = False
        self.forced: list[str] = []
        self._patches: list[tuple[object, str, object]] = []
        self._depth = 0

    def __enter__(self) -> TritonLaunches:
        try:
            import triton.runtime.autotuner as autotuner
            import triton.runtime.jit as jit
        except Exception:  # noqa: BLE001 - no Triton: its kernels run (and count) as their torch fallbacks
            return self
        self.available = True
        counter = self

        def launch(original):
            def run(fn_self, *args, **kwargs):
                if counter._depth == 0 and counter.counter.active:
                    name = getattr(getattr(fn_self, "fn", fn_self), "__name__", "triton")
                    counter.counter.kernels[(counter.counter.part, f"triton:{name}")] += 1
                return None  # not run: outputs keep whatever they held
            return run

        for owner, attr in ((jit.JITFunction, "run"), (autotuner.Autotuner, "run"), (autotuner.Heuristics, "run")):
            self._patch(owner, attr, launch(getattr(owner, attr)))
        if self.force:
            from model.kernels import backend

            backend.force_triton(True)
            self._patches.append((backend, "_forced", False))
            self.forced.append("model.kernels.backend.force_triton")
        return self

    def _patch(self, owner, attr: str, value) -> None:
        self._patches.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    def __exit__(self, *exc) -> None:
        for owner, attr, original in reversed(self._patches):
            setattr(owner, attr, original)
        self._patches.clear()


def build_runner(num_slots: int, max_seq_len: int) -> NemotronRunner:
    tokenizer = build_tokenizer()
    vocab_size = int(math.ceil(len(tokenizer) / 64) * 64)
    config = translate_config(small_config(vocab_size, tokenizer.convert_tokens_to_ids("<image>")))
    # bfloat16 as on a GPU: the casts around the float32 parts (norms, Mamba state) are kernels there too.
    model = build_random_model(config, torch.device("cpu"), torch.bfloat16).eval()
    return NemotronRunner(model, tokenizer, num_slots, max_seq_len)


def request(request_id: str, tiles: int, max_tokens: int) -> EngineRequest:
    parts = ([ImagePart(random_image(tiles, 0))] if tiles else []) + [TextPart("Caption the content of this image:")]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, min_tokens=max_tokens, ignore_eos=True)
    return EngineRequest(request_id, [Message("system", [TextPart("/no_think")]), Message("user", parts)], params)


def instrument(engine: LLMEngine, counter: OpCounter) -> None:
    runner = engine.runner
    for attr, part in (("encode_images", "vision"), ("prefill", "prefill"), ("decode", "decode")):
        setattr(runner, attr, counter.in_part(part, getattr(runner, attr)))
    engine.sampler = counter.in_part("sample", engine.sampler)


def count_step(engine: LLMEngine, counter: OpCounter) -> dict:
    with counter, counter.counting():
        engine.step()
    parts = counter.by_part()
    top = Counter()
    for (part, name), n in counter.kernels.items():
        top[name] += n
    return {"parts": parts, "total": sum(parts.values()), "host_reads": counter.host["reads"],
            "host_copies": counter.host["copies"], "top_ops": dict(top.most_common(12)),
            "triton_launches": sum(n for (_, name), n in counter.kernels.items() if name.startswith("triton:"))}


def measure(batch_sizes=(1, 64), force_triton: bool = True) -> dict:
    """Counts of each measured step; with `force_triton` the GPU's Triton paths are taken (and counted)."""
    counter = OpCounter()
    runner = build_runner(max(batch_sizes), 4096)
    results: dict = {"decode": {}, "prefill": {}}
    with torch.inference_mode(), TritonLaunches(counter, force_triton) as triton_state:
        for batch in batch_sizes:  # text-only prompts: a decoding step's ops do not depend on the context
            engine = LLMEngine(runner, batch, JOIN_BUDGET)
            instrument(engine, counter)
            for i in range(batch):
                engine.add_request(request(f"d{batch}-{i}", 0, 8))
            while not (engine.stats.prefill_tokens == 0 and engine.stats.decode_rows == batch):
                engine.step()
            results["decode"][str(batch)] = count_step(engine, counter)
            for i in range(batch):
                engine.abort(f"d{batch}-{i}")
        for key, n in (("1_tile", 1), ("7x1_tile", 7)):
            engine = LLMEngine(runner, n, JOIN_BUDGET)
            instrument(engine, counter)
            for i in range(n):
                engine.add_request(request(f"p{key}-{i}", 1, 1))
            results["prefill"][key] = count_step(engine, counter)
            results["prefill"][key]["prompt_tokens"] = engine.stats.prefill_tokens
            for i in range(n):
                engine.abort(f"p{key}-{i}")
    results["triton"] = {"available": triton_state.available, "forced_predicates": triton_state.forced}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for ops.json")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    started = time.perf_counter()
    try:
        details = measure()
    except Exception as exc:  # noqa: BLE001 - a Triton path that cannot be taken on a CPU: count the fallbacks
        print(f"counting with the GPU's Triton paths failed ({type(exc).__name__}: {exc}); counting the PyTorch "
              "fallbacks instead", file=sys.stderr)
        details = measure(force_triton=False)
        details["triton"]["forced_error"] = f"{type(exc).__name__}: {exc}"[:300]
    from bench.run import git_commit

    decode, prefill = details["decode"], details["prefill"]
    out = {
        "decode_kernels": {b: d["parts"].get("decode", 0) for b, d in decode.items()},
        "prefill_kernels": {k: d["parts"].get("prefill", 0) for k, d in prefill.items()},
        "vision_kernels": {k: d["parts"].get("vision", 0) for k, d in prefill.items()},
        "step_kernels": {**{f"decode_{b}": d["total"] for b, d in decode.items()},
                         **{f"prefill_{k}": d["total"] for k, d in prefill.items()}},
        "details": details,
        "model": "official layout at full depth (62 LM layers, 32 ViT layers), small widths",
        "commit": os.environ.get("BENCH_COMMIT") or git_commit(),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ops.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"kernels per decoding step (language model): batch 1 {out['decode_kernels']['1']}, "
          f"batch 64 {out['decode_kernels']['64']}")
    print(f"kernels per prefill (language model): 1 tile {out['prefill_kernels']['1_tile']}, "
          f"7 x 1 tile {out['prefill_kernels']['7x1_tile']}; vision encoder {out['vision_kernels']}")
    print(f"whole engine steps: {out['step_kernels']}")
    print(f"Triton: {'counted as launches' if details['triton']['available'] else 'not installed (torch fallbacks)'}"
          f"{', forced: ' + ', '.join(details['triton']['forced_predicates']) if details['triton']['forced_predicates'] else ''}"
          f"; {out['seconds']}s; wrote {args.out / 'ops.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
