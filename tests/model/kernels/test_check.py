"""The start-up check (model/kernels/check.py): a kernel that fails switches the process to PyTorch."""

from __future__ import annotations

import pytest
import torch

from model.kernels import backend, check
from tests.model.kernels.helpers import run_python, skip_without_triton


def test_on_a_cpu_the_check_says_pytorch_runs():
    assert check.check_kernels(torch.device("cpu"), torch.float32) == "kernels: PyTorch (no GPU)"


@skip_without_triton
def test_a_kernel_that_fails_switches_every_kernel_to_pytorch(monkeypatch):
    monkeypatch.setattr(backend, "_switched_off", None)

    def broken(device, dtype):
        raise RuntimeError("PTX not supported by this driver")

    monkeypatch.setattr(check, "_cases", broken)
    line = check.check_kernels(torch.device("cuda"), torch.bfloat16)
    assert "failed their start-up check" in line and "PTX not supported" in line
    assert not backend.triton_available()
    assert not backend.use_triton(torch.zeros(1))


@skip_without_triton
@pytest.mark.slow
def test_the_check_passes_for_the_kernels_as_built():
    """The cases themselves run (under the interpreter here): a slip in the check would turn Triton off on
    every GPU."""
    proc = run_python("import torch; from model.kernels import check; "
                      "check._cases(torch.device('cpu'), torch.bfloat16); print('interpreter checks passed')",
                      TRITON_INTERPRET="1")
    assert proc.returncode == 0 and "interpreter checks passed" in proc.stdout, proc.stdout + proc.stderr
