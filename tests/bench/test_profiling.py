"""bench/profiling.py: the SDPA backend read from the op it dispatched to, and one step's summary on a CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.profiling import profile_step, sdpa_backend


def test_backend_names():
    assert sdpa_backend("aten::_scaled_dot_product_efficient_attention") == "efficient"
    assert sdpa_backend("aten::_scaled_dot_product_flash_attention") == "flash"
    assert sdpa_backend("aten::_scaled_dot_product_flash_attention_for_cpu") == "flash (CPU)"
    assert sdpa_backend("aten::_scaled_dot_product_cudnn_attention") == "cudnn"
    assert sdpa_backend("aten::_scaled_dot_product_attention_math") == "math"
    assert sdpa_backend("aten::mm") is None


def test_profile_of_one_step_on_a_cpu():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 5, 8)
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    out = profile_step(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=mask) @ torch.randn(8, 8),
                       torch.device("cpu"))
    assert out["what"] == "ATen ops (CPU)" and out["kernels"] is None and out["cpu_leaf_ops"] > 0
    assert out["top"] and all(t["calls"] > 0 for t in out["top"])
    (shape, backends), = out["sdpa_backends"].items()
    assert shape == "q[2, 4, 3, 8] k[2, 4, 5, 8]" and sum(backends.values()) == 1
