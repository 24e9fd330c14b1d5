"""The Nano 12B v2 VL network, assembled from transformers' native building blocks.

language_model: native `NemotronHForCausalLM`; vision_model: native `RadioModel`; mlp1: the native
Nemotron Omni projector (RMSNorm -> Linear -> squared ReLU -> Linear, no biases), which is the same
module the v2 checkpoint stores as `mlp1.0/1/3`. We do not use the `nemotron_h_omni` top-level class:
its config forces a video patch embedder that the v2 checkpoint does not have.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import NemotronHForCausalLM, RadioModel
from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
    NemotronH_Omni_Reasoning_V3MultiModalProjector as NativeProjector,
)

from model.config import VLConfig


def pixel_shuffle_v2(features: torch.Tensor, scale: float) -> torch.Tensor:
    """InternVL pixel shuffle, version 2: (n, w, h, c) -> (n, w*s, h*s, c/s^2), axes swapped back."""
    n, w, h, c = features.shape
    x = features.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class NemotronNanoVLV2(nn.Module):
    def __init__(self, config: VLConfig):
        super().__init__()
        self.config = config
        self.language_model = NemotronHForCausalLM(config.text_config)
        self.vision_model = RadioModel(config.vision_config)
        # We normalise pixels in preprocessing (norm_mean/norm_std); the checkpoint has no conditioner buffers.
        self.vision_model.make_preprocessor_external()
        # `summary_idxs` only selects the RADIO summary vector, which captioning never reads, and the v2
        # checkpoint does not store it: keep it as a non-persistent buffer so it is no checkpoint key.
        summary_idxs = self.vision_model.summary_idxs
        del self.vision_model._buffers["summary_idxs"]
        self.vision_model.register_buffer("summary_idxs", summary_idxs, persistent=False)
        # C-RADIO has no LayerScale (timm ViT without init_values; no ls1/ls2 tensors in the checkpoint);
        # the native layer keeps one initialised to 1.0, i.e. identity, so drop it.
        for layer in self.vision_model.encoder.layer:
            layer.layer_scale1 = nn.Identity()
            layer.layer_scale2 = nn.Identity()
        self.mlp1 = NativeProjector(
            config.projector_input_size,
            config.projector_hidden_size,
            config.text_config.hidden_size,
            bias=False,
            eps=1e-5,  # vLLM nano_nemotron_vl.py builds mlp1's RMSNorm with eps 1e-5
        )

    @torch.inference_mode()
    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) normalised pixels -> (tiles * tokens_per_tile, llm_hidden) embeddings."""
        param = self.mlp1.linear_1.weight
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        features = self.vision_model(pixel_values).features  # prefix (cls + registers) already dropped
        rows = pixel_values.shape[-2] // self.config.patch_size
        cols = pixel_values.shape[-1] // self.config.patch_size
        features = features.reshape(features.shape[0], rows, cols, -1)
        features = pixel_shuffle_v2(features, self.config.downsample_ratio)
        features = features.reshape(features.shape[0], -1, features.shape[-1])
        return self.mlp1(features).reshape(-1, self.config.text_config.hidden_size)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)
