"""server.py as a program: settings from the environment, and refusing what cannot run here."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from server import Settings
from tests.helpers import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine could run the 12B model")
@pytest.mark.slow
def test_default_12b_without_gpu_stops_at_once_with_advice():
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert "ENABLE_MOCK_INFERENCE=1" in result.stderr and "python -m model.tiny" in result.stderr


def test_settings_defaults_and_environment(monkeypatch):
    for name in ("NGC_API_KEY", "NVIDIA_API_KEY", "PORT", "MAX_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    assert (defaults.host, defaults.port, defaults.max_batch_size) == ("0.0.0.0", 8000, 64)
    assert defaults.nim_served_model_name == "nvidia/nemotron-nano-12b-v2-vl"
    assert defaults.api_keys() == []
    monkeypatch.setenv("NVIDIA_API_KEY", "nv")
    assert Settings().api_keys() == ["nv"]
    monkeypatch.setenv("NGC_API_KEY", "ngc")
    assert Settings().api_keys() == ["ngc"]
    monkeypatch.setenv("NIM_REQUIRE_AUTH", "0")
    assert Settings().api_keys() == []
    monkeypatch.setenv("MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()


def test_every_model_setting_reaches_the_engine_that_the_worker_loads(monkeypatch, tiny_path):
    """DTYPE, SSM_STATE_DTYPE, ENFORCE_EAGER and the sizes only change what is built on a GPU: read here from
    what the worker asks the loader for."""
    import model.engine
    from server import CaptionAPI
    from service.state import SharedState

    env = {"MODEL_ID": str(tiny_path), "ENABLE_MOCK_INFERENCE": "0", "DEVICE": "auto", "DTYPE": "float16",
           "QUANTIZATION": "fp8",
           "SSM_STATE_DTYPE": "bfloat16", "ENFORCE_EAGER": "1", "MAX_BATCH_SIZE": "7", "MAX_MODEL_LEN": "9000",
           "MAX_PREFILL_TOKENS": "333", "MAX_NUM_TILES": "5", "GPU_MEMORY_UTILIZATION": "0.55"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    asked = {}
    monkeypatch.setattr(model.engine, "load_engine", lambda *args, **kw: asked.update(kw, args=args))
    CaptionAPI(Settings(), SharedState(4))._build_engine("cuda:3")
    assert asked["args"] == (str(tiny_path), None)
    assert {k: v for k, v in asked.items() if k != "args"} == {
        "device": "cuda:3", "dtype": "float16", "ssm_dtype": "bfloat16", "enforce_eager": True, "max_running": 7,
        "max_seq_len": 9000, "max_prefill_tokens": 333, "max_num_tiles": 5, "memory_fraction": 0.55,
        "load_format": "safetensors", "quantization": "fp8"}
