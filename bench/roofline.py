"""Roofline model of Nemotron Nano 12B v2 VL captioning on one GPU: `python bench/roofline.py [--card H200]`.

Everything is computed from the architecture constants below (sources in docs/BENCHMARKS.md), so the
numbers in the doc can be regenerated. A roofline is an upper bound: every kernel at peak bandwidth
or peak bf16 tensor throughput, whichever binds, no launch gaps, no scheduler time, no HTTP.

Assumptions (change them with the flags):
* weights in bf16 (`--quantization fp8`: the language model's linears in FP8, one byte each, and their
  matmuls at the card's dense FP8 tensor peak where it has FP8 tensor cores; lm_head, embeddings, norms,
  Mamba's conv and per-head parameters, the vision tower and projector stay bf16, as in NVIDIA's FP8
  checkpoint); every decode step reads every language-model weight once (the embedding table only
  for the rows it needs, which is negligible); the vision tower and projector run only in prefill;
* Mamba2 recurrent state (ssm state) in fp32 (`--ssm-state-bytes 4`, what vLLM is told to use for this
  model: `--mamba_ssm_cache_dtype float32`), conv state in bf16; each decode step reads and writes
  every running sequence's state once; KV cache bf16, read once per step;
* prefill is compute-bound (FLOPs at peak) and decode is bandwidth-bound at the batch sizes used
  (the script checks both limits per step and takes the larger);
* a caption at concurrency C costs its own prefill plus 1/C of each of its decode steps
  (continuous batching with C sequences always decoding).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class LMArch:
    """NemotronH language model (Megatron-Bridge NemotronNanoModelProvider12Bv2 / HF config.json)."""

    pattern: str = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
    hidden: int = 5120
    ffn: int = 20480
    heads: int = 40
    kv_heads: int = 8
    head_dim: int = 128
    mamba_heads: int = 128
    mamba_head_dim: int = 80
    ssm_state: int = 128
    groups: int = 8
    conv_kernel: int = 4
    chunk: int = 128
    vocab: int = 131072
    tied_embeddings: bool = False

    @property
    def n_mamba(self) -> int:
        return self.pattern.count("M")

    @property
    def n_attention(self) -> int:
        return self.pattern.count("*")

    @property
    def n_mlp(self) -> int:
        return self.pattern.count("-")

    @property
    def d_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.groups * self.ssm_state

    def mamba_params(self) -> int:
        in_proj = self.hidden * (2 * self.d_inner + 2 * self.groups * self.ssm_state + self.mamba_heads)  # z,x,B,C,dt
        conv = self.conv_dim * self.conv_kernel + self.conv_dim  # depthwise weight + bias
        per_head = 3 * self.mamba_heads  # dt_bias, A_log, D
        gated_norm = self.d_inner
        out_proj = self.d_inner * self.hidden
        return in_proj + conv + per_head + gated_norm + out_proj

    def attention_params(self) -> int:
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        return q + kv + o  # no biases

    def mlp_params(self) -> int:
        return 2 * self.hidden * self.ffn  # up, down (squared ReLU, no gate, no biases)

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def layer_norm_params(self) -> int:
        return len(self.pattern) * self.hidden + self.hidden  # one pre-norm per layer + norm_f

    def total_params(self) -> int:
        return (self.n_mamba * self.mamba_params() + self.n_attention * self.attention_params()
                + self.n_mlp * self.mlp_params() + self.embedding_params() + self.lm_head_params()
                + self.layer_norm_params())

    def streamed_params(self) -> int:
        """Weights one decode step must read: all but the embedding table."""
        return self.total_params() - self.embedding_params()

    def fp8_linear_params(self) -> int:
        """Weights of the linears an FP8 checkpoint quantizes: every projection of the 62 layers (Mamba's
        in_proj and out_proj, attention's q, k, v, o, the MLPs' up and down), not lm_head."""
        mamba_linears = self.hidden * (2 * self.d_inner + 2 * self.groups * self.ssm_state + self.mamba_heads) \
            + self.d_inner * self.hidden
        return self.n_mamba * mamba_linears + self.n_attention * self.attention_params() + self.n_mlp * self.mlp_params()

    def streamed_bytes(self, quantization: str = "bf16") -> int:
        """Bytes of weights one decode step reads: bf16 throughout, or the FP8 linears at one byte each (their
        per-tensor scales are a few bytes per layer)."""
        return self.streamed_params() * 2 - (self.fp8_linear_params() if quantization == "fp8" else 0)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.n_attention * 2 * self.kv_heads * self.head_dim * dtype_bytes

    def conv_state_bytes(self, dtype_bytes: int = 2) -> int:
        return self.n_mamba * self.conv_dim * (self.conv_kernel - 1) * dtype_bytes

    def ssm_state_bytes(self, dtype_bytes: int = 4) -> int:
        return self.n_mamba * self.mamba_heads * self.mamba_head_dim * self.ssm_state * dtype_bytes

    def matmul_flops_per_token(self, with_lm_head: bool) -> int:
        dense = self.streamed_params() - self.lm_head_params() - self.layer_norm_params()
        return 2 * (dense + (self.lm_head_params() if with_lm_head else 0))

    def prefill_flops(self, tokens: int) -> int:
        """Matmuls over all tokens (lm_head only for the last), causal attention, Mamba2 SSD scan."""
        matmul = tokens * self.matmul_flops_per_token(False) + self.matmul_flops_per_token(True) - \
            self.matmul_flops_per_token(False)
        attention = self.n_attention * 2 * tokens * tokens * self.heads * self.head_dim  # QK^T + AV, causal half
        # SSD: state update and read-out (2 x H*P*N MACs) plus the within-chunk quadratic part.
        ssd_per_token = (4 * self.mamba_heads * self.mamba_head_dim * self.ssm_state
                         + 2 * self.chunk * self.mamba_heads * (self.ssm_state + self.mamba_head_dim))
        return matmul + attention + self.n_mamba * tokens * ssd_per_token

    def decode_flops_per_token(self, context: int) -> int:
        attention = self.n_attention * 4 * context * self.heads * self.head_dim
        ssd = self.n_mamba * 4 * self.mamba_heads * self.mamba_head_dim * self.ssm_state
        return self.matmul_flops_per_token(True) + attention + ssd


@dataclass(frozen=True)
class VisionArch:
    """C-RADIOv2-H (timm vit_huge_patch16_224) + pixel shuffle 0.5 + mlp1 projector."""

    width: int = 1280
    layers: int = 32
    mlp: int = 5120
    patch: int = 16
    tile: int = 512
    prefix_tokens: int = 8  # 4 class tokens (one per teacher) + 4 registers
    pos_grid: int = 128  # cpe_max_size 2048 / patch 16
    downsample: float = 0.5
    projector_hidden: int = 20480
    lm_hidden: int = 5120

    @property
    def patches(self) -> int:
        return (self.tile // self.patch) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + self.prefix_tokens

    @property
    def image_tokens_per_tile(self) -> int:
        return int(self.patches * self.downsample * self.downsample)

    @property
    def projector_in(self) -> int:
        return int(self.width / (self.downsample * self.downsample))

    def block_params(self) -> int:
        qkv = 3 * self.width * self.width + 3 * self.width
        proj = self.width * self.width + self.width
        mlp = 2 * self.width * self.mlp + self.mlp + self.width
        norms = 4 * self.width  # two LayerNorms with bias
        return qkv + proj + mlp + norms

    def params(self) -> int:
        embed = 3 * self.patch * self.patch * self.width  # patch embedder, no bias
        pos = self.pos_grid * self.pos_grid * self.width
        return self.layers * self.block_params() + embed + pos + self.prefix_tokens * self.width

    def projector_params(self) -> int:
        return self.projector_in + self.projector_in * self.projector_hidden + self.projector_hidden * self.lm_hidden

    def flops_per_tile(self) -> int:
        t, d = self.tokens, self.width
        per_layer = 2 * t * (4 * d * d + 2 * d * self.mlp) + 4 * t * t * d  # matmuls + full attention
        embed = 2 * self.patches * 3 * self.patch * self.patch * d
        proj = 2 * self.image_tokens_per_tile * (self.projector_in * self.projector_hidden
                                                 + self.projector_hidden * self.lm_hidden)
        return self.layers * per_layer + embed + proj


@dataclass(frozen=True)
class GPU:
    name: str = "H100 SXM 80GB"
    bandwidth: float = 3.35e12  # bytes/s, HBM3
    bf16_flops: float = 989e12  # dense tensor-core peak
    memory: float = 80e9
    slug: str = "h100"  # the results folder: bench/results/<slug>
    fp8_flops: float = 1979e12  # dense FP8 tensor peak; 0 for cards without FP8 tensor cores (before Ada/Hopper)

    def matmul_seconds(self, linear_flops: float, other_flops: float, quantization: str = "bf16") -> float:
        """Time at peak for `linear_flops` in the language model's (maybe FP8) linears plus `other_flops` in bf16."""
        if quantization == "fp8" and self.fp8_flops:
            return linear_flops / self.fp8_flops + other_flops / self.bf16_flops
        return (linear_flops + other_flops) / self.bf16_flops


# Spec-sheet figures (NVIDIA data sheets): memory bandwidth, dense (not sparse) bf16 and FP8 tensor FLOP/s.
# Matched against torch.cuda.get_device_name(): each entry lists words that must all appear in the upper-cased
# name, most specific first (an "H100 PCIe" must not be taken for the SXM part, nor an "H200 NVL" for the H200).
CARDS: tuple[tuple[tuple[str, ...], GPU], ...] = (
    (("GH200",), GPU("GH200 96GB", 4.0e12, 989e12, 96e9, "gh200", 1979e12)),
    (("H200", "NVL"), GPU("H200 NVL 141GB", 4.8e12, 835e12, 141e9, "h200-nvl", 1671e12)),
    (("H200",), GPU("H200 SXM 141GB", 4.8e12, 989e12, 141e9, "h200", 1979e12)),
    (("H100", "PCIE"), GPU("H100 PCIe 80GB", 2.0e12, 756e12, 80e9, "h100-pcie", 1513e12)),
    (("H100", "NVL"), GPU("H100 NVL 94GB", 3.9e12, 835e12, 94e9, "h100-nvl", 1671e12)),
    (("H100",), GPU("H100 SXM 80GB", 3.35e12, 989e12, 80e9, "h100", 1979e12)),
    (("H800",), GPU("H800 SXM 80GB", 3.35e12, 989e12, 80e9, "h800", 1979e12)),
    (("B200",), GPU("B200 180GB", 8.0e12, 2250e12, 180e9, "b200", 4500e12)),
    (("A100", "80GB", "PCIE"), GPU("A100 PCIe 80GB", 1.935e12, 312e12, 80e9, "a100-80gb-pcie", 0.0)),
    (("A100", "80GB"), GPU("A100 SXM 80GB", 2.039e12, 312e12, 80e9, "a100-80gb", 0.0)),
    (("A100",), GPU("A100 40GB", 1.555e12, 312e12, 40e9, "a100-40gb", 0.0)),
    (("L40S",), GPU("L40S 48GB", 0.864e12, 362e12, 48e9, "l40s", 733e12)),
    (("L40",), GPU("L40 48GB", 0.864e12, 181e12, 48e9, "l40", 362e12)),
    (("A10G",), GPU("A10G 24GB", 0.6e12, 70e12, 24e9, "a10g", 0.0)),
    (("L4",), GPU("L4 24GB", 0.3e12, 121e12, 24e9, "l4", 242e12)),
)


def slug_of(name: str) -> str:
    """'NVIDIA Foo Bar 48GB' -> 'foo-bar-48gb': a folder name of letters, digits and dashes."""
    words = "".join(c if c.isalnum() else " " for c in name.lower()).split()
    return "-".join(w for w in words if w != "nvidia") or "gpu"


def card(device_name: str, measured_bandwidth: float | None = None, measured_flops: float | None = None) -> GPU:
    """The roofline of the card called `device_name` (torch.cuda.get_device_name()).

    A card not in CARDS is an "unknown card": its bounds are what this run measured on it (device-to-device
    copy, bf16 GEMM), else an H100 SXM's figures, and the name says which."""
    upper = device_name.upper().replace("-", " ")
    words = set(upper.split())
    for needed, gpu in CARDS:
        # Whole words where the name has them ("L4" is not "L40S"); A100 names carry "80GB" inside "A100-SXM4-80GB".
        if all(w in words or (len(w) > 3 and w in upper) for w in needed):
            return gpu
    default = GPU()
    if measured_bandwidth and measured_flops:
        how = "measured bandwidth and GEMM"
    elif measured_bandwidth or measured_flops:
        how = "measured " + ("bandwidth" if measured_bandwidth else "GEMM") + ", the rest as an H100 SXM"
    else:
        how = "nothing measured: an H100 SXM's figures"
    # An unknown card is given no FP8 tensor peak: its FP8 matmuls are bounded at the bf16 rate, never flattered.
    return GPU(f"unknown card {device_name!r} ({how})", measured_bandwidth or default.bandwidth,
               measured_flops or default.bf16_flops, default.memory, slug_of(device_name), 0.0)


@dataclass(frozen=True)
class Scenario:
    name: str
    tiles: int
    text_tokens: int
    output_tokens: int
    concurrency: int


def step_seconds(lm: LMArch, gpu: GPU, batch: int, context: int, ssm_bytes: int,
                 quantization: str = "bf16") -> tuple[float, float, float]:
    """(seconds, bytes, flops) of one decode step for `batch` sequences at `context` tokens each."""
    weights = lm.streamed_bytes(quantization)
    state = batch * 2 * (lm.ssm_state_bytes(ssm_bytes) + lm.conv_state_bytes())  # read + write
    kv = batch * context * lm.kv_bytes_per_token()
    nbytes = weights + state + kv
    flops = batch * lm.decode_flops_per_token(context)
    linear = batch * 2 * lm.fp8_linear_params()
    return max(nbytes / gpu.bandwidth, gpu.matmul_seconds(linear, flops - linear, quantization)), nbytes, flops


def prefill_seconds(lm: LMArch, vis: VisionArch, gpu: GPU, tiles: int, tokens: int, quantization: str = "bf16") -> float:
    """The vision encoder over `tiles` tiles and the language model over `tokens` prompt tokens, at peak."""
    total = tiles * vis.flops_per_tile() + lm.prefill_flops(tokens)
    linear = tokens * 2 * lm.fp8_linear_params()
    return gpu.matmul_seconds(linear, total - linear, quantization)


def scenario(lm: LMArch, vis: VisionArch, gpu: GPU, s: Scenario, ssm_bytes: int, quantization: str = "bf16") -> dict:
    prompt = s.tiles * vis.image_tokens_per_tile + s.text_tokens
    prefill_flops = s.tiles * vis.flops_per_tile() + lm.prefill_flops(prompt)
    prefill_s = prefill_seconds(lm, vis, gpu, s.tiles, prompt, quantization)
    mean_context = prompt + s.output_tokens // 2
    step_s, step_bytes, _ = step_seconds(lm, gpu, s.concurrency, mean_context, ssm_bytes, quantization)
    decode_s_per_caption = s.output_tokens * step_s / s.concurrency
    per_caption = prefill_s + decode_s_per_caption
    weights = lm.total_params() * 2 - (lm.fp8_linear_params() if quantization == "fp8" else 0)
    memory = (weights + (vis.params() + vis.projector_params()) * 2
              + s.concurrency * (lm.ssm_state_bytes(ssm_bytes) + lm.conv_state_bytes()
                                 + (prompt + s.output_tokens) * lm.kv_bytes_per_token()))
    return {"scenario": s, "prompt_tokens": prompt, "prefill_tflop": prefill_flops / 1e12, "prefill_ms": prefill_s * 1e3,
            "step_ms": step_s * 1e3, "step_gb": step_bytes / 1e9, "decode_ms_per_caption": decode_s_per_caption * 1e3,
            "captions_per_s": 1.0 / per_caption, "memory_gb": memory / 1e9}


SCENARIOS = (
    Scenario("(a) 1 tile, 128 tokens, concurrency 64", tiles=1, text_tokens=40, output_tokens=128, concurrency=64),
    Scenario("(b) 13 tiles (4:3), 128 tokens, concurrency 64", tiles=13, text_tokens=40, output_tokens=128,
             concurrency=64),
    Scenario("(c) 13 tiles, 128 tokens, concurrency 16 (nv-ingest's 16 in flight)", tiles=13, text_tokens=40,
             output_tokens=128, concurrency=16),
)


def figures(ssm_bytes: int = 4, gpu: GPU = GPU(), text_tokens: int = 40, output_tokens: int = 128,
            quantization: str = "bf16") -> dict:
    """The bounds for the figures `python -m bench.gpu` measures, under the same keys."""
    lm, vis = LMArch(), VisionArch()

    def caption(tiles: int, concurrency: int) -> dict:
        return scenario(lm, vis, gpu, Scenario("", tiles, text_tokens, output_tokens, concurrency), ssm_bytes,
                        quantization)

    def context(tiles: int) -> int:
        return tiles * vis.image_tokens_per_tile + text_tokens + output_tokens // 2

    def decode(tiles: int) -> dict:
        return {str(b): round(step_seconds(lm, gpu, b, context(tiles), ssm_bytes, quantization)[0] * 1e3, 3)
                for b in (1, 16, 64)}

    one_tile_prompt = vis.image_tokens_per_tile + text_tokens
    chunk = 2048
    return {
        "device": gpu.name,
        "quantization": quantization,
        "bandwidth_tb_s": round(gpu.bandwidth / 1e12, 3),
        "tflops": round(gpu.bf16_flops / 1e12, 1),
        "fp8_tflops": round(gpu.fp8_flops / 1e12, 1),
        "decode_ms_per_token": decode(1),
        "decode_ms_per_token_13_tiles": decode(13),
        "prefill_ms": {"1_tile": round(caption(1, 1)["prefill_ms"], 3), "13_tiles": round(caption(13, 1)["prefill_ms"], 3)},
        # One engine step in which n one-tile requests join (vision encoder and prompt of each), and the first
        # 2,048-token step of a 13-tile prompt (its 13 tiles through the vision encoder, 2,048 prompt tokens).
        "prefill_step_ms": {
            **{f"{n}x1_tile": round(n * caption(1, 1)["prefill_ms"], 3) for n in (1, 4, 7)},
            "13_tiles_first_2048": round(prefill_seconds(lm, vis, gpu, 13, chunk, quantization) * 1e3, 3),
        },
        "prefill_tokens_per_s": round(one_tile_prompt / (caption(1, 1)["prefill_ms"] / 1e3)),
        "vit_ms_per_tile": round(vis.flops_per_tile() / gpu.bf16_flops * 1e3, 4),
        "captions_per_s": {f"{t}tile_{output_tokens}tok_c{c}": round(caption(t, c)["captions_per_s"], 2)
                           for t in (1, 13) for c in (16, 64)},
        "peak_memory_gb": round(caption(13, 64)["memory_gb"], 2),
    }


def weights_floor_ms(bandwidth: float, quantization: str = "bf16") -> float:
    """Batch-1 decode at a given bandwidth (bytes/s): weights + state + KV of a 1-tile context, read once."""
    lm, vis = LMArch(), VisionArch()
    context = vis.image_tokens_per_tile + 40 + 64
    state = 2 * (lm.ssm_state_bytes(4) + lm.conv_state_bytes())
    return (lm.streamed_bytes(quantization) + state + context * lm.kv_bytes_per_token()) / bandwidth * 1e3


def report(ssm_bytes: int = 4, gpu: GPU = GPU(), quantization: str = "bf16") -> str:
    lm, vis = LMArch(), VisionArch()
    gb = 1e9
    fp8 = (f", {gpu.fp8_flops / 1e12:.0f} TFLOP/s FP8" if gpu.fp8_flops else ", no FP8 tensor cores") \
        if quantization == "fp8" else ""
    lines = [f"# Roofline: Nemotron Nano 12B v2 VL ({'FP8 linears' if quantization == 'fp8' else 'bf16'}) on "
             f"{gpu.name} ({gpu.bandwidth / 1e12:.2f} TB/s, {gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16{fp8})", ""]
    lines += ["| part | parameters |", "|---|---:|"]
    rows = [
        (f"Mamba2 layer (x{lm.n_mamba})", lm.mamba_params()),
        (f"attention layer (x{lm.n_attention})", lm.attention_params()),
        (f"MLP layer (x{lm.n_mlp})", lm.mlp_params()),
        ("embeddings", lm.embedding_params()),
        ("lm_head (untied)", lm.lm_head_params()),
        ("RMSNorms (62 + norm_f)", lm.layer_norm_params()),
        ("language model total", lm.total_params()),
        ("read per decode step (all but embeddings)", lm.streamed_params()),
        ("of which linears an FP8 checkpoint quantizes", lm.fp8_linear_params()),
        ("RADIO ViT-H/16", vis.params()),
        ("projector mlp1", vis.projector_params()),
        ("whole model", lm.total_params() + vis.params() + vis.projector_params()),
    ]
    lines += [f"| {name} | {value:,} |" for name, value in rows]
    lines += ["", "| per-sequence state | bytes |", "|---|---:|",
              f"| KV cache per token (6 attention layers, 8 KV heads x 128, bf16) | {lm.kv_bytes_per_token():,} |",
              f"| Mamba conv state per sequence (28 layers, bf16) | {lm.conv_state_bytes():,} |",
              f"| Mamba ssm state per sequence (28 layers, {'fp32' if ssm_bytes == 4 else 'bf16'}) | "
              f"{lm.ssm_state_bytes(ssm_bytes):,} |"]
    t1, _, _ = step_seconds(lm, gpu, 1, 300, ssm_bytes, quantization)
    weights_only = lm.streamed_bytes(quantization) / gpu.bandwidth
    lines += ["", "| batch-1 decode | value |", "|---|---:|",
              f"| weight bytes per step | {lm.streamed_bytes(quantization) / gb:.2f} GB |",
              f"| ms/token, weights only | {weights_only * 1e3:.2f} |",
              f"| ms/token, weights + state read/write + KV (300-token context) | {t1 * 1e3:.2f} |",
              f"| tokens/s at batch 1 (bound) | {1 / t1:.0f} |",
              f"| target: within 1.6x -> at most ms/token | {1.6 * t1 * 1e3:.2f} |"]
    lines += ["", "| per tile | value |", "|---|---:|",
              f"| ViT tokens (1024 patches + 8 prefix) | {vis.tokens} |",
              f"| image tokens after pixel shuffle | {vis.image_tokens_per_tile} |",
              f"| ViT + projector GFLOP | {vis.flops_per_tile() / 1e9:.0f} |",
              f"| ViT + projector ms at peak | {vis.flops_per_tile() / gpu.bf16_flops * 1e3:.2f} |"]
    lines += ["", "| scenario | prompt tokens | prefill TFLOP | prefill ms | decode step ms (GB read) | "
              "decode ms/caption | roofline captions/s | memory GB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in SCENARIOS:
        r = scenario(lm, vis, gpu, s, ssm_bytes, quantization)
        lines.append(f"| {s.name} | {r['prompt_tokens']} | {r['prefill_tflop']:.1f} | {r['prefill_ms']:.1f} | "
                     f"{r['step_ms']:.1f} ({r['step_gb']:.1f}) | {r['decode_ms_per_caption']:.1f} | "
                     f"{r['captions_per_s']:.1f} | {r['memory_gb']:.1f} |")
    a = scenario(lm, vis, gpu, SCENARIOS[0], ssm_bytes, quantization)
    b = scenario(lm, vis, gpu, SCENARIOS[1], ssm_bytes, quantization)
    lines += ["", "| GPU target | threshold | share of roofline |", "|---|---:|---:|",
              f"| batch-1 decode within 1.6x of bandwidth limit | <= {1.6 * t1 * 1e3:.2f} ms/token | 62.5% |",
              f"| (a) >= 50% of roofline captions/s | >= {0.5 * a['captions_per_s']:.1f} captions/s | 50% |",
              f"| (b) >= 6 captions/s at 13 tiles | >= 6.0 captions/s | {600 / b['captions_per_s']:.0f}% |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ssm-state-bytes", type=int, choices=(2, 4), default=4,
                        help="bytes per Mamba ssm-state element (4 = fp32, 2 = bf16)")
    parser.add_argument("--card", default=None,
                        help="a device name (H100, H200, A100 80GB, L40S, ...): that card's spec-sheet figures")
    parser.add_argument("--bandwidth", type=float, default=None, help="TB/s (default: the card's, else 3.35)")
    parser.add_argument("--tflops", type=float, default=None, help="dense bf16 TFLOP/s (default: the card's, else 989)")
    parser.add_argument("--quantization", choices=("bf16", "fp8"), default="bf16",
                        help="fp8: the language model's linears in FP8 (NVIDIA's FP8 checkpoint)")
    args = parser.parse_args(argv)
    base = card(args.card) if args.card else GPU()
    gpu = GPU(base.name, args.bandwidth * 1e12 if args.bandwidth else base.bandwidth,
              args.tflops * 1e12 if args.tflops else base.bf16_flops, base.memory, base.slug, base.fp8_flops)
    print(report(args.ssm_state_bytes, gpu, args.quantization), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
