"""The start-up check of the Triton kernels on the serving device.

Each kernel runs once on a small case with the model's structure and is compared with its PyTorch twin.
A kernel that fails to compile or disagrees (a Triton or driver the kernels were not built for) must not
serve wrong captions: Triton is switched off for the process, every kernel takes its PyTorch path, and
the log says why. Slower, never wrong.
"""

from __future__ import annotations

import torch

from model.kernels import backend
from model.kernels.attention import decode_attention_torch, decode_attention_triton
from model.kernels.causal_conv import conv_prefill_torch, conv_prefill_triton
from model.kernels.chunk_scan import chunk_scan_torch, chunk_scan_triton
from model.kernels.decode import conv_update_torch, conv_update_triton, ssm_update_torch, ssm_update_triton
from model.kernels.norms import add_rms_norm_torch, add_rms_norm_triton, gated_rms_norm_torch, gated_rms_norm_triton

# Small, with the model's structure: heads per group > 1, P not a power of two, a prompt over one chunk.
_H, _P, _N, _G, _K, _SLOTS, _ROWS, _WIDTH = 8, 80, 128, 2, 4, 4, 3, 100


def _close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    scale = b.float().abs().amax().clamp(min=1.0)
    err = ((a.float() - b.float()).abs().amax() / scale).item()
    if not err <= 5e-2:  # bfloat16 rounding of values already rounded: a wrong kernel is off by O(1)
        raise AssertionError(f"{name} differs from its PyTorch path by {err:.3g} (relative)")


def _cases(device: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    slots = torch.tensor([2, 0, 3], device=device)
    # Prefill scan.
    x, dt = rand(_ROWS, _WIDTH, _H, _P), rand(_ROWS, _WIDTH, _H)
    B, C = rand(_ROWS, _WIDTH, _G, _N), rand(_ROWS, _WIDTH, _G, _N)
    A, D, bias = -torch.rand(_H, device=device) - 0.1, rand(_H, dt=torch.float32), rand(_H, dt=torch.float32)
    lengths = torch.tensor([_WIDTH, 37, 1], device=device)
    pool = rand(_SLOTS, _H, _P, _N, scale=0.1, dt=torch.float32)
    pools = pool.clone(), pool.clone()
    ys = [f(x, dt, A, B, C, D, bias, p, slots, lengths) for f, p in zip((chunk_scan_triton, chunk_scan_torch), pools)]
    _close(ys[0], ys[1], "chunk_scan (y)")
    _close(pools[0], pools[1], "chunk_scan (state)")
    # Prefill convolution.
    channels = _H * _P + 2 * _G * _N
    conv = rand(_SLOTS, channels, _K - 1)
    convs = conv.clone(), conv.clone()
    xbc, weight, cbias = rand(_ROWS, _WIDTH, channels), rand(channels, _K), rand(channels)
    ys = [f(xbc, c, weight, cbias, slots, lengths) for f, c in zip((conv_prefill_triton, conv_prefill_torch), convs)]
    _close(ys[0], ys[1], "conv_prefill (y)")
    _close(convs[0], convs[1], "conv_prefill (state)")
    # Decode step.
    pools = pool.clone(), pool.clone()
    args = (rand(_ROWS, _H, _P), rand(_ROWS, _H), A, rand(_ROWS, _G, _N), rand(_ROWS, _G, _N), D, bias)
    ys = [f(*args, p, slots) for f, p in zip((ssm_update_triton, ssm_update_torch), pools)]
    _close(ys[0], ys[1], "ssm_update (y)")
    _close(pools[0], pools[1], "ssm_update (state)")
    convs = conv.clone(), conv.clone()
    args = (rand(_ROWS, channels), None, rand(channels, _K), rand(channels))
    ys = [f(args[0], c, args[2], args[3], slots) for f, c in zip((conv_update_triton, conv_update_torch), convs)]
    _close(ys[0], ys[1], "conv_update (y)")
    _close(convs[0], convs[1], "conv_update (state)")
    # Decode attention: 5 query heads per key-value head, each row to its own length.
    keys, values = rand(_SLOTS, 2, 200, 128), rand(_SLOTS, 2, 200, 128)
    q, lengths = rand(_ROWS, 10, 128), torch.tensor([200, 1, 77], device=device)
    _close(decode_attention_triton(q, keys, values, slots, lengths, 200, 0.088),
           decode_attention_torch(q, keys, values, slots, lengths, 200, 0.088), "decode_attention")
    # Norms.
    hidden, residual, weight = rand(_ROWS, 5120), rand(_ROWS, 5120), rand(5120, scale=0.1) + 1
    for a, b in zip(add_rms_norm_triton(hidden, residual, weight, 1e-5), add_rms_norm_torch(hidden, residual, weight, 1e-5)):
        _close(a, b, "add_rms_norm")
    y, gate, weight = rand(_ROWS, _H * _P), rand(_ROWS, _H * _P), rand(_H * _P, scale=0.1) + 1
    _close(gated_rms_norm_triton(y, gate, weight, _H * _P // _G, 1e-5),
           gated_rms_norm_torch(y, gate, weight, _H * _P // _G, 1e-5), "gated_rms_norm")


def check_kernels(device: torch.device, dtype: torch.dtype) -> str:
    """Runs the check where the Triton kernels would serve; returns the line to log."""
    if device.type != "cuda":
        return "kernels: PyTorch (no GPU)"
    if not backend.triton_available():
        return "kernels: PyTorch (Triton not available or CAPTION_DISABLE_TRITON set)"
    try:
        _cases(device, dtype)
        torch.cuda.synchronize(device)
    except Exception as exc:  # a compile error, a launch failure or a wrong value: all mean the same here
        backend.switch_off(f"{type(exc).__name__}: {exc}")
        return (f"kernels: PyTorch; the Triton kernels failed their start-up check and are off for this process "
                f"({type(exc).__name__}: {str(exc)[:300]})")
    return "kernels: Triton (prefill convolution and scan, decode step and attention, fused norms) checked against PyTorch at start"
