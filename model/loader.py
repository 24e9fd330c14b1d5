"""Find, check and load a `NemotronH_Nano_VL_V2` checkpoint (hub id or local folder) without remote code."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerFast

from model.architecture import NemotronNanoVLV2
from model.config import VLConfig, translate_config
from model.official import MODEL_ID
from model.quantization import (Fp8Linear, QuantConfig, UnsupportedQuantization, prepare_fp8_layers,
                                read_quant_config, replace_linears)
from model.quantization.fp8 import FP8, SCALE_NAMES
from model.weights import iter_native

log = logging.getLogger(__name__)

_FULL_SIZE_LLM_HIDDEN = 5120

_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]

NO_GPU_MESSAGE = (
    "MODEL_ID={model_id} is the full 12B model, which needs a CUDA GPU, and none is visible.\n"
    "  - To run the API without a model: ENABLE_MOCK_INFERENCE=1\n"
    "  - To run the real engine on CPU with a tiny random checkpoint:\n"
    "        python -m model.tiny /tmp/tiny-nemotron-vl && MODEL_ID=/tmp/tiny-nemotron-vl DEVICE=cpu ...\n"
    "  - To force the 12B model onto the CPU anyway (very slow, ~50 GB RAM): DEVICE=cpu"
)


def resolve_device(device: str) -> torch.device:
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype in ("", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"DTYPE={dtype!r} is not a torch dtype (try bfloat16, float16, float32, auto)")
    return resolved


def _is_full_size(model_id: str) -> bool:
    if model_id == MODEL_ID or model_id.startswith(MODEL_ID.removesuffix("BF16")):  # -BF16, -FP8, -NVFP4-QAD
        return True
    config_path = Path(model_id) / "config.json"
    if config_path.is_file():
        try:
            llm = json.loads(config_path.read_text()).get("llm_config", {})
        except (OSError, ValueError):
            return False
        return int(llm.get("hidden_size", 0)) >= _FULL_SIZE_LLM_HIDDEN
    return False


def check_can_run(model_id: str, device: str) -> None:
    """Refuse early (SystemExit with advice) when the configured model cannot run on this machine."""
    check_model_folder(model_id)
    wants_cuda = device.startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        raise SystemExit(f"DEVICE={device} but no CUDA GPU is visible.\n" + NO_GPU_MESSAGE.format(model_id=model_id))
    if device != "cpu" and not torch.cuda.is_available() and _is_full_size(model_id):
        raise SystemExit(NO_GPU_MESSAGE.format(model_id=model_id))


def check_model_folder(model_id: str) -> None:
    """A MODEL_ID written as a path must be a checkpoint folder: say so in one line, before any worker starts
    (a path that does not exist would otherwise be taken for a hub id and fail deep in a worker)."""
    if not model_id.startswith(("/", "./", "../", "~")):
        return
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        raise SystemExit(f"MODEL_ID={model_id}: no such folder. Point MODEL_ID at a checkpoint folder (config.json, "
                         "*.safetensors, tokenizer files) or at a hub id such as " + MODEL_ID)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"MODEL_ID={model_id}: the folder has no config.json, so it is not a checkpoint "
                         "(python -m model.tiny DIR writes a small one for trying the service on a CPU)")
    try:
        read_quant_config(folder)
    except UnsupportedQuantization as exc:
        raise SystemExit(f"MODEL_ID={model_id}: {exc}") from None


def check_model_source(model_id: str, revision: str | None = None) -> None:
    """A hub MODEL_ID must be in the download cache or on a reachable hub: say which problem it is, in one
    line, before any worker starts (the worker's download would otherwise fail deep in a traceback)."""
    if Path(model_id).expanduser().is_dir():
        return
    from huggingface_hub import HfApi, constants, errors, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(model_id, "config.json", revision=revision), str):
            return  # downloaded before: the worker loads it from the cache
        HfApi().model_info(model_id, revision=revision, timeout=15, token=os.environ.get("HF_TOKEN") or None)
    except errors.HFValidationError:
        problem = "not a folder here, nor a valid hub id (owner/name)"
    except errors.GatedRepoError:
        problem = "the hub grants access to this model only with a token that was granted it: set HF_TOKEN"
    except errors.RepositoryNotFoundError:
        problem = "no such model on the hub (check the spelling; a private model needs HF_TOKEN)"
    except errors.RevisionNotFoundError:
        problem = f"the hub has no revision MODEL_REVISION={revision}"
    except errors.OfflineModeIsEnabled:
        problem = f"not in the download cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set"
    except Exception as exc:  # noqa: BLE001 - any network failure: the advice is the same
        problem = (f"not in the download cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached "
                   f"({type(exc).__name__})")
    else:
        return
    raise SystemExit(f"MODEL_ID={model_id}: {problem}. Point MODEL_ID at a local checkpoint folder, or fill the "
                     "cache (HF_HOME) where the hub is reachable.")


def resolve_model_path(model_id: str, revision: str | None = None, local_only: bool = False) -> Path:
    """A local folder is used as is; anything else is downloaded (with progress bars) from the hub, or
    with `local_only` taken from the download cache alone."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download  # honours HF_HOME and HF_HUB_* env vars

    path = snapshot_download(
        repo_id=model_id,
        revision=revision or None,
        token=os.environ.get("HF_TOKEN") or None,
        allow_patterns=_DOWNLOAD_PATTERNS,
        local_files_only=local_only,
    )
    return Path(path)


def read_config(path: Path) -> VLConfig:
    return translate_config(json.loads((path / "config.json").read_text()))


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    # The fast tokenizer file plus tokenizer_config.json (chat template included); no remote code involved.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    if not tokenizer.chat_template:
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            tokenizer.chat_template = jinja.read_text()
        else:
            raise ValueError(f"{path} has no chat template (tokenizer_config.json or chat_template.jinja)")
    return tokenizer


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    dtype_mismatch: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # FP8 KV-cache scales: the KV cache stays in the serving dtype

    @property
    def missing_scales(self) -> list[str]:
        return [name for name in self.missing if name.rpartition(".")[2] in SCALE_NAMES]

    def problems(self) -> list[str]:
        problems = []
        scales = self.missing_scales
        if scales:
            layers = sorted({name.rpartition(".")[0] for name in scales})
            problems.append(f"FP8 layers without their per-tensor scales (weight_scale and input_scale both "
                            f"needed): {layers[:5]} ({len(layers)} layers in all)")
        missing = [name for name in self.missing if name not in set(scales)]
        if missing:
            problems.append(f"missing: {missing[:10]} ({len(missing)} in all)")
        if self.unexpected:
            problems.append(f"unexpected: {self.unexpected[:10]} ({len(self.unexpected)} in all)")
        if self.shape_mismatch:
            problems.append(f"shape mismatch: {self.shape_mismatch[:10]}")
        if self.dtype_mismatch:
            problems.append(f"dtype mismatch: {self.dtype_mismatch[:10]} ({len(self.dtype_mismatch)} in all)")
        return problems


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored: FP8 layers count one byte a weight."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def fp8_meta_model(config: VLConfig, quant: QuantConfig, dtype: torch.dtype = torch.bfloat16) -> NemotronNanoVLV2:
    """The architecture on the meta device with the quantized linears in FP8 (for loading, and for sizing)."""
    model = build_model(config, "meta")
    replace_linears(model, quant, lambda name, linear: Fp8Linear(
        linear.in_features, linear.out_features, linear.bias is not None, "meta", dtype))
    return model


def build_model(config: VLConfig, device: torch.device | str = "meta") -> NemotronNanoVLV2:
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    with torch.device(device):
        return NemotronNanoVLV2(config)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return files


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


# The Mamba mixers' per-head scalars stay in float32 whatever the serving dtype (as vLLM keeps them): the
# time step and the decay exp(dt * A) are computed in float32, and a bfloat16 A_log moves every decay.
FLOAT32_PARAMETERS = ("A_log", "D", "dt_bias")


def _serving_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if name.rpartition(".")[2] in FLOAT32_PARAMETERS and ".mixer." in name else dtype


def _keep_float32_parameters(model: nn.Module) -> None:
    for name, param in list(model.named_parameters()):
        if _serving_dtype(name, param, param.dtype) == torch.float32 and param.dtype != torch.float32:
            _set_tensor(model, name, param.detach().float())


_KV_CACHE_SCALES = ("k_scale", "v_scale")


def load_weights(model: NemotronNanoVLV2, path: Path, device: torch.device, dtype: torch.dtype) -> LoadReport:
    """Stream official tensors into a meta-device model; report every key that does not line up.

    FP8 layers (Fp8Linear) take their E4M3 weights as they are and their scales in float32 (a scale stored
    with shape [1] is a scalar); a higher-precision weight where an FP8 one is expected is a mismatch."""
    expected = {k: v for k, v in model.state_dict().items()}
    quantized = any(isinstance(m, Fp8Linear) for m in model.modules())
    seen: set[str] = set()
    report = LoadReport()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for native_name, tensor, official_name in iter_native((k, f.get_tensor(k)) for k in f.keys()):
                if quantized and official_name.rpartition(".")[2] in _KV_CACHE_SCALES:
                    report.ignored.append(official_name)
                    continue
                if tensor is None or native_name not in expected:
                    report.unexpected.append(official_name)
                    continue
                want = expected[native_name]
                if native_name.rpartition(".")[2] in SCALE_NAMES and tensor.numel() == 1 and want.dim() == 0:
                    tensor = tensor.reshape(())
                if tuple(tensor.shape) != tuple(want.shape):
                    report.shape_mismatch.append(f"{official_name}: {tuple(tensor.shape)} vs {tuple(want.shape)}")
                    continue
                if want.dtype == FP8 and tensor.dtype != FP8:
                    report.dtype_mismatch.append(f"{official_name}: {tensor.dtype} where the FP8 layer needs {FP8}")
                    continue
                if tensor.dtype == FP8 and want.dtype != FP8:  # stored in FP8, yet excluded from quantization
                    report.dtype_mismatch.append(f"{official_name}: {FP8} in a layer that the exclude list keeps "
                                                 "in higher precision")
                    continue
                if want.dtype == FP8 or native_name.rpartition(".")[2] in SCALE_NAMES:
                    target_dtype = want.dtype  # E4M3 weights as they are, scales in float32
                else:
                    target_dtype = _serving_dtype(native_name, tensor, dtype)
                _set_tensor(model, native_name, tensor.to(device=device, dtype=target_dtype))
                seen.add(native_name)
    report.missing = sorted(set(expected) - seen)
    # Non-persistent buffers are no checkpoint keys; rebuild the one we have (RADIO summary_idxs) for real.
    summary = torch.tensor(model.config.vision_config.summary_idxs, dtype=torch.long, device=device)
    model.vision_model._buffers["summary_idxs"] = summary
    return report


@torch.no_grad()
def init_random_weights(model: NemotronNanoVLV2, seed: int = 0) -> None:
    """Random weights that keep activations in range: fan-in-scaled linears, unit-variance embeddings.

    (The 0.02 default init makes a random network nearly blind to its input, so outputs would not
    depend on the image or prompt, and batch-invariance checks could not tell requests apart.)
    """
    generator = torch.Generator(device=model.mlp1.linear_1.weight.device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, module.in_features**-0.5, generator=generator)
    model.language_model.model.embeddings.weight.normal_(0.0, 1.0, generator=generator)
    model.vision_model.embeddings.position_embedding.normal_(0.0, 1.0, generator=generator)


def build_random_model(config: VLConfig, device: torch.device, dtype: torch.dtype) -> NemotronNanoVLV2:
    """LOAD_FORMAT=dummy: the architecture with random weights, built directly on the device."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in the serving dtype: no float32 copy of 12B
    try:
        model = build_model(config, device)
    finally:
        torch.set_default_dtype(default)
    init_random_weights(model)
    _keep_float32_parameters(model)
    return model


# Random FP8 weights (LOAD_FORMAT=dummy QUANTIZATION=fp8) leave the LM head in the serving dtype, as
# ModelOpt's FP8 recipe does; their activations get one static scale (amax 16): benchmarks, not captions.
DUMMY_FP8 = QuantConfig(exclude_modules=("*lm_head*",), source="QUANTIZATION=fp8 (random weights)")
DUMMY_INPUT_SCALE = 16.0 / 448.0


def checkpoint_quantization(path: Path, quantization: str = "auto", load_format: str = "safetensors"
                            ) -> QuantConfig | None:
    """What the checkpoint declares, checked against QUANTIZATION (auto: whatever the checkpoint is; fp8:
    an FP8 checkpoint, or random FP8 weights under LOAD_FORMAT=dummy)."""
    declared = read_quant_config(path)
    if quantization in ("", "auto") or declared is not None:
        return declared
    if quantization != "fp8":
        raise ValueError(f"QUANTIZATION={quantization!r}: supported are auto and fp8")
    if load_format == "dummy":
        return DUMMY_FP8
    raise ValueError(f"QUANTIZATION=fp8 but {path} is not an FP8 checkpoint (neither config.json's "
                     "quantization_config nor hf_quant_config.json says so); this service does not quantize "
                     "BF16 weights at load (QUANTIZATION=fp8 with LOAD_FORMAT=dummy builds random FP8 weights)")


def load_model(
    model_id: str, revision: str | None, device: str = "auto", dtype: str = "auto", load_format: str = "safetensors",
    quantization: str = "auto",
) -> tuple[NemotronNanoVLV2, PreTrainedTokenizerFast, Path]:
    path = resolve_model_path(model_id, revision)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = read_config(path)
    quant = checkpoint_quantization(path, quantization, load_format)
    if load_format == "dummy":
        log.warning("LOAD_FORMAT=dummy: random weights (for benchmarks; captions are meaningless)")
        model = build_random_model(config, torch_device, torch_dtype).eval()
        if quant is not None:
            replace_linears(model, quant, lambda name, linear: Fp8Linear.from_linear(linear, DUMMY_INPUT_SCALE))
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()  # the bf16 weights just replaced
            log.info(prepare_fp8_layers(model, torch_device))
        log.info("random weights on %s as %s: %.2f GiB", torch_device, torch_dtype, weight_bytes(model) / 2**30)
        return model, load_tokenizer(path), path
    if quant is not None:
        model = fp8_meta_model(config, quant, torch_dtype)
        log.info("ModelOpt %s checkpoint (%s): %d linear layers of the language model in FP8; excluded: %s",
                 quant.algo, quant.source, sum(isinstance(m, Fp8Linear) for m in model.modules()),
                 list(quant.exclude_modules)[:8])
    else:
        model = build_model(config, "meta")
    report = load_weights(model, path, torch_device, torch_dtype)
    problems = report.problems()
    if problems:
        raise RuntimeError(f"checkpoint {path} does not match the architecture: " + "; ".join(problems))
    if report.ignored:
        log.info("ignored %d FP8 KV-cache scales: the KV cache stays in %s", len(report.ignored), torch_dtype)
    model.eval()
    if quant is not None:
        log.info(prepare_fp8_layers(model, torch_device))
    tokenizer = load_tokenizer(path)
    log.info("loaded %s on %s as %s%s: %.2f GiB of weights", path, torch_device, torch_dtype,
             " with FP8 linear layers" if quant else "", weight_bytes(model) / 2**30)
    return model, tokenizer, path
