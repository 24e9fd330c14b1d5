"""The language model's GPU kernels, each with a pure-PyTorch twin of the same meaning.

- `decode`: the Mamba2 decode step (causal-conv and selective-state updates on slot state).
- `attention`: decode attention reading each slot's keys and values up to its own length.
- `causal_conv`: the Mamba mixer's causal convolution over prompt chunks, on slot state.
- `chunk_scan`: the Mamba2 chunked scan of prefill, reading and writing each slot's state in place.
- `norms`: RMSNorm fused with its residual add, and the gated RMSNorm of the Mamba mixer.
- `backend`: whether Triton runs (`CAPTION_DISABLE_TRITON`), shared launch helpers.

Callers use the dispatching entry points below: Triton on CUDA tensors, PyTorch elsewhere.
"""

from model.kernels.backend import triton_available
from model.kernels.backend import use_triton as _use_triton  # noqa: F401 (the tests check the dispatch)
from model.kernels.attention import decode_attention, decode_attention_torch, decode_attention_triton
from model.kernels.causal_conv import conv_prefill, conv_prefill_torch, conv_prefill_triton
from model.kernels.chunk_scan import chunk_scan, chunk_scan_torch, chunk_scan_triton
from model.kernels.decode import (conv_update, conv_update_torch, conv_update_triton, ssm_update, ssm_update_torch,
                                  ssm_update_triton)
from model.kernels.norms import (add_rms_norm, add_rms_norm_torch, add_rms_norm_triton, gated_rms_norm,
                                 gated_rms_norm_torch, gated_rms_norm_triton)

__all__ = ["triton_available", "conv_update", "ssm_update", "chunk_scan", "add_rms_norm", "gated_rms_norm",
           "decode_attention", "decode_attention_torch", "decode_attention_triton",
           "conv_prefill", "conv_prefill_torch", "conv_prefill_triton",
           "conv_update_torch", "ssm_update_torch", "chunk_scan_torch", "add_rms_norm_torch", "gated_rms_norm_torch",
           "conv_update_triton", "ssm_update_triton", "chunk_scan_triton", "add_rms_norm_triton",
           "gated_rms_norm_triton"]
