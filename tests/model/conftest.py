"""Shared fixtures for the model tests: one tiny checkpoint and one engine per session."""

from __future__ import annotations

import pytest

from model.engine import load_engine

# `tiny_path` (one tiny checkpoint per session) comes from tests/conftest.py.


@pytest.fixture(scope="session")
def engine(tiny_path):
    return load_engine(str(tiny_path), None, device="cpu", dtype="auto", max_num_tiles=12, max_running=8,
                       max_seq_len=16384, max_prefill_tokens=512)
