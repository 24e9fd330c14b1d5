"""The official 12B checkpoint, written down without downloading it.

`OFFICIAL_CONFIG` has the form and values of nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16's config.json:
top-level keys from SGLang `configs/nano_nemotron_vl.py` (adapted from the official configuration.py)
and vLLM `nano_nemotron_vl.py`; language-model sizes from Megatron-Bridge
`NemotronNano12Bv2VLModelProvider` (62 layers, pattern below, hidden 5120, FFN 20480, 40 heads,
8 KV groups x 128, Mamba 128 heads x 80, state 128, 8 groups, vocab 131072); projector width 20480
from the same provider (`vision_proj_cfg.ffn_hidden_size`); RADIO `args` for C-RADIOv2-H
(vit_huge_patch16_224, 4 teachers with one class token each, register_multiple 8, cpe_max_size 2048).
`img_context_token_id` is illustrative: the engine checks it against the tokenizer at load time.

`official_tensors()` lists every tensor of the official safetensors with its shape. Names: every
HF-side name in Megatron-Bridge `nemotron_vl_bridge.py::mapping_registry` (the bridge that converts the
official checkpoint both ways), expanded per layer with the hybrid pattern; shapes from the sizes above.
"""

from __future__ import annotations

from model.official import HYBRID_PATTERN, OFFICIAL_CONFIG  # noqa: F401 - re-exported for the tests


def official_tensors() -> dict[str, tuple[int, ...]]:
    hidden, vocab, ffn = 5120, 131072, 20480
    heads, kv_heads, head_dim = 40, 8, 128
    m_heads, m_head_dim, state, groups, conv = 128, 80, 128, 8, 4
    m_inner = m_heads * m_head_dim
    conv_dim = m_inner + 2 * groups * state
    t: dict[str, tuple[int, ...]] = {
        "language_model.backbone.embeddings.weight": (vocab, hidden),
        "language_model.backbone.norm_f.weight": (hidden,),
        "language_model.lm_head.weight": (vocab, hidden),
        "mlp1.0.weight": (1280 * 4,),
        "mlp1.1.weight": (20480, 1280 * 4),
        "mlp1.3.weight": (hidden, 20480),
        "vision_model.radio_model.model.patch_generator.cls_token.token": (8, 1280),
        "vision_model.radio_model.model.patch_generator.pos_embed": (1, 128 * 128, 1280),
        "vision_model.radio_model.model.patch_generator.embedder.weight": (1280, 3 * 16 * 16),
    }
    for i, kind in enumerate(HYBRID_PATTERN):
        p = f"language_model.backbone.layers.{i}."
        t[p + "norm.weight"] = (hidden,)
        if kind == "M":
            t[p + "mixer.dt_bias"] = (m_heads,)
            t[p + "mixer.A_log"] = (m_heads,)
            t[p + "mixer.D"] = (m_heads,)
            t[p + "mixer.in_proj.weight"] = (m_inner + conv_dim + m_heads, hidden)
            t[p + "mixer.conv1d.weight"] = (conv_dim, 1, conv)
            t[p + "mixer.conv1d.bias"] = (conv_dim,)
            t[p + "mixer.norm.weight"] = (m_inner,)
            t[p + "mixer.out_proj.weight"] = (hidden, m_inner)
        elif kind == "-":
            t[p + "mixer.up_proj.weight"] = (ffn, hidden)
            t[p + "mixer.down_proj.weight"] = (hidden, ffn)
        else:
            t[p + "mixer.q_proj.weight"] = (heads * head_dim, hidden)
            t[p + "mixer.k_proj.weight"] = (kv_heads * head_dim, hidden)
            t[p + "mixer.v_proj.weight"] = (kv_heads * head_dim, hidden)
            t[p + "mixer.o_proj.weight"] = (hidden, heads * head_dim)
    for i in range(32):
        p = f"vision_model.radio_model.model.blocks.{i}."
        t[p + "attn.qkv.weight"] = (3 * 1280, 1280)
        t[p + "attn.qkv.bias"] = (3 * 1280,)
        t[p + "attn.proj.weight"] = (1280, 1280)
        t[p + "attn.proj.bias"] = (1280,)
        for norm in ("norm1", "norm2"):
            t[p + norm + ".weight"] = (1280,)
            t[p + norm + ".bias"] = (1280,)
        t[p + "mlp.fc1.weight"] = (5120, 1280)
        t[p + "mlp.fc1.bias"] = (5120,)
        t[p + "mlp.fc2.weight"] = (1280, 5120)
        t[p + "mlp.fc2.bias"] = (1280,)
    return t
