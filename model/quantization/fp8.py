"""FP8 linear layers of a ModelOpt FP8 checkpoint: E4M3 weights and activations, per-tensor static scales.

Each quantized linear holds `weight` (float8_e4m3fn, out x in), `weight_scale` and `input_scale` (float32
scalars), and an optional bias in the serving dtype. The real value of a weight is `weight * weight_scale`;
an activation is quantized as `clamp(x / input_scale, -448, 448)` cast to E4M3, so the layer computes

    y = (q(x) * input_scale) @ (weight * weight_scale)^T + bias

Two paths, chosen once at load (`prepare_fp8_layers`) and logged:

* `scaled_mm` (compute capability 8.9 and above: L40S, H100, H200): W8A8, `torch._scaled_mm` on the FP8
  operands with both scales applied to the float32 accumulator, bf16/fp16 output. cuBLASLt wants the
  inner and output dims to be multiples of 16 (a layer that is not runs the other path) and, on some
  torch versions, the row count too: the rows are padded with zeros up to a multiple of 16 and the
  result sliced back. Both scales are static, and no quantity is reduced across rows, so padding rows
  (of the padding or of a graph batch) change no real row; no host reads, no data-dependent shapes, so
  the layer runs inside CUDA graphs.
* `dequant` (older GPUs, the CPU): the same quantization of the activation, then both operands
  dequantized to the serving dtype and multiplied there: the same function of the same FP8 values,
  exact to the format (E4M3 values are exact in bf16, fp16 and fp32), slower.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
ROW_MULTIPLE = 16  # torch._scaled_mm (cuBLASLt): row counts padded to this
DIM_MULTIPLE = 16  # inner and output dims must be multiples of this for torch._scaled_mm
SCALED_MM, DEQUANT = "scaled_mm", "dequant"
SCALE_NAMES = ("weight_scale", "input_scale")


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 values of x with a per-tensor static scale (saturating at +-448)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def pad_rows(x: torch.Tensor, multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    """x (m, k) with zero rows appended up to a multiple of `multiple` rows (x itself when it is one)."""
    extra = -x.shape[0] % multiple
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """torch._scaled_mm with a row-major a (m, k) and a column-major b (k, n); one tensor back on every version."""
    out = torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)
    return out[0] if isinstance(out, tuple) else out


class Fp8Linear(nn.Module):
    """A drop-in for nn.Linear holding a ModelOpt FP8 layer (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_dtype = out_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones((), dtype=torch.float32, device=device), requires_grad=False)
        self.input_scale = nn.Parameter(torch.ones((), dtype=torch.float32, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=out_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.path = DEQUANT

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_scale: float | torch.Tensor) -> Fp8Linear:
        """Quantize a higher-precision linear: weight_scale = amax / 448, the given static input scale."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device, weight.dtype)
        scale = (weight.abs().amax().float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        layer.weight.data = quantize(weight, scale)
        layer.weight_scale.data = scale.reshape(())
        layer.input_scale.data = torch.as_tensor(input_scale, dtype=torch.float32, device=weight.device).reshape(())
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().to(weight.dtype)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, path={self.path}")

    def can_scaled_mm(self) -> bool:
        return self.in_features % DIM_MULTIPLE == 0 and self.out_features % DIM_MULTIPLE == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)
        y = self._w8a8(x2d) if self.path == SCALED_MM else self._dequant(x2d)
        return y.reshape(*shape[:-1], self.out_features)

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        q = quantize(pad_rows(x), self.input_scale)  # padded before the cast: zero rows stay zero
        y = _scaled_mm(q, self.weight.t(), self.input_scale, self.weight_scale, self.bias, self.out_dtype)
        return y[:rows] if y.shape[0] != rows else y

    def _dequant(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xq = quantize(x, self.input_scale).to(dtype) * self.input_scale.to(dtype)
        w = self.weight.to(dtype) * self.weight_scale.to(dtype)
        return F.linear(xq, w, None if self.bias is None else self.bias.to(dtype))


def fp8_layers(model: nn.Module) -> list[tuple[str, Fp8Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Fp8Linear)]


def scaled_mm_supported(device: torch.device) -> tuple[bool, str]:
    """Whether this device has FP8 tensor cores that torch._scaled_mm can use, and why (for the log)."""
    if device.type != "cuda":
        return False, f"no FP8 matmul on {device.type}"
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch has no _scaled_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"compute capability {major}.{minor} has no FP8 tensor cores (8.9 and above do)"
    try:  # one small product, so that a cuBLASLt that refuses shows here and not in the first request
        a = torch.zeros(ROW_MULTIPLE, 32, device=device).to(FP8)
        b = torch.zeros(32, 32, device=device).to(FP8).t()
        one = torch.ones((), device=device, dtype=torch.float32)
        _scaled_mm(a, b, one, one, None, torch.bfloat16)
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to the exact, slower path
        return False, f"torch._scaled_mm failed a check ({type(exc).__name__}: {exc})"
    return True, f"compute capability {major}.{minor}"


def prepare_fp8_layers(model: nn.Module, device: torch.device) -> str:
    """Choose each FP8 layer's path once, for this device; returns the line that the log gets."""
    layers = fp8_layers(model)
    if not layers:
        return "no FP8 layers"
    supported, why = scaled_mm_supported(device)
    fast = 0
    for _, layer in layers:
        layer.path = SCALED_MM if supported and layer.can_scaled_mm() else DEQUANT
        fast += layer.path == SCALED_MM
    weight_bytes = sum(layer.weight.numel() for _, layer in layers)
    if supported:
        line = (f"FP8: {fast} of {len(layers)} linear layers run W8A8 in torch._scaled_mm ({why}); "
                f"{len(layers) - fast} dequantize (dims not multiples of {DIM_MULTIPLE})")
    else:
        line = (f"FP8: {len(layers)} linear layers run dequantized in the serving dtype (same results as W8A8, "
                f"slower; {why})")
    return line + f"; {weight_bytes / 2**20:.1f} MiB of FP8 weights"
