"""Whether the Triton kernels run, and the small helpers every kernel module shares.

Triton is imported once, when this module loads: `CAPTION_DISABLE_TRITON` (any value but empty, 0,
false, no) or a triton that does not import leaves `triton` None, and every kernel takes its PyTorch
path. Kernels run on CUDA tensors; CPU tensors reach them only under TRITON_INTERPRET=1 (the tests, and
the launch counts of bench.ops).
"""

from __future__ import annotations

import contextlib
import os

import torch

_TRITON_DISABLED = os.environ.get("CAPTION_DISABLE_TRITON", "").strip().lower() not in ("", "0", "false", "no")
# Triton reads TRITON_INTERPRET when it is imported too: a value set later would change nothing.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "") == "1"

triton = None
tl = None
if not _TRITON_DISABLED:
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or installed but broken on this platform: use the torch path
        triton = None
        tl = None


_switched_off: str | None = None  # why the start-up check turned the kernels off, if it did
_forced = False  # every tensor takes the Triton path (bench.ops counts launches on a CPU this way)


def triton_available() -> bool:
    """True when the Triton kernels are usable (triton imported, not disabled by CAPTION_DISABLE_TRITON, not
    switched off by the start-up check)."""
    return triton is not None and _switched_off is None


def runs_on(device: torch.device) -> bool:
    """Whether tensors on `device` take the Triton kernels."""
    return use_triton(torch.empty(0, device=device))


def use_triton(t: torch.Tensor) -> bool:
    # Under the interpreter the kernels run on CPU tensors too (the tests of the kernels in the model).
    return (t.is_cuda or _INTERPRETING or _forced) and triton_available()


def force_triton(on: bool) -> None:
    """Route every tensor to the Triton kernels, as on a GPU: for counting launches on a CPU, where the
    launches themselves are intercepted (bench/ops.py)."""
    global _forced
    _forced = on


def switch_off(reason: str) -> None:
    """Every kernel takes its PyTorch path from now on in this process."""
    global _switched_off
    _switched_off = reason


def require_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not available (not installed, or CAPTION_DISABLE_TRITON is set)")


def interpreting() -> bool:
    """Under TRITON_INTERPRET=1 (the CPU tests), whose tl.dot gives garbage for bfloat16 operands: kernels
    then upcast their dot operands to float32, and everything else runs as compiled."""
    return _INTERPRETING


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 operands in full IEEE precision (Triton's default, TF32, is off by
    about 1e-3, more than a float32 model can take); bf16 and fp16 operands are exact in either."""
    return "ieee" if dtype == torch.float32 else "tf32"


def device_ctx(t: torch.Tensor):
    # Launch on the tensors' GPU, not whichever is current; CPU tensors only reach here under TRITON_INTERPRET.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_slots(slots: torch.Tensor | None, batch: int, n_slots: int) -> None:
    if slots is None:
        if batch > n_slots:
            raise ValueError(f"batch of {batch} does not fit a pool of {n_slots} slots")
    elif slots.dim() != 1 or slots.shape[0] != batch or slots.dtype != torch.long:
        raise ValueError(f"slots should be a LongTensor of shape ({batch},), got {slots.dtype} {tuple(slots.shape)}")
