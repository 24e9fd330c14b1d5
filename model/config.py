"""Translate the official `NemotronH_Nano_VL_V2` config.json into transformers' native configurations.

The official checkpoint ships remote code (`configuration.py`/`modeling.py`, transformers 4.53, mamba-ssm
GPU kernels). We never execute it: this module reads the same JSON and builds

* a native `NemotronHConfig` for the language model (from `llm_config`),
* a native `RadioConfig` for the vision tower (from `vision_config`, whose real settings hide in the
  RADIO training `args`), and
* a small `VLConfig` holding the glue (tile size, pixel shuffle, projector width, image tokens, pixel
  normalisation).

RADIO settings, and where they come from (see docs/MODEL.md for the full list):

* ViT geometry comes from the timm model name in `vision_config.args.model`;
  `vit_huge_patch16_224` is width 1280, 32 blocks, 16 heads, MLP ratio 4 (timm; the same table is in
  vLLM `transformers_utils/configs/radio.py` and SGLang `configs/radio.py`; Megatron-Bridge's
  `NemotronNano12Bv2VLModelProvider` builds the tower with 32 layers, 16 heads, 1280/5120, LayerNorm
  eps 1e-6, qkv and linear biases).
* Class tokens: one per unique teacher name when `cls_token_per_teacher` is set, else one; registers:
  `register_multiple - (num_cls % register_multiple)` (vLLM `radio.py::ClsToken`). For C-RADIOv2-H
  (4 teachers, register_multiple 8) that is 4 + 4 = 8 prefix rows in `cls_token.token`, which matches
  Megatron's RADIO default `class_token_len=8`.
* Position table: CPE with `cpe_max_size` 2048 rounded to the patch size -> 128 x 128 positions,
  interpolated (bilinear, align_corners=False) to each input's grid (vLLM `radio.py::ViTPatchGenerator`,
  transformers `RadioPatchEmbeddings`).
* Pixel normalisation is done by our preprocessor with the top-level `norm_mean`/`norm_std`; the RADIO
  input conditioner is detached, as vLLM does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from transformers import NemotronHConfig, RadioConfig

# timm ViT geometry by model name: (width, depth, heads, mlp_ratio).
TIMM_VIT_GEOMETRY: dict[str, tuple[int, int, int, float]] = {
    "vit_small_patch16_224": (384, 12, 6, 4.0),
    "vit_base_patch16_224": (768, 12, 12, 4.0),
    "vit_large_patch16_224": (1024, 24, 16, 4.0),
    "vit_huge_patch16_224": (1280, 32, 16, 4.0),
}

# timm keyword names that a RADIO `args` block may carry to override the named geometry
# (our tiny checkpoint uses them; the official one does not).
_GEOMETRY_OVERRIDES = ("embed_dim", "depth", "num_heads", "mlp_ratio")

# Legacy spellings that NemotronHConfig.__post_init__ still understands.
_NEMOTRON_H_LEGACY_KEYS = {
    "hybrid_override_pattern",
    "mtp_hybrid_override_pattern",
    "mamba_n_groups",
    "mamba_d_conv",
    "mamba_expand",
    "mamba_dt_min",
    "mamba_dt_max",
    "mamba_dt_limit",
    "mamba_dt_init_floor",
    "mamba_conv_bias",
    "mamba_chunk_size",
    "num_hidden_layers",
}

OFFICIAL_MODEL_TYPE = "NemotronH_Nano_VL_V2"


@dataclass
class VLConfig:
    """Everything the engine needs, with the towers' configs in their native transformers classes."""

    text_config: NemotronHConfig
    vision_config: RadioConfig
    image_size: int  # tile side in pixels (force_image_size)
    patch_size: int
    downsample_ratio: float
    projector_hidden_size: int
    vit_hidden_size: int
    norm_mean: tuple[float, float, float]
    norm_std: tuple[float, float, float]
    img_context_token: str
    img_start_token: str
    img_end_token: str
    img_context_token_id: int | None

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return int(side * side * self.downsample_ratio**2)

    @property
    def projector_input_size(self) -> int:
        return self.vit_hidden_size * int(round(1 / self.downsample_ratio)) ** 2


def _float_triplet(values: Any, name: str) -> tuple[float, float, float]:
    triplet = tuple(float(v) for v in values)
    if len(triplet) != 3:
        raise ValueError(f"{name} must have 3 values, got {values!r}")
    return triplet  # type: ignore[return-value]


def text_config_from_official(llm_config: dict) -> NemotronHConfig:
    """Keep the keys NemotronHConfig knows (fields plus legacy aliases); drop remote-code extras."""
    known = {f.name for f in dataclasses.fields(NemotronHConfig)} | _NEMOTRON_H_LEGACY_KEYS
    kwargs = {k: v for k, v in llm_config.items() if k in known}
    # `layers_block_type` wins over the legacy pattern inside NemotronHConfig; the official file only has the pattern.
    kwargs.pop("model_type", None)
    return NemotronHConfig(**kwargs)


def radio_args(vision_config: dict) -> dict:
    args = vision_config.get("args")
    if not isinstance(args, dict) or "model" not in args:
        raise ValueError("vision_config.args.model is missing: not a RADIO vision_config")
    return args


def num_cls_and_registers(args: dict) -> tuple[int, int]:
    teachers = args.get("teachers") or []
    if args.get("cls_token_per_teacher", False) and teachers:
        num_cls = len({t["name"] for t in teachers})
    else:
        num_cls = 1
    if args.get("cpe_num_registers"):
        return num_cls, int(args["cpe_num_registers"])
    multiple = args.get("register_multiple")
    num_registers = multiple - (num_cls % multiple) if multiple else 0
    return num_cls, num_registers


def summary_indices(args: dict) -> list[int]:
    teachers = args.get("teachers") or []
    if not (args.get("cls_token_per_teacher", False) and teachers):
        return [0]
    first_index: dict[str, int] = {}
    for i, teacher in enumerate(teachers):
        if teacher.get("use_summary", True):
            first_index.setdefault(teacher["name"], i)
    return sorted(first_index.values()) or [0]


def vision_config_from_official(
    vision_config: dict, norm_mean: tuple[float, ...], norm_std: tuple[float, ...], patch_size: int
) -> RadioConfig:
    args = radio_args(vision_config)
    name = args["model"]
    if name in TIMM_VIT_GEOMETRY:
        width, depth, heads, mlp_ratio = TIMM_VIT_GEOMETRY[name]
    elif all(k in args for k in _GEOMETRY_OVERRIDES[:3]):
        width, depth, heads, mlp_ratio = 0, 0, 0, 4.0
    else:
        raise ValueError(f"unknown RADIO ViT {name!r}; known: {sorted(TIMM_VIT_GEOMETRY)}")
    width = int(args.get("embed_dim", width))
    depth = int(args.get("depth", depth))
    heads = int(args.get("num_heads", heads))
    mlp_ratio = float(args.get("mlp_ratio", mlp_ratio))

    num_cls, num_registers = num_cls_and_registers(args)
    cpe_max_size = int(args.get("cpe_max_size") or vision_config.get("max_resolution") or 2048)
    max_img_size = int(round(cpe_max_size / patch_size) * patch_size)
    preferred = vision_config.get("preferred_resolution") or [224]
    return RadioConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        mlp_ratio=mlp_ratio,
        hidden_act="gelu",  # timm ViT uses exact nn.GELU
        layer_norm_eps=1e-6,  # timm ViT LayerNorm eps
        qkv_bias=True,
        patch_size=patch_size,
        image_size=int(preferred[0]),
        max_img_size=max_img_size,
        num_cls_tokens=num_cls,
        num_registers=num_registers,
        video_temporal_patch_size=None,  # v2 has no separate video embedder
        summary_idxs=summary_indices(args),
        norm_mean=list(norm_mean),
        norm_std=list(norm_std),
    )


def translate_config(official: dict) -> VLConfig:
    """Official config.json (as a dict) -> VLConfig with native sub-configs."""
    model_type = official.get("model_type")
    if model_type != OFFICIAL_MODEL_TYPE:
        raise ValueError(f"expected model_type {OFFICIAL_MODEL_TYPE!r}, got {model_type!r}")
    if official.get("ps_version", "v2") != "v2":
        raise ValueError(f"only pixel shuffle v2 is supported, got {official.get('ps_version')!r}")
    for key in ("llm_config", "vision_config"):
        if not isinstance(official.get(key), dict):
            raise ValueError(f"config.json has no {key} object")

    norm_mean = _float_triplet(official["norm_mean"], "norm_mean")
    norm_std = _float_triplet(official["norm_std"], "norm_std")
    patch_size = int(official.get("patch_size") or official["vision_config"].get("patch_size", 16))
    text_config = text_config_from_official(official["llm_config"])
    vision_config = vision_config_from_official(official["vision_config"], norm_mean, norm_std, patch_size)
    vit_hidden_size = int(official.get("vit_hidden_size", vision_config.hidden_size))
    if vit_hidden_size != vision_config.hidden_size:
        raise ValueError(f"vit_hidden_size {vit_hidden_size} != RADIO width {vision_config.hidden_size}")
    if not official.get("use_thumbnail", True):
        raise ValueError("use_thumbnail is false; this service tiles images with a thumbnail, as the official "
                         "checkpoint does (model/tiling.py)")
    return VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_size=int(official.get("force_image_size") or 512),
        patch_size=patch_size,
        downsample_ratio=float(official.get("downsample_ratio", 0.5)),
        projector_hidden_size=int(official["projector_hidden_size"]),
        vit_hidden_size=vit_hidden_size,
        norm_mean=norm_mean,
        norm_std=norm_std,
        img_context_token=official.get("img_context_token", "<image>"),
        img_start_token=official.get("img_start_token", "<img>"),
        img_end_token=official.get("img_end_token", "</img>"),
        img_context_token_id=official.get("img_context_token_id"),
    )
