"""nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16's config.json, written down without downloading it.

Top-level keys from SGLang `configs/nano_nemotron_vl.py` (adapted from the official configuration.py)
and vLLM `nano_nemotron_vl.py`; language-model sizes from Megatron-Bridge
`NemotronNano12Bv2VLModelProvider` (62 layers, hidden 5120, FFN 20480, 40 heads, 8 KV groups x 128,
Mamba 128 heads x 80, state 128, 8 groups, vocab 131072); projector width 20480 from the same provider;
RADIO `args` for C-RADIOv2-H. `img_context_token_id` is illustrative: the engine checks it against the
tokenizer at load time. The GPU benchmark builds this architecture with random weights (LOAD_FORMAT=dummy).
"""

from __future__ import annotations

MODEL_ID = "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16"  # the checkpoint on the hub
SERVED_MODEL_NAME = "nvidia/nemotron-nano-12b-v2-vl"  # the name nv-ingest and the NIM use in requests
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
