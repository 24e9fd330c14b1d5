from __future__ import annotations

import pytest

from model.tiny import write_tiny_checkpoint
from tests.helpers import Service

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def mock_service(tmp_path_factory):
    """Mock mode with a key set: auth on, at most 4 sequences running, a 1 MiB body limit."""
    service = Service({"ENABLE_MOCK_INFERENCE": "1", "NGC_API_KEY": API_KEY, "MAX_BATCH_SIZE": "4",
                       "MAX_REQUEST_BYTES": str(1024 * 1024)},
                      tmp_path_factory.mktemp("logs") / "mock.log")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def auth_headers():
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny random-weight checkpoint in the official layout, written once per session."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_service(tiny_path, tmp_path_factory):
    """The real engine on the tiny checkpoint, batching up to 8, behind a real server."""
    service = Service({"MODEL_ID": str(tiny_path), "NIM_REQUIRE_AUTH": "0", "MAX_BATCH_SIZE": "8"},
                      tmp_path_factory.mktemp("logs") / "tiny.log")
    yield service
    service.stop()
