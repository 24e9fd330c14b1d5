"""FP8 checkpoints behind `python server.py`: refused in one line when unsupported, served when FP8; the model
names (NIM_SERVED_MODEL_NAME, a comma-separated list) and the quantization in /v1/metadata."""

from __future__ import annotations

import json
import shutil

import pytest
import requests

from server import Settings
from tests.conftest import stop_later
from tests.helpers import MODEL_NAME, Service, nv_ingest_body
from tests.test_server_startup import start
from tests.test_server_real_engine import noise_url


def test_an_nvfp4_checkpoint_is_refused_in_one_line_before_any_worker_starts(tiny_path, tmp_path):
    folder = shutil.copytree(tiny_path, tmp_path / "nvfp4")
    (folder / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16}}))
    run = start({"MODEL_ID": str(folder), "DEVICE": "cpu"})
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"MODEL_ID={folder}: hf_quant_config.json declares ModelOpt NVFP4")
    assert "supported: no quantization (BF16), or ModelOpt FP8" in line and "inference worker" not in run.stderr


def test_the_fp8_hub_id_is_the_full_size_model_that_needs_a_gpu():
    from model.loader import check_can_run

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        check_can_run("nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-FP8", "auto")


def test_served_names_default_to_the_model_and_its_variant(monkeypatch):
    monkeypatch.delenv("NIM_SERVED_MODEL_NAME", raising=False)
    settings = Settings()
    assert settings.served_model_names("none") == [MODEL_NAME, f"{MODEL_NAME}-bf16"]
    assert settings.served_model_names("fp8") == [MODEL_NAME, f"{MODEL_NAME}-fp8"]
    monkeypatch.setenv("NIM_SERVED_MODEL_NAME", " mine , nvidia/nemotron-nano-12b-v2-vl,mine,")
    assert Settings().served_model_names("fp8") == ["mine", MODEL_NAME]
    meta = Settings().metadata("fp8")
    assert meta["quantization"] == "fp8" and [m["shortName"] for m in meta["modelInfo"]] == ["mine", MODEL_NAME]
    monkeypatch.setenv("QUANTIZATION", "fp8")
    assert Settings().model_quantization() == "fp8"


@pytest.mark.slow  # a real-engine server on the tiny FP8 checkpoint
def test_the_tiny_fp8_checkpoint_is_served_over_http(tiny_fp8_path, tmp_path):
    service = Service({"MODEL_ID": str(tiny_fp8_path), "NIM_REQUIRE_AUTH": "0", "MAX_BATCH_SIZE": "4"},
                      tmp_path / "fp8.log")
    try:
        models = requests.get(f"{service.url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [MODEL_NAME, f"{MODEL_NAME}-fp8"]
        meta = requests.get(f"{service.url}/v1/metadata", timeout=10).json()
        assert meta["quantization"] == "fp8" and meta["served_model_names"] == [MODEL_NAME, f"{MODEL_NAME}-fp8"]
        for name in (MODEL_NAME, f"{MODEL_NAME}-fp8"):
            body = nv_ingest_body(noise_url(300, 200, seed=1), model=name, temperature=0, max_tokens=8)
            response = requests.post(service.chat_url, json=body, timeout=120)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["model"] == MODEL_NAME and answer["usage"]["completion_tokens"] == 8
            assert answer["choices"][0]["message"]["content"]
        refused = requests.post(service.chat_url, json=nv_ingest_body(noise_url(64, 64, 2), model=f"{MODEL_NAME}-bf16"),
                                timeout=30)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        log = service.log()
        assert "ModelOpt FP8 checkpoint" in log and "14 linear layers" in log
        assert "run dequantized in the serving dtype" in log
    finally:
        stop_later(service)
