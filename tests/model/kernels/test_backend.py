"""model/kernels/backend.py: CAPTION_DISABLE_TRITON is read once, when the kernels load."""

from tests.model.kernels.helpers import run_python, skip_without_triton


@skip_without_triton
def test_disable_flag_is_read_at_import():
    code = ("import importlib, os, model.kernels.backend as k; before = k.triton_available(); "
            "os.environ['CAPTION_DISABLE_TRITON'] = '1'; importlib.reload(k); print(before, k.triton_available())")
    proc = run_python(code)
    assert proc.stdout.split()[-2:] == ["True", "False"], proc.stdout + proc.stderr
