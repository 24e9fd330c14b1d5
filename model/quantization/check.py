"""On a GPU: `python -m model.quantization.check` checks the W8A8 path of Fp8Linear against its dequantized twin.

For layers of the full-size model's shapes, random weights quantized per tensor and inputs at several row
counts: the torch._scaled_mm result stays within bf16 rounding of the dequantized one; the contents of other
rows (padding rows of a graph batch) never change a row's result; a CUDA graph replay equals the eager call;
and the time of one decode-sized product in each path. Prints one JSON object; exits 1 when a check fails.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch import nn

from model.quantization.fp8 import DEQUANT, SCALED_MM, Fp8Linear, scaled_mm_supported

# (in, out) of the full-size language model's linears: Mamba in_proj and out_proj, q/k/v/o, MLP up/down.
SHAPES = [(5120, 22656), (10240, 5120), (5120, 5120), (5120, 1024), (5120, 20480), (20480, 5120)]
ROWS = [1, 7, 16, 33, 64, 1000]


def _layer(in_features: int, out_features: int, device: torch.device) -> Fp8Linear:
    linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0.0, in_features**-0.5)
    return Fp8Linear.from_linear(linear, 8.0 / 448.0)


def _time(fn, repeats: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


@torch.inference_mode()
def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"scaled_mm": False, "why": "no CUDA device here"}))
        return 0
    device = torch.device("cuda")
    supported, why = scaled_mm_supported(device)
    report: dict = {"device": torch.cuda.get_device_name(device), "scaled_mm": supported, "why": why, "layers": []}
    ok = True
    if not supported:
        print(json.dumps(report))
        return 0
    for in_features, out_features in SHAPES:
        layer = _layer(in_features, out_features, device)
        x = torch.randn(max(ROWS), in_features, device=device, dtype=torch.bfloat16)
        entry = {"shape": [in_features, out_features], "max_relative_diff": 0.0}
        for rows in ROWS:
            layer.path = DEQUANT
            reference = layer(x[:rows]).float()
            layer.path = SCALED_MM
            fast = layer(x[:rows]).float()
            diff = float((fast - reference).norm() / reference.norm())
            entry["max_relative_diff"] = max(entry["max_relative_diff"], round(diff, 5))
            ok &= diff < 2e-2
            other = x[:rows].clone()
            other[1:] = 1e3  # other rows change (saturated, even): row 0 must not
            ok &= bool(torch.equal(layer(other)[0], layer(x[:rows])[0]))
        static = x[:8].clone()
        eager = layer(static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(static)
        graph.replay()
        entry["graph_equals_eager"] = bool(torch.equal(captured, eager))
        ok &= entry["graph_equals_eager"]
        for path in (SCALED_MM, DEQUANT):
            layer.path = path
            entry[f"{path}_ms_rows8"] = round(_time(lambda: layer(static)), 4)
        report["layers"].append(entry)
    report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
