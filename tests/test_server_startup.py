"""Every way `python server.py` can fail to start ends in one clear line, without a traceback."""

from __future__ import annotations

import json
import os
import shutil
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
