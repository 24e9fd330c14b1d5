"""Official checkpoint tensor names <-> our native module names.

Official names (Megatron-Bridge `nemotron_vl_bridge.py` maps every one of them; transformers'
`conversion_mapping.py` has the same renames for `nemotron_h`, `radio` and `nemotron_h_omni`):

  language_model.backbone.*                     -> language_model.model.*
  language_model.lm_head.weight                 -> language_model.lm_head.weight
  mlp1.0 / mlp1.1 / mlp1.3                      -> mlp1.layer_norm / mlp1.linear_1 / mlp1.linear_2
  vision_model.radio_model.model.patch_generator.embedder     -> vision_model.embeddings.patch_projection
  vision_model.radio_model.model.patch_generator.pos_embed    -> vision_model.embeddings.position_embedding
  vision_model.radio_model.model.patch_generator.cls_token.token -> vision_model.embeddings.cls_register_token
  vision_model.radio_model.model.blocks.N.attn.qkv  (fused)   -> vision_model.encoder.layer.N.attention.{q,k,v}_proj
  vision_model.radio_model.model.blocks.N.attn.proj           -> vision_model.encoder.layer.N.attention.o_proj
  vision_model.radio_model.model.blocks.N.{norm1,norm2,mlp.fc1,mlp.fc2} -> same under encoder.layer.N
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

_PREFIX_RULES: list[tuple[str, str]] = [
    ("language_model.backbone.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("mlp1.0.", "mlp1.layer_norm."),
    ("mlp1.1.", "mlp1.linear_1."),
    ("mlp1.3.", "mlp1.linear_2."),
    ("vision_model.radio_model.model.patch_generator.embedder.", "vision_model.embeddings.patch_projection."),
    ("vision_model.radio_model.model.patch_generator.pos_embed", "vision_model.embeddings.position_embedding"),
    (
        "vision_model.radio_model.model.patch_generator.cls_token.token",
        "vision_model.embeddings.cls_register_token",
    ),
]

_BLOCK = re.compile(r"^vision_model\.radio_model\.model\.blocks\.(\d+)\.(.+)$")
_NATIVE_BLOCK = re.compile(r"^vision_model\.encoder\.layer\.(\d+)\.(.+)$")


def official_to_native(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """Map one official tensor to native (name, tensor) pairs; None when the name is not understood."""
    block = _BLOCK.match(name)
    if block:
        index, rest = block.groups()
        base = f"vision_model.encoder.layer.{index}."
        if rest.startswith("attn.qkv."):
            suffix = rest[len("attn.qkv.") :]
            q, k, v = tensor.chunk(3, dim=0)  # fused rows are [q; k; v]
            return [(f"{base}attention.{p}_proj.{suffix}", t) for p, t in zip("qkv", (q, k, v))]
        if rest.startswith("attn.proj."):
            return [(base + "attention.o_proj." + rest[len("attn.proj.") :], tensor)]
        if rest.split(".")[0] in ("norm1", "norm2", "mlp"):
            return [(base + rest, tensor)]
        return None
    for old, new in _PREFIX_RULES:
        if name.startswith(old):
            return [(new + name[len(old) :], tensor)]
    return None


def native_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse mapping, used to write the tiny checkpoint in the official layout."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        block = _NATIVE_BLOCK.match(name)
        if block:
            index, rest = block.groups()
            base = f"vision_model.radio_model.model.blocks.{index}."
            qkv = re.match(r"^attention\.([qkv])_proj\.(.+)$", rest)
            if qkv:
                fused.setdefault((base, qkv.group(2)), {})[qkv.group(1)] = tensor
            elif rest.startswith("attention.o_proj."):
                out[base + "attn.proj." + rest[len("attention.o_proj.") :]] = tensor
            else:
                out[base + rest] = tensor
            continue
        for old, new in _PREFIX_RULES:
            if name.startswith(new):
                out[old + name[len(new) :]] = tensor
                break
        else:
            raise KeyError(f"no official name for {name}")
    for (base, suffix), parts in fused.items():
        out[f"{base}attn.qkv.{suffix}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def iter_native(official: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor | None, str]]:
    """Yield (native_name, tensor, official_name); tensor None marks an official name we cannot place."""
    for name, tensor in official:
        mapped = official_to_native(name, tensor)
        if mapped is None:
            yield name, None, name
            continue
        for native_name, native_tensor in mapped:
            yield native_name, native_tensor, name


def official_module_name(native_module: str) -> str:
    """The official name of a native module outside the vision blocks (language model, projector, embeddings)."""
    for old, new in _PREFIX_RULES:
        if native_module.startswith(new):
            return old + native_module[len(new):]
        if native_module + "." == new:
            return old.rstrip(".")
    return native_module
