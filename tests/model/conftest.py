"""Shared fixtures for the model tests: one tiny checkpoint and one engine per session."""

from __future__ import annotations

import pytest

from model.engine import load_engine
from model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def engine(tiny_path):
    return load_engine(str(tiny_path), None, device="cpu", dtype="auto", max_num_tiles=12)
