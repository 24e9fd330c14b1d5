"""Write a ModelOpt-style FP8 checkpoint from a BF16 one: `python -m model.tiny --fp8 DIR` uses it.

Per-tensor static scales, as NVIDIA's FP8 release has them: each quantized linear's `weight_scale` is its
weight's amax / 448 and its `input_scale` the amax of its inputs over a calibration pass (random prompts
with random images through the real engine, forward pre-hooks recording the amax) / 448. The output has
the official tensor names plus `<module>.weight_scale` and `<module>.input_scale` (float32 scalars), the
weight in float8_e4m3fn, every other tensor as it was, `config.json` with a `quantization_config` and an
`hf_quant_config.json`, both naming the excluded modules. Meant for the tiny checkpoint on a CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.quantization import QuantConfig, quantized_linear_names
from model.quantization.fp8 import FP8_MAX, quantize
from model.weights import official_module_name

# What ModelOpt's FP8 recipe leaves in higher precision for this model: the LM head, the vision encoder
# and the projector (the loader keeps the last two unquantized whatever the list says).
EXCLUDE_MODULES = ["language_model.lm_head", "vision_model*", "mlp1*"]


def calibration_requests(count: int, seed: int):
    """Random prompts, each with a random image of 1 to 3 tiles, for the calibration pass."""
    from engine.request import EngineRequest, ImagePart, Message, SamplingParams, TextPart
    from model.engine import random_image

    rng = np.random.default_rng(seed)
    words = "a photo chart of the table with red blue cars people text numbers and small large".split()
    requests = []
    for i in range(count):
        text = " ".join(rng.choice(words, size=int(rng.integers(4, 24))))
        image = random_image(int(rng.choice([1, 3])), seed=seed + i)
        user = Message("user", [ImagePart(image), TextPart(text)])
        requests.append(EngineRequest(f"calibrate-{i}", [Message("system", [TextPart("/no_think")]), user],
                                      SamplingParams(max_tokens=8, temperature=1.0, seed=seed + i)))
    return requests


@torch.no_grad()
def calibrate_input_amax(source: Path, names: list[str], prompts: int = 8, seed: int = 0) -> dict[str, float]:
    """The largest |input| each named linear of the language model sees over `prompts` random requests."""
    from engine.llm_engine import LLMEngine
    from model.runner import load_runner

    runner = load_runner(str(source), None, "cpu", "float32", 4, 2048)
    amax = dict.fromkeys(names, 0.0)

    def hook(name):
        def record(module, args):
            amax[name] = max(amax[name], float(args[0].detach().abs().amax()))
        return record

    handles = [runner.model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        engine = LLMEngine(runner, 4, 512)
        for request in calibration_requests(prompts, seed):
            engine.add_request(request)
        while engine.has_unfinished():
            engine.step()
    finally:
        for handle in handles:
            handle.remove()
    return amax


def _official_tensors(source: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Shard file name -> {official name: tensor}, as the source checkpoint stores them."""
    from model.loader import safetensors_files

    shards = {}
    for file in safetensors_files(source):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            shards[file.name] = {k: f.get_tensor(k) for k in f.keys()}
    return shards


def write_fp8_checkpoint(source: str | Path, out_dir: str | Path, prompts: int = 8, seed: int = 0) -> Path:
    """The FP8 checkpoint of the BF16 checkpoint in `source`, written to `out_dir`."""
    from model.loader import build_model, read_config

    source, out = Path(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = QuantConfig(exclude_modules=tuple(EXCLUDE_MODULES))
    names = quantized_linear_names(build_model(read_config(source), "meta"), config)
    amax = calibrate_input_amax(source, names, prompts, seed)
    official = {official_module_name(name): name for name in names}

    weight_map, total = {}, 0
    for file_name, tensors in _official_tensors(source).items():
        written = {}
        for key, tensor in tensors.items():
            module, _, attr = key.rpartition(".")
            if module in official and attr == "weight":
                weight = tensor.float()
                weight_scale = (weight.abs().amax() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
                written[key] = quantize(weight, weight_scale).contiguous()
                written[f"{module}.weight_scale"] = weight_scale.reshape(()).contiguous()
                written[f"{module}.input_scale"] = torch.tensor(max(amax[official[module]], 1e-6) / FP8_MAX,
                                                                dtype=torch.float32)
            else:
                written[key] = tensor
        save_file(written, str(out / file_name), metadata={"format": "pt"})
        (out / file_name).chmod(0o644)
        weight_map.update({k: file_name for k in written})
        total += sum(t.numel() * t.element_size() for t in written.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))

    raw = json.loads((source / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": None,
                                  "ignore": EXCLUDE_MODULES}
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "tiny"},
         "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": EXCLUDE_MODULES}},
        indent=2))
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (
                "config.json", "model.safetensors.index.json", "hf_quant_config.json"):
            shutil.copy(item, out / item.name)
    return out
