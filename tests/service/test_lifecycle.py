"""Ctrl+C in a terminal (SIGINT to the whole process group) stops an idle service like SIGTERM does:
at once, with exit 0, and with a log of one format and no tracebacks."""

from __future__ import annotations

import os
import re
import signal
import time

from tests.helpers import Service

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def test_ctrl_c_stops_an_idle_service_quickly_and_quietly(tmp_path):
    service = Service({"ENABLE_MOCK_INFERENCE": "1"}, tmp_path / "server.log")
    started = time.monotonic()
    os.killpg(service.proc.pid, signal.SIGINT)
    code = service.proc.wait(10)
    elapsed = time.monotonic() - started
    service.stop()
    log = service.log_path.read_text()
    assert code == 0 and elapsed < 3, (code, elapsed, log)
    assert "Traceback" not in log and "SIGKILL" not in log and "\x1b" not in log, log
    assert all(LINE.match(line) for line in log.splitlines() if line.strip()), log
