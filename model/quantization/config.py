"""Which quantization a checkpoint folder declares, read from its config files (before any weight is read).

NVIDIA's FP8 release of the model is a TensorRT Model Optimizer (ModelOpt) export. It declares itself in
`hf_quant_config.json` (`{"quantization": {"quant_algo": "FP8", "exclude_modules": [...]}}`) and/or in
`config.json`'s `quantization_config` (`{"quant_method": "modelopt", "quant_algo": "FP8", "ignore": [...]}`).
Supported: none (BF16 weights), and ModelOpt FP8 with per-tensor static scales (`quant_algo: FP8`). Any
other method or algorithm is refused at start with one line saying what was found and what is supported.

`exclude_modules` / `ignore` hold ModelOpt wildcards over the official module names
(`language_model.backbone.layers.3.mixer.in_proj`, `language_model.lm_head`, `vision_model*`, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

SUPPORTED = "supported: no quantization (BF16), or ModelOpt FP8 (quant_method modelopt, quant_algo FP8)"


class UnsupportedQuantization(ValueError):
    """A checkpoint whose quantization this service cannot run; the message is one line."""


@dataclass(frozen=True)
class QuantConfig:
    """A ModelOpt FP8 checkpoint: E4M3 weights and activations, per-tensor static scales."""

    algo: str = "FP8"
    exclude_modules: tuple[str, ...] = ()
    kv_cache_algo: str | None = None
    source: str = ""  # the file it was read from, for the log

    def is_excluded(self, official_module: str) -> bool:
        """True when the module stays in the serving dtype. A pattern matches as a ModelOpt wildcard, also
        without the `language_model.` prefix, and a pattern `a.b*` also covers `a.b` itself."""
        bare = official_module.removeprefix("language_model.")
        for pattern in self.exclude_modules:
            for name in (official_module, bare):
                if fnmatch(name, pattern) or (pattern.endswith("*") and name == pattern.rstrip("*").rstrip(".")):
                    return True
        return False


def _modelopt_section(data: dict) -> tuple[str, str, list, str | None]:
    """(quant_method, quant_algo, exclude list, kv cache algo) from either ModelOpt form."""
    if isinstance(data.get("quantization"), dict):  # hf_quant_config.json
        section = data["quantization"]
        producer = data.get("producer")
        method = str(producer.get("name", "modelopt")) if isinstance(producer, dict) else "modelopt"
        return (method, str(section.get("quant_algo") or ""), section.get("exclude_modules") or [],
                section.get("kv_cache_quant_algo"))
    method = str(data.get("quant_method") or "")
    kv = data.get("kv_cache_quant_algo")
    scheme = data.get("kv_cache_scheme")
    if kv is None and isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        kv = "FP8"
    exclude = data.get("ignore", data.get("exclude_modules")) or []
    return method, str(data.get("quant_algo") or ""), exclude, kv


def read_quant_config(folder: Path, config: dict | None = None) -> QuantConfig | None:
    """The checkpoint's quantization (None: unquantized); UnsupportedQuantization for anything we cannot run."""
    if config is None:
        config = json.loads((folder / "config.json").read_text())
    found: list[tuple[str, dict]] = []
    if isinstance(config.get("quantization_config"), dict):
        found.append(("config.json quantization_config", config["quantization_config"]))
    hf_quant = folder / "hf_quant_config.json"
    if hf_quant.is_file():
        try:
            found.append(("hf_quant_config.json", json.loads(hf_quant.read_text())))
        except ValueError as exc:
            raise UnsupportedQuantization(f"{hf_quant} is not valid JSON ({exc}); {SUPPORTED}") from None
    if not found:
        return None
    exclude: list[str] = []
    algo = kv = None
    for where, data in found:
        method, this_algo, this_exclude, this_kv = _modelopt_section(data)
        if not method.lower().startswith("modelopt"):
            raise UnsupportedQuantization(f"{where} declares quant_method {method or 'none'!r}; {SUPPORTED}")
        this_algo = this_algo.upper()
        if this_algo != "FP8":
            what = ("NVFP4 (4-bit weights with FP8 block scales), which this service does not load"
                    if "NVFP4" in this_algo else f"quant_algo {this_algo or 'none'!r}")
            raise UnsupportedQuantization(f"{where} declares ModelOpt {what}; {SUPPORTED}")
        if not isinstance(this_exclude, list):
            raise UnsupportedQuantization(f"{where}: the exclude list is a {type(this_exclude).__name__}, not a "
                                          f"list; {SUPPORTED}")
        algo = this_algo
        kv = kv or this_kv
        exclude += [str(p) for p in this_exclude if str(p) not in exclude]
    return QuantConfig(algo=algo or "FP8", exclude_modules=tuple(exclude), kv_cache_algo=kv,
                       source=" and ".join(where for where, _ in found))


def quantization_of(folder: Path) -> str:
    """"fp8" or "none", for names and metadata (raises UnsupportedQuantization as read_quant_config does)."""
    return "fp8" if read_quant_config(folder) is not None else "none"


def declared_quantization(model_id: str, revision: str | None = None) -> str:
    """"fp8" or "none" for a MODEL_ID, without loading anything: a folder's config files, a hub id's from the
    download cache, else the hub id's name (NVIDIA's FP8 release ends in -FP8). For names and metadata."""
    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - not a valid hub id, say: the name decides
            cached = None
        if not isinstance(cached, str):
            return "fp8" if "fp8" in model_id.lower() else "none"
        folder = Path(cached).parent
        quant = folder / "hf_quant_config.json"
        if not quant.is_file():
            try:  # the snapshot folder may lack a file the cache knows: ask the cache for it too
                found = try_to_load_from_cache(model_id, "hf_quant_config.json", revision=revision)
                if isinstance(found, str):
                    folder = Path(found).parent
            except Exception:  # noqa: BLE001
                pass
    try:
        return quantization_of(folder)
    except (OSError, ValueError):
        return "none"  # unreadable or unsupported: the start-up checks say so
