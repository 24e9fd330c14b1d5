"""Running kernel checks under the Triton interpreter: a subprocess, because TRITON_INTERPRET must be set
before the kernels are decorated at import."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

skip_without_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (`pip install triton` to run the Triton kernels under TRITON_INTERPRET=1 on CPU)")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CAPTION_DISABLE_TRITON")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


def run_under_interpreter(module: str, function: str) -> None:
    """Calls `module.function()` in a subprocess with TRITON_INTERPRET=1; it must print 'interpreter checks passed'."""
    proc = run_python(f"from {module} import {function} as run; run()", TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreter checks passed" in proc.stdout, proc.stdout + proc.stderr
