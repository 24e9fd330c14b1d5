"""What one engine step runs on the device: torch.profiler's kernels, their count, and the SDPA backends.

`profile_step(fn, device)` runs `fn` once under torch.profiler and returns the kernels by GPU time
(name, calls, total ms), the number of kernel launches (copies and memsets counted apart), and for each
attention shape (query and key shapes as SDPA received them) the backend PyTorch chose, read from the
ATen op it dispatched to (`_scaled_dot_product_{flash,efficient,cudnn}_attention`, or `..._math`).
On a CPU the same call lists ATen ops by CPU time instead of kernels.
"""

from __future__ import annotations

import torch

_BACKENDS = (("flash_attention_for_cpu", "flash (CPU)"), ("flash", "flash"), ("efficient", "efficient"),
             ("cudnn", "cudnn"), ("math", "math"), ("overrideable", "overrideable"))


def sdpa_backend(op_name: str) -> str | None:
    """'aten::_scaled_dot_product_efficient_attention' -> 'efficient'; None for any other op."""
    if not op_name.startswith("aten::_scaled_dot_product"):
        return None
    for part, backend in _BACKENDS:
        if part in op_name:
            return backend
    return op_name.removeprefix("aten::")


def summarize(events, top: int = 15) -> dict:
    """Kernels (or CPU ops), their count and the SDPA backends of a list of profiler FunctionEvents."""
    from torch.autograd import DeviceType

    kernels: dict[str, list[float]] = {}
    copies = memsets = 0
    cpu_ops: dict[str, list[float]] = {}
    sdpa: dict[str, dict[str, int]] = {}
    for e in events:
        name = e.name
        if e.device_type != DeviceType.CPU:
            if name.startswith("Memcpy"):
                copies += 1
                continue
            if name.startswith("Memset"):
                memsets += 1
                continue
            entry = kernels.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us() / 1e3
            continue
        backend = sdpa_backend(name)
        if backend is not None:
            shapes = getattr(e, "input_shapes", None) or []
            key = (f"q{list(shapes[0])} k{list(shapes[1])}" if len(shapes) >= 2 and shapes[0] and shapes[1]
                   else "shape not recorded")
            sdpa.setdefault(key, {})
            sdpa[key][backend] = sdpa[key].get(backend, 0) + 1
        if name.startswith("aten::") and not e.cpu_children:
            entry = cpu_ops.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.self_cpu_time_total / 1e3
    table = kernels if kernels else cpu_ops
    ranked = sorted(table.items(), key=lambda kv: -kv[1][1])
    total_ms = sum(v[1] for v in table.values())
    return {
        "what": "CUDA kernels" if kernels else "ATen ops (CPU)",
        "kernels": sum(v[0] for v in kernels.values()) if kernels else None,
        "memcpys": copies, "memsets": memsets,
        "cpu_leaf_ops": sum(v[0] for v in cpu_ops.values()),
        "total_ms": round(total_ms, 3),
        "top": [{"name": _short(name), "calls": calls, "ms": round(ms, 3),
                 "share": round(ms / total_ms, 3) if total_ms else 0.0} for name, (calls, ms) in ranked[:top]],
        "sdpa_backends": sdpa,
    }


def _short(name: str, limit: int = 120) -> str:
    return name if len(name) <= limit else name[:limit - 3] + "..."


def profile_step(fn, device: torch.device, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return summarize(prof.events(), top)
