"""Every way `python server.py` can fail to start ends in one clear line, without a traceback."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT, Service, free_port


def start(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("NGC_API_KEY", "NVIDIA_API_KEY")}
    full.update({"PORT": str(free_port()), "HOST": "127.0.0.1", **env})
    return subprocess.run([sys.executable, "server.py"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_settings_are_named_in_one_line():
    run = start({"ENABLE_MOCK_INFERENCE": "1", "MAX_BATCH_SIZE": "abc", "DTYPE": "float33"})
    assert run.returncode != 0 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("configuration error: ") and "MAX_BATCH_SIZE='abc'" in line and "DTYPE='float33'" in line


@pytest.mark.slow
def test_a_hub_id_that_cannot_be_had_is_refused_before_any_worker_starts(tmp_path):
    for model_id, problem in (("nvidia/no-such-model", "HF_HUB_OFFLINE is set"),
                              ("not//a//hub id", "nor a valid hub id")):
        run = start({"MODEL_ID": model_id, "DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith(f"MODEL_ID={model_id}: ")
        assert problem in run.stderr and "inference worker" not in run.stderr


@pytest.mark.slow
def test_a_checkpoint_that_does_not_load_says_why_in_one_line(tiny_path, tmp_path):
    broken = shutil.copytree(tiny_path, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["llm_config"]["hidden_size"] *= 2  # weights no longer match the architecture
    (broken / "config.json").write_text(json.dumps(config))
    log = tmp_path / "server.log"
    try:
        Service({"MODEL_ID": str(broken), "NIM_REQUIRE_AUTH": "0"}, log)
        raise AssertionError("the server started")
    except RuntimeError:
        pass
    text = log.read_text()
    assert "the model could not be loaded: RuntimeError: checkpoint" in text and "does not match" in text
    assert "the inference worker stopped before it was ready" in text and "Traceback" not in text


def test_settings_errors_give_the_allowed_values_not_a_pattern():
    run = start({"ENABLE_MOCK_INFERENCE": "1", "DTYPE": "bf16", "DEVICE": "gpu", "PORT": "99999"})
    assert run.returncode != 0 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert "DTYPE='bf16': Input should be 'auto', 'bfloat16', 'float16' or 'float32'" in line
    assert "DEVICE='gpu': should be auto, cpu, cuda or cuda:N" in line
    assert "PORT='99999': Input should be less than or equal to 65535" in line
    assert "pattern" not in line


def test_a_port_in_use_is_named_in_one_line():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        run = start({"ENABLE_MOCK_INFERENCE": "1", "PORT": str(port)})
    assert run.returncode != 0 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"PORT={port} (HOST=127.0.0.1): cannot listen there") and "set PORT" in last, last


def test_a_privileged_port_says_what_to_do():
    from server import port_problem

    line = port_problem("0.0.0.0", 80, PermissionError(errno.EACCES, "Permission denied"))
    assert line == ("PORT=80 (HOST=0.0.0.0): cannot listen there (Permission denied): ports below 1024 need root: "
                    "set PORT to 1024 or above (8000 by default)")


def test_help_lists_the_settings_and_starts_nothing():
    run = subprocess.run([sys.executable, "server.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == ""
    for needle in ("MAX_BATCH_SIZE               default 64", "NGC_API_KEY, NVIDIA_API_KEY", "OTEL_", "DTYPE"):
        assert needle in run.stdout, needle
    other = subprocess.run([sys.executable, "server.py", "--port", "1"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert other.returncode != 0 and "--help lists them" in other.stderr


def test_cuda_without_a_gpu_does_not_speak_of_the_12b(tiny_path, monkeypatch):
    import torch

    from server import Settings, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        check_device(Settings(model_id=str(tiny_path), device="cuda"))
    assert str(stop.value).startswith("DEVICE=cuda: no CUDA GPU is visible") and "12B" not in str(stop.value)


def test_the_start_up_log_says_whether_a_key_is_required(monkeypatch):
    from server import Settings

    for name in ("NGC_API_KEY", "NVIDIA_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().auth_summary() == "off (neither NGC_API_KEY nor NVIDIA_API_KEY is set)"
    monkeypatch.setenv("NVIDIA_API_KEY", "secret-value")
    assert Settings().auth_summary() == "required (Authorization: Bearer <key>, the key from NVIDIA_API_KEY)"
    monkeypatch.setenv("NGC_API_KEY", "other-secret")
    assert Settings().auth_summary().endswith("the key from NGC_API_KEY)")
    monkeypatch.setenv("NIM_REQUIRE_AUTH", "0")
    assert Settings().auth_summary().startswith("off (NIM_REQUIRE_AUTH=0")
    assert "secret" not in Settings().auth_summary()


def test_transformers_advice_to_install_mamba_ssm_is_not_logged():
    import logging

    from service.observability import quiet_library_advice

    quiet_library_advice()
    library = logging.getLogger("transformers.integrations.hub_kernels")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    library.addHandler(handler)
    try:
        library.warning("`mamba_chunk_scan_combined` is falling back to its reference PyTorch implementation because "
                        "`mamba-ssm` is not installed. This is correct but much slower; install `mamba-ssm` for the "
                        "optimized kernel.")
        library.warning("some other warning")
    finally:
        library.removeHandler(handler)
    assert seen == ["some other warning"]
