"""bench/roofline.py: its hand-counted parameters equal transformers' native modules built on the meta device."""

from __future__ import annotations

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM, RadioConfig, RadioModel

from bench import roofline
from bench.roofline import GPU, LMArch, VisionArch, step_seconds


def native_lm_config(lm: LMArch) -> NemotronHConfig:
    # Built straight from the public config.json values, not from model/config.py, so this checks the
    # roofline's arithmetic against transformers' own layer definitions.
    return NemotronHConfig(
        vocab_size=lm.vocab, hidden_size=lm.hidden, intermediate_size=lm.ffn,
        hybrid_override_pattern=lm.pattern, num_attention_heads=lm.heads, num_key_value_heads=lm.kv_heads,
        head_dim=lm.head_dim, mamba_num_heads=lm.mamba_heads, mamba_head_dim=lm.mamba_head_dim,
        ssm_state_size=lm.ssm_state, n_groups=lm.groups, conv_kernel=lm.conv_kernel, use_conv_bias=True,
        use_bias=False, mlp_bias=False, attention_bias=False, mlp_hidden_act="relu2",
        tie_word_embeddings=lm.tied_embeddings, use_mamba_kernels=False)


def test_language_model_parameter_count_matches_native_model():
    lm = LMArch()
    with torch.device("meta"):
        model = NemotronHForCausalLM(native_lm_config(lm))
    assert sum(p.numel() for p in model.parameters()) == lm.total_params() == 12_310_001_152
    layers = model.model.layers if hasattr(model, "model") else model.backbone.layers
    kinds = {"M": lm.mamba_params(), "*": lm.attention_params(), "-": lm.mlp_params()}
    for kind, layer in zip(lm.pattern, layers):
        mixer = sum(p.numel() for p in layer.mixer.parameters())
        assert mixer == kinds[kind], (kind, mixer)
    assert (lm.n_mamba, lm.n_attention, lm.n_mlp) == (28, 6, 28)


def test_vision_tower_parameter_count_matches_native_radio():
    vis = VisionArch()
    config = RadioConfig(hidden_size=vis.width, num_hidden_layers=vis.layers, num_attention_heads=16,
                         mlp_ratio=vis.mlp / vis.width, patch_size=vis.patch, image_size=vis.tile,
                         max_img_size=vis.pos_grid * vis.patch, num_cls_tokens=4, num_registers=4, qkv_bias=True)
    with torch.device("meta"):
        model = RadioModel(config)
    # The native layer keeps LayerScale weights that C-RADIO does not have (model/architecture.py drops them).
    count = sum(p.numel() for n, p in model.named_parameters() if "layer_scale" not in n)
    assert count == vis.params() == 651_642_880
    assert vis.tokens == 1032 and vis.image_tokens_per_tile == 256 and vis.projector_in == 5120


def test_state_sizes_and_batch1_bound():
    lm = LMArch()
    assert lm.kv_bytes_per_token() == 6 * 2 * 8 * 128 * 2
    assert lm.ssm_state_bytes(4) == 28 * 128 * 80 * 128 * 4
    assert lm.conv_state_bytes() == 28 * (10240 + 2 * 8 * 128) * 3 * 2
    seconds, nbytes, flops = step_seconds(lm, GPU(), 1, 300, 4)
    assert nbytes / GPU().bandwidth == seconds  # batch 1 is bandwidth-bound
    assert 6.9e-3 < seconds < 7.1e-3


def test_report_prints_the_scenarios(capsys):
    assert roofline.main([]) == 0
    out = capsys.readouterr().out
    assert "12,310,001,152" in out and "(a) 1 tile" in out and "(b) 13 tiles" in out


@pytest.mark.parametrize("name, expected, slug", [
    ("NVIDIA H200", "H200 SXM 141GB", "h200"), ("NVIDIA H200 NVL", "H200 NVL 141GB", "h200-nvl"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM 80GB", "h100"), ("NVIDIA H100 PCIe", "H100 PCIe 80GB", "h100-pcie"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB", "a100-80gb"), ("NVIDIA A100-SXM4-40GB", "A100 40GB", "a100-40gb"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB", "a100-80gb-pcie"), ("NVIDIA L40S", "L40S 48GB", "l40s"),
    ("NVIDIA GH200 480GB", "GH200 96GB", "gh200"), ("NVIDIA L4", "L4 24GB", "l4"),
])
def test_card_is_picked_by_device_name(name, expected, slug):
    gpu = roofline.card(name)
    assert (gpu.name, gpu.slug) == (expected, slug)


def test_unknown_card_uses_what_was_measured():
    gpu = roofline.card("Tesla V100-SXM2-16GB", 0.8e12, 110e12)
    assert gpu.name.startswith("unknown card 'Tesla V100-SXM2-16GB'") and "measured" in gpu.name
    assert (gpu.bandwidth, gpu.bf16_flops, gpu.slug) == (0.8e12, 110e12, "tesla-v100-sxm2-16gb")
    fallback = roofline.card("Some Future GPU")
    assert "nothing measured" in fallback.name and fallback.bandwidth == GPU().bandwidth


def test_figures_carry_the_cards_bounds():
    h200 = roofline.figures(gpu=roofline.card("NVIDIA H200"))
    h100 = roofline.figures()
    assert (h200["bandwidth_tb_s"], h200["tflops"]) == (4.8, 989.0)
    assert 37 < h200["captions_per_s"]["1tile_128tok_c64"] < 39  # about 38, where an H100 SXM gives 29.5
    assert h100["captions_per_s"]["1tile_128tok_c64"] == 29.51
    assert h200["decode_ms_per_token_13_tiles"]["64"] > h200["decode_ms_per_token"]["64"]
    steps = h200["prefill_step_ms"]
    assert steps["7x1_tile"] == pytest.approx(7 * steps["1x1_tile"], rel=1e-3)
    assert set(steps) == {"1x1_tile", "4x1_tile", "7x1_tile", "13_tiles_first_2048"}


def test_fp8_linears_are_the_projections_of_the_native_model():
    """The weights an FP8 checkpoint quantizes: every nn.Linear of the 62 layers (lm_head stays bf16)."""
    lm = LMArch()
    with torch.device("meta"):
        model = NemotronHForCausalLM(native_lm_config(lm))
    layers = model.model.layers if hasattr(model, "model") else model.backbone.layers
    linears = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    assert lm.fp8_linear_params() == linears
    assert lm.streamed_bytes("fp8") == lm.streamed_bytes("bf16") - linears
    assert lm.streamed_bytes("bf16") == 2 * lm.streamed_params()


def test_fp8_roofline_reads_half_the_linear_bytes_and_runs_them_at_the_fp8_peak():
    h200, a100 = roofline.card("NVIDIA H200"), roofline.card("NVIDIA A100-SXM4-80GB")
    bf16, fp8 = roofline.figures(gpu=h200), roofline.figures(gpu=h200, quantization="fp8")
    assert (bf16["quantization"], fp8["quantization"]) == ("bf16", "fp8")
    # Batch-1 decode is weight-bound: about 12.3 GB against 23.3 GB.
    ratio = fp8["decode_ms_per_token"]["1"] / bf16["decode_ms_per_token"]["1"]
    assert 0.5 < ratio < 0.56
    assert roofline.weights_floor_ms(4.8e12, "fp8") / roofline.weights_floor_ms(4.8e12) == pytest.approx(ratio, rel=0.02)
    # Prefill: the language model's linears at twice the bf16 rate, the vision encoder at bf16.
    assert fp8["prefill_ms"]["1_tile"] < bf16["prefill_ms"]["1_tile"]
    assert fp8["vit_ms_per_tile"] == bf16["vit_ms_per_tile"]
    assert fp8["captions_per_s"]["1tile_128tok_c64"] > bf16["captions_per_s"]["1tile_128tok_c64"]
    # A card without FP8 tensor cores reads fewer bytes but computes at the bf16 rate.
    assert a100.fp8_flops == 0
    slow = roofline.figures(gpu=a100, quantization="fp8")
    assert slow["prefill_ms"] == roofline.figures(gpu=a100)["prefill_ms"]
    assert slow["decode_ms_per_token"]["1"] < roofline.figures(gpu=a100)["decode_ms_per_token"]["1"]
    assert roofline.card("Tesla V100-SXM2-16GB").fp8_flops == 0


def test_report_for_fp8_says_so(capsys):
    assert roofline.main(["--card", "H200", "--quantization", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "FP8 linears" in out and "1979 TFLOP/s FP8" in out and "| weight bytes per step | 12.31 GB |" in out
