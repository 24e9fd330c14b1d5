"""Config translation and full key coverage against the official 12B tensor list (see official_12b.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from model.config import translate_config
from model.loader import FLOAT32_PARAMETERS, build_model, load_model, load_weights, read_config, safetensors_files
from model.weights import native_to_official, official_to_native
from tests.model.official_12b import HYBRID_PATTERN, OFFICIAL_CONFIG, official_tensors


@pytest.fixture(scope="module")
def full_config():
    return translate_config(copy.deepcopy(OFFICIAL_CONFIG))


def test_translation_of_the_12b_config(full_config):
    text, vision = full_config.text_config, full_config.vision_config
    assert type(text).__name__ == "NemotronHConfig" and type(vision).__name__ == "RadioConfig"
    assert text.num_hidden_layers == 62 and text.hybrid_override_pattern == HYBRID_PATTERN
    assert text.layers_block_type.count("full_attention") == 6
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads) == (
        5120, 20480, 40, 8)
    assert (text.mamba_num_heads, text.mamba_head_dim, text.ssm_state_size, text.n_groups) == (128, 80, 128, 8)
    # C-RADIOv2-H: ViT-H/16, 4 class tokens (one per teacher) + 4 registers, CPE table for 2048 px.
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1280, 32, 16)
    assert (vision.num_cls_tokens, vision.num_registers, vision.patch_size) == (4, 4, 16)
    assert vision.max_img_size == 2048 and vision.video_temporal_patch_size is None
    assert vision.summary_idxs == [0, 1, 2]  # sam has use_summary false
    assert full_config.tokens_per_tile == 256
    assert full_config.projector_input_size == 5120
    assert full_config.norm_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_translation_refuses_other_model_types():
    bad = copy.deepcopy(OFFICIAL_CONFIG)
    bad["model_type"] = "llava"
    with pytest.raises(ValueError, match="NemotronH_Nano_VL_V2"):
        translate_config(bad)
    bad = copy.deepcopy(OFFICIAL_CONFIG)
    bad["vision_config"]["args"]["model"] = "vit_giant_patch14_224"
    with pytest.raises(ValueError, match="unknown RADIO ViT"):
        translate_config(bad)


def test_every_official_tensor_lands_on_a_native_parameter_of_the_same_shape(full_config):
    model = build_model(full_config, "meta")
    native = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped: dict[str, tuple[int, ...]] = {}
    for name, shape in official_tensors().items():
        placed = official_to_native(name, torch.empty(shape, device="meta"))
        assert placed is not None, f"official tensor {name} has no native home"
        for native_name, tensor in placed:
            assert native_name not in mapped, f"{native_name} filled twice"
            mapped[native_name] = tuple(tensor.shape)
    assert set(mapped) == set(native), (
        f"missing: {sorted(set(native) - set(mapped))[:5]} unexpected: {sorted(set(mapped) - set(native))[:5]}")
    assert mapped == native
    total = sum(torch.Size(s).numel() for s in official_tensors().values())
    assert 12.5e9 < total < 13.5e9  # 12B language model + 0.6B RADIO-H + projector


def test_native_to_official_is_the_inverse(full_config):
    model = build_model(full_config, "meta")
    state = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    official = native_to_official(state)
    assert {k: tuple(v.shape) for k, v in official.items()} == official_tensors()


def test_tiny_checkpoint_has_official_layout_and_loads_with_zero_key_problems(tiny_path):
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "NemotronH_Nano_VL_V2"
    assert set(OFFICIAL_CONFIG) - set(config) <= {"auto_map", "video_pruning_rate"}
    names = set()
    for file in safetensors_files(tiny_path):
        with safe_open(str(file), "pt") as f:
            names |= set(f.keys())
    assert "language_model.backbone.embeddings.weight" in names
    assert "vision_model.radio_model.model.blocks.0.attn.qkv.weight" in names
    assert {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight", "language_model.lm_head.weight",
            "language_model.backbone.norm_f.weight"} <= names
    model = build_model(read_config(tiny_path), "meta")
    report = load_weights(model, tiny_path, torch.device("cpu"), torch.float32)
    assert (report.missing, report.unexpected, report.shape_mismatch) == ([], [], [])
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert leftovers == []
    assert model.mlp1.linear_1.weight.dtype == torch.float32


def test_loader_reports_foreign_and_missing_keys(tiny_path, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_path, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / "model-00002-of-00002.safetensors"
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "mlp1.0.weight"}
    tensors["vision_model.radio_model.model.blocks.0.ls1.gamma"] = torch.ones(2)
    save_file(tensors, str(shard))
    index["weight_map"].pop("mlp1.0.weight")
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    model = build_model(read_config(bad), "meta")
    report = load_weights(model, bad, torch.device("cpu"), torch.float32)
    assert report.missing == ["mlp1.layer_norm.weight"]
    assert report.unexpected == ["vision_model.radio_model.model.blocks.0.ls1.gamma"]


def test_sampling_defaults_come_from_generation_config(tmp_path):
    from model.runner import sampling_defaults

    assert sampling_defaults(None) == (1.0, 1.0)
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.95, "eos_token_id": [2, 12]}')
    assert sampling_defaults(tmp_path) == (0.6, 0.95)
    (tmp_path / "generation_config.json").write_text('{"top_p": 0.5}')
    assert sampling_defaults(tmp_path) == (1.0, 0.5)


def test_fused_qkv_is_split_as_timm_lays_it_out():
    """timm's ViT (RADIO's) computes qkv(x).reshape(..., 3, heads, head_dim): output rows are all of q,
    then all of k, then all of v. Checked on values, against that reshape, not against our own inverse."""
    from model.weights import native_to_official, official_to_native

    heads, head_dim, width = 2, 3, 5
    fused = torch.arange(3 * heads * head_dim * width, dtype=torch.float32).reshape(3 * heads * head_dim, width)
    bias = torch.arange(3 * heads * head_dim, dtype=torch.float32) + 1000
    reference = fused.reshape(3, heads, head_dim, width)
    name = "vision_model.radio_model.model.blocks.7.attn.qkv."
    split = dict(official_to_native(name + "weight", fused) + official_to_native(name + "bias", bias))
    for i, part in enumerate("qkv"):
        weight = split[f"vision_model.encoder.layer.7.attention.{part}_proj.weight"]
        assert torch.equal(weight, reference[i].reshape(heads * head_dim, width)), part
        assert torch.equal(split[f"vision_model.encoder.layer.7.attention.{part}_proj.bias"],
                           bias.reshape(3, heads * head_dim)[i])
    # A token through timm's fused projection equals the three native projections, head by head.
    x = torch.randn(width)
    timm_q, timm_k, timm_v = (fused @ x + bias).reshape(3, heads, head_dim)
    native = [split[f"vision_model.encoder.layer.7.attention.{p}_proj.weight"] @ x
              + split[f"vision_model.encoder.layer.7.attention.{p}_proj.bias"] for p in "qkv"]
    for got, want in zip(native, (timm_q, timm_k, timm_v)):
        torch.testing.assert_close(got.reshape(heads, head_dim), want)
    assert torch.equal(native_to_official(split)[name + "weight"], fused)


def test_tiny_checkpoint_files_are_readable_by_everyone(tiny_path):
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in tiny_path.iterdir())


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
def test_mamba_per_head_scalars_stay_float32_in_a_bfloat16_model(tiny_path, load_format):
    """A_log, D and dt_bias serve in float32 (the decay exp(dt * A) is float32 math); everything else in bf16."""
    model, _, _ = load_model(str(tiny_path), None, "cpu", "bfloat16", load_format)
    kept = {name: p.dtype for name, p in model.named_parameters() if name.rpartition(".")[2] in FLOAT32_PARAMETERS}
    mixers = [m for m in model.language_model.modules() if hasattr(m, "A_log")]
    assert mixers and len(kept) == 3 * len(mixers), sorted(kept)
    assert set(kept.values()) == {torch.float32}
    assert {p.dtype for name, p in model.named_parameters() if name not in kept} == {torch.bfloat16}
    if load_format == "safetensors":  # the checkpoint's values themselves, not a bf16 rounding of them
        for file in safetensors_files(tiny_path):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key.endswith(".A_log"):
                        layer = int(key.split(".layers.")[1].split(".")[0])
                        mixer = model.language_model.model.layers[layer].mixer
                        assert torch.equal(mixer.A_log, f.get_tensor(key).float())
