"""FP8 checkpoints (ModelOpt layout): detection, the FP8 linear layer, loading, and the tiny FP8 model against
the tiny BF16 one it was made from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import model.quantization.fp8 as fp8
from model.loader import (DUMMY_FP8, build_model, checkpoint_quantization, fp8_meta_model, load_model,
                          load_weights, read_config, weight_bytes)
from model.quantization import Fp8Linear, QuantConfig, UnsupportedQuantization, fp8_layers, read_quant_config
from model.runner import NemotronRunner
from tests.model.tiny_helpers import make_job, noise_image

# ---- detection -------------------------------------------------------------------------------------------


def _folder(tmp_path, config_extra=None, hf_quant=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "NemotronH_Nano_VL_V2", **(config_extra or {})}))
    if hf_quant is not None:
        (tmp_path / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    return tmp_path


def test_quantization_is_read_from_either_modelopt_file(tmp_path):
    assert read_quant_config(_folder(tmp_path / "bf16")) is None
    hf = read_quant_config(_folder(tmp_path / "hf", hf_quant={
        "producer": {"name": "modelopt", "version": "0.33"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None,
                         "exclude_modules": ["lm_head", "vision_model*"]}}))
    assert hf.algo == "FP8" and hf.exclude_modules == ("lm_head", "vision_model*")
    cfg = read_quant_config(_folder(tmp_path / "cfg", {"quantization_config": {
        "quant_method": "modelopt", "quant_algo": "fp8", "ignore": ["language_model.lm_head", "mlp1*"]}}))
    assert cfg.algo == "FP8" and cfg.exclude_modules == ("language_model.lm_head", "mlp1*")


@pytest.mark.parametrize("declared, found", [
    ({"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}}, "NVFP4"),
    ({"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8_PB_WO"}}, "'FP8_PB_WO'"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "'awq'"),
    ({"quantization_config": {"quant_method": "modelopt"}}, "'none'"),
])
def test_unsupported_quantization_is_refused_in_one_line(tmp_path, declared, found):
    with pytest.raises(UnsupportedQuantization) as refused:
        read_quant_config(_folder(tmp_path, declared))
    message = str(refused.value)
    assert "\n" not in message and found in message
    assert "supported: no quantization (BF16), or ModelOpt FP8" in message


def test_exclude_patterns_are_modelopt_wildcards():
    config = QuantConfig(exclude_modules=("lm_head", "vision_model*", "language_model.backbone.layers.1.mixer*",
                                          "*.mixer.out_proj"))
    assert config.is_excluded("language_model.lm_head")  # also without the language_model. prefix
    assert config.is_excluded("vision_model.radio_model.model.blocks.0.attn.qkv")
    assert config.is_excluded("language_model.backbone.layers.1.mixer.in_proj")
    assert config.is_excluded("language_model.backbone.layers.3.mixer.out_proj")
    assert not config.is_excluded("language_model.backbone.layers.3.mixer.in_proj")
    assert not config.is_excluded("language_model.backbone.layers.11.mixer.in_proj")


# ---- the layer ---------------------------------------------------------------------------------------------


def _reference(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """The format's definition, written independently of the layer: real values are E4M3 value times scale."""
    s_in, s_w = float(layer.input_scale), float(layer.weight_scale)
    xq = torch.clamp(x.double() / s_in, -448.0, 448.0).to(torch.float8_e4m3fn).double() * s_in
    w = layer.weight.double() * s_w
    out = xq @ w.T
    return (out + layer.bias.double() if layer.bias is not None else out).float()


def _layer(in_features=64, out_features=48, bias=True, seed=0, amax=300.0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05, generator=g)
        if bias:
            linear.bias.normal_(0, 0.1, generator=g)
    return Fp8Linear.from_linear(linear, amax / 448.0), linear


def test_from_linear_takes_amax_over_448_and_keeps_every_weight_to_e4m3_precision():
    layer, linear = _layer()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.weight_scale.shape == () and layer.input_scale.shape == ()
    assert float(layer.weight_scale) == pytest.approx(float(linear.weight.detach().abs().max()) / 448.0, rel=1e-6)
    back = (layer.weight.float() * layer.weight_scale).detach()
    normal = linear.weight.detach().abs() >= layer.weight_scale.detach() * 2.0**-6  # E4M3's normal range, in real units
    weight = linear.weight.detach()
    rel = ((back - weight).abs() / weight.abs())[normal]
    assert float(rel.max()) <= 2.0**-4 + 1e-6  # half a unit in the last place of a 3-bit mantissa


def test_dequantized_path_is_the_format_exactly_over_a_wide_input_range():
    """Inputs up to 300 (the static scale's amax) and down to 1e-3: quantizing with input_scale keeps them in
    E4M3's range; a layer that ignored input_scale would saturate the large ones at 448."""
    layer, _ = _layer(amax=300.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 64, generator=g) * torch.logspace(-3, 2.4, 64)
    x[0, 0, 0] = 300.0
    y = layer(x)
    assert y.shape == (5, 7, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y, _reference(layer, x.reshape(-1, 64)).reshape(5, 7, 48), rtol=1e-5, atol=1e-4)


def _cpu_scaled_mm(calls):
    """torch._scaled_mm's contract on the CPU: FP8 operands meeting cuBLASLt's alignment, a row-major, b
    column-major, per-tensor float32 scales applied to a float32 accumulator, then the output dtype."""
    def scaled_mm(a, b, scale_a, scale_b, bias, out_dtype):
        assert a.dtype == b.dtype == torch.float8_e4m3fn
        assert a.shape[0] % 16 == 0 and a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0
        assert a.is_contiguous() and b.stride(0) == 1  # row-major a, column-major b
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.numel() == scale_b.numel() == 1
        calls.append(a.shape[0])
        out = (a.float() @ b.float()) * scale_a * scale_b
        return (out + bias.float() if bias is not None else out).to(out_dtype)
    return scaled_mm


def test_w8a8_path_pads_rows_to_16_and_padding_changes_no_real_row(monkeypatch):
    calls = []
    monkeypatch.setattr(fp8, "_scaled_mm", _cpu_scaled_mm(calls))
    layer, _ = _layer(amax=8.0)
    layer.path = fp8.SCALED_MM
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 64, generator=g) * 2
    whole = layer(x)
    torch.testing.assert_close(whole, _reference(layer, x), rtol=1e-5, atol=1e-5)
    for rows in (1, 5, 16, 17, 33):
        part = layer(x[:rows])
        assert part.shape == (rows, 48) and calls[-1] == -(-rows // 16) * 16
        assert torch.equal(part, whole[:rows])  # the same rows, whatever the batch and its padding
    assert fp8.pad_rows(x[:16]) is not None and fp8.pad_rows(x[:16]).data_ptr() == x.data_ptr()  # no copy if aligned


def test_path_choice_on_this_machine_is_dequantize_and_said_once():
    layer, _ = _layer()
    model = nn.Sequential(layer)
    line = fp8.prepare_fp8_layers(model, torch.device("cpu"))
    assert layer.path == fp8.DEQUANT and "1 linear layers run dequantized" in line and "cpu" in line
    supported, why = fp8.scaled_mm_supported(torch.device("cpu"))
    assert not supported and why


# ---- the tiny FP8 checkpoint ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_model(tiny_fp8_path):
    return load_model(str(tiny_fp8_path), None, "cpu", "auto")


@pytest.fixture(scope="module")
def bf16_model(tiny_path):
    return load_model(str(tiny_path), None, "cpu", "auto")


def test_the_tiny_fp8_checkpoint_has_the_modelopt_layout_and_loads_with_no_key_problem(tiny_fp8_path, fp8_model):
    config = json.loads((tiny_fp8_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert json.loads((tiny_fp8_path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    index = json.loads((tiny_fp8_path / "model.safetensors.index.json").read_text())["weight_map"]
    layer = "language_model.backbone.layers.0.mixer.in_proj"
    assert {f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.input_scale"} <= set(index)
    with safe_open(str(tiny_fp8_path / index[f"{layer}.weight"]), "pt") as f:
        assert f.get_tensor(f"{layer}.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor(f"{layer}.input_scale").dtype == torch.float32

    model = fp8_meta_model(read_config(tiny_fp8_path), checkpoint_quantization(tiny_fp8_path), torch.float32)
    report = load_weights(model, tiny_fp8_path, torch.device("cpu"), torch.float32)
    assert report.problems() == [] and report.missing == [] and report.ignored == []

    loaded = fp8_model[0]
    names = [name for name, _ in fp8_layers(loaded)]
    linears = [n for n, m in loaded.named_modules() if isinstance(m, nn.Linear) and n.startswith("language_model.")]
    assert len(names) == 14 and linears == ["language_model.lm_head"]  # every other LM linear is FP8
    assert not any(n.startswith(("vision_model", "mlp1")) for n in names)
    for _, layer in fp8_layers(loaded):
        assert layer.weight.dtype == torch.float8_e4m3fn and float(layer.input_scale) > 0
        assert float(layer.weight_scale) > 0 and layer.path == fp8.DEQUANT


def _prefill_logits(model, prompts):
    from model.forward import SlotForward
    from model.state_pool import StatePool

    pool = StatePool(model.config.text_config, len(prompts), 256, torch.float32, torch.float32, torch.device("cpu"))
    forward = SlotForward(model.language_model, pool)
    return forward.prefill(list(range(len(prompts))), [model.embed_tokens(torch.tensor(p)) for p in prompts],
                           [0] * len(prompts))


# FP8 keeps 3 mantissa bits: on the tiny random model the logits move by about 10% (relative RMS per
# prompt); a wrong scale moves them by orders of magnitude.
LOGITS_RELATIVE_RMS = 0.2
LOGITS_COSINE = 0.98


def test_fp8_logits_stay_within_tolerance_of_bf16(fp8_model, bf16_model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(20, 600, (n,), generator=g).tolist() for n in (3, 9, 24, 50, 80)]
    with torch.inference_mode():
        reference, quantized = _prefill_logits(bf16_model[0], prompts), _prefill_logits(fp8_model[0], prompts)
    relative = (quantized - reference).norm(dim=-1) / reference.norm(dim=-1)
    cosine = torch.nn.functional.cosine_similarity(quantized, reference, dim=-1)
    assert float(relative.max()) < LOGITS_RELATIVE_RMS, relative.tolist()
    assert float(cosine.min()) > LOGITS_COSINE, cosine.tolist()


def _greedy(loaded, jobs, steps):
    """Greedy token ids, through the runner (images encoded, prefill and decode on the slot pool)."""
    model, tokenizer, path = loaded
    runner = NemotronRunner(model, tokenizer, len(jobs), 4096, model_path=path)
    out = []
    for slot, job in enumerate(jobs):
        prompt = runner.prepare(job)
        runner.encode_images([prompt])
        token = int(runner.forward.prefill([slot], [prompt.payload.embeds], [0])[0].argmax())
        tokens = [token]
        for _ in range(steps - 1):
            tokens.append(int(runner.decode([slot], [tokens[-1]])[0].argmax()))
        out.append(tokens)
    return out


def test_greedy_captions_mostly_agree(fp8_model, bf16_model):
    jobs = [make_job([noise_image(96 + 40 * i, 80, seed=i)], text) for i, text in
            enumerate(["Caption the content of this image:", "Describe the chart.", "What is this?", "Read it."])]
    steps = 8
    with torch.inference_mode():
        reference, quantized = _greedy(bf16_model, jobs, steps), _greedy(fp8_model, jobs, steps)
    same_prefix = [next((i for i, (a, b) in enumerate(zip(r, q)) if a != b), steps)
                   for r, q in zip(reference, quantized)]
    # Mostly: every first token, and at least half of all tokens before the first divergence.
    assert all(n >= 1 for n in same_prefix), (reference, quantized)
    assert sum(same_prefix) >= len(jobs) * steps // 2, (same_prefix, reference, quantized)


def _rewrite(folder, change):
    """Apply change(name, tensors) to every shard of a checkpoint copy (tensors: its dict, changed in place)."""
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        change(tensors)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: v for shard in folder.glob("*.safetensors")
                          for k in safe_open(str(shard), "pt").keys() for v in [shard.name]}
    index.write_text(json.dumps(data))


def test_a_missing_scale_or_a_bf16_weight_is_refused_in_one_line(tiny_fp8_path, tmp_path):
    layer = "language_model.backbone.layers.2.mixer.out_proj"
    missing = shutil.copytree(tiny_fp8_path, tmp_path / "missing")
    _rewrite(missing, lambda t: t.pop(f"{layer}.input_scale", None))
    with pytest.raises(RuntimeError) as refused:
        load_model(str(missing), None, "cpu", "auto")
    message = str(refused.value)
    assert "\n" not in message and "without their per-tensor scales" in message
    assert "language_model.model.layers.2.mixer.out_proj" in message and "(1 layers in all)" in message

    wide = shutil.copytree(tiny_fp8_path, tmp_path / "wide")

    def widen(tensors):
        if f"{layer}.weight" in tensors:
            tensors[f"{layer}.weight"] = tensors[f"{layer}.weight"].to(torch.bfloat16)
    _rewrite(wide, widen)
    with pytest.raises(RuntimeError, match=r"dtype mismatch: \['language_model.backbone.layers.2.mixer.out_proj"):
        load_model(str(wide), None, "cpu", "auto")

    excluded = shutil.copytree(tiny_fp8_path, tmp_path / "excluded")
    config = json.loads((excluded / "config.json").read_text())
    config["quantization_config"]["ignore"].append(layer)  # the list keeps it in bf16; the file has it in FP8
    (excluded / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError) as refused:
        load_model(str(excluded), None, "cpu", "auto")
    assert f"{layer}.weight: torch.float8_e4m3fn in a layer that the exclude list keeps" in str(refused.value)
    assert "unexpected: [" in str(refused.value) and f"{layer}.weight_scale" in str(refused.value)


def test_quantization_fp8_builds_random_fp8_weights_under_load_format_dummy(tiny_path):
    model, _, _ = load_model(str(tiny_path), None, "cpu", "auto", load_format="dummy", quantization="fp8")
    layers = fp8_layers(model)
    assert len(layers) == 14 and isinstance(model.language_model.lm_head, nn.Linear)
    assert all(layer.weight.dtype == torch.float8_e4m3fn for _, layer in layers)
    with pytest.raises(ValueError, match="is not an FP8 checkpoint"):
        load_model(str(tiny_path), None, "cpu", "auto", quantization="fp8")

    from model.engine import load_engine
    from tests.model.tiny_helpers import run

    engine = load_engine(str(tiny_path), None, device="cpu", max_num_tiles=1, max_running=2, max_seq_len=2048,
                         load_format="dummy", quantization="fp8")
    assert len(fp8_layers(engine.runner.model)) == 14
    (text, _, last, _), = run(engine, [make_job([noise_image(64, 64, 0)], "Caption:", max_tokens=4)])
    assert last.completion_tokens == 4


def test_full_size_weight_bytes_of_each_variant_are_those_the_readme_gives():
    """Computed from the architecture (meta device): the FP8 variant keeps the LM head, the embeddings, the
    vision encoder and the projector in bf16, and matches the 15.4 GB that NVIDIA's FP8 files take."""
    from model.config import translate_config
    from model.official import OFFICIAL_CONFIG
    from tests.helpers import ROOT

    config = translate_config(OFFICIAL_CONFIG)
    bf16 = weight_bytes(build_model(config, "meta")) // 2  # meta parameters are float32: two bytes each in bf16
    fp8_model = fp8_meta_model(config, DUMMY_FP8)
    fp8_bytes = sum(t.numel() * (1 if t.dtype == torch.float8_e4m3fn else 4 if name.endswith("_scale") else 2)
                    for name, t in fp8_model.named_parameters())
    assert len(fp8_layers(fp8_model)) == 136
    assert round(bf16 / 1e9, 1) == 26.3 and round(fp8_bytes / 1e9, 1) == 15.4
    readme = (ROOT / "README.md").read_text()
    assert f"{bf16 / 2**30:.1f} GiB" in readme and f"{fp8_bytes / 2**30:.1f} GiB" in readme
