from __future__ import annotations

import pytest

from tests.helpers import Service

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def mock_service(tmp_path_factory):
    """Mock mode with a key set: auth on, batching on (batches of 4)."""
    service = Service({"ENABLE_MOCK_INFERENCE": "1", "NGC_API_KEY": API_KEY, "MAX_BATCH_SIZE": "4",
                       "BATCH_TIMEOUT": "0.05"}, tmp_path_factory.mktemp("logs") / "mock.log")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def auth_headers():
    return {"Authorization": f"Bearer {API_KEY}"}
