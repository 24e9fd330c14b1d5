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

HYBRID_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"

OFFICIAL_CONFIG: dict = {
    "architectures": ["NemotronH_Nano_VL_V2"],
    "model_type": "NemotronH_Nano_VL_V2",
    "auto_map": {
        "AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config",
        "AutoModel": "modeling.NemotronH_Nano_VL_V2",
        "AutoModelForCausalLM": "modeling.NemotronH_Nano_VL_V2",
    },
    "torch_dtype": "bfloat16",
    "force_image_size": 512,
    "patch_size": 16,
    "downsample_ratio": 0.5,
    "template": "nemotron-h-5p5",
    "ps_version": "v2",
    "image_tag_type": "internvl",
    "projector_hidden_size": 20480,
    "vit_hidden_size": 1280,
    "video_pruning_rate": 0.0,
    "img_context_token": "<image>",
    "img_start_token": "<img>",
    "img_end_token": "</img>",
    "video_context_token": "<video>",
    "img_context_token_id": 18,
    "norm_mean": [0.48145466, 0.4578275, 0.40821073],
    "norm_std": [0.26862954, 0.26130258, 0.27577711],
    "use_thumbnail": True,
    "llm_config": {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
        "vocab_size": 131072,
        "hidden_size": 5120,
        "intermediate_size": 20480,
        "num_hidden_layers": 62,
        "hybrid_override_pattern": HYBRID_PATTERN,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "mamba_num_heads": 128,
        "mamba_head_dim": 80,
        "ssm_state_size": 128,
        "n_groups": 8,
        "conv_kernel": 4,
        "expand": 2,
        "chunk_size": 128,
        "use_conv_bias": True,
        "use_bias": False,
        "mlp_bias": False,
        "attention_bias": False,
        "mlp_hidden_act": "relu2",
        "mamba_hidden_act": "silu",
        "layer_norm_epsilon": 1e-05,
        "residual_in_fp32": False,
        "rescale_prenorm_residual": True,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "bos_token_id": 1,
        "eos_token_id": 12,
        "pad_token_id": 0,
        "num_logits_to_keep": 1,
        "use_mamba_kernels": True,
        "initializer_range": 0.02,
        "torch_dtype": "bfloat16",
    },
    "vision_config": {
        "architectures": ["RADIOModel"],
        "auto_map": {"AutoConfig": "hf_model.RADIOConfig", "AutoModel": "hf_model.RADIOModel"},
        "args": {
            "model": "vit_huge_patch16_224",
            "cpe_max_size": 2048,
            "register_multiple": 8,
            "cls_token_per_teacher": True,
            "teachers": [
                {"name": "clip", "use_summary": True},
                {"name": "siglip", "use_summary": True},
                {"name": "dino_v2", "use_summary": True},
                {"name": "sam", "use_summary": False},
            ],
        },
        "patch_size": 16,
        "max_resolution": 2048,
        "preferred_resolution": [512, 512],
        "adaptor_names": None,
        "vitdet_window_size": None,
        "feature_normalizer_config": None,
        "inter_feature_normalizer_config": None,
        "torch_dtype": "bfloat16",
    },
}


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
