from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import service.metrics  # noqa: F401 - first: it sets PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported
from model.tiny import write_tiny_checkpoint
from tests.helpers import Service

API_KEY = "test-key-123"

# ---- Servers: started together, shared by settings, stopped without waiting ---------------------------------

_stopping: list[Service] = []


def stop_later(service: Service) -> None:
    """SIGTERM a server that nobody needs any more, and let it stop while the tests go on; the session reaps it.

    A server takes about a second to stop after SIGTERM, none of which a fixture needs to wait for: uvicorn's
    shutdown (~0.1 s), then up to 1 s before the API-server process exits, because at exit it joins LitServe's
    response-queue reader thread, blocked in `queue.get(timeout=1)` (litserve/transport/process_transport.py),
    then ~0.1 s in the main process. A test about how a server stops owns its server and stops it itself.
    """
    if service.proc.poll() is None:
        service.proc.send_signal(signal.SIGTERM)
    _stopping.append(service)


def pytest_sessionfinish(session, exitstatus):
    """Reap what stop_later let go. Each had its SIGTERM and the rest of the session to exit, and gets no second
    one: a second SIGTERM soon after the first interrupts the shutdown where it stands (service/lifecycle.py
    raises KeyboardInterrupt), which has left the worker running until LitServe killed it 5 s later, or the
    main process stuck in LitServe's shutdown until it was killed."""
    deadline = time.monotonic() + 30
    while _stopping:
        service = _stopping.pop()
        try:
            service.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(service.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        service.stop()  # the process has exited: this kills what is left of its group and closes the log


def _key(env: Mapping[str, object]) -> frozenset:
    return frozenset((k, str(v)) for k, v in env.items())


class ServerPool:
    """One module's servers, by settings: `get` gives the server of those settings that the module's tests share,
    `take` gives a test a server of its own (to kill, drain or stop: the pool forgets it, the test stops it).

    `prestart` starts the servers a module will need all at once: a start is mostly imports in two processes
    and waiting for readiness, so on two cores five start in about 5 s where one alone takes 2.
    """

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._idle: dict[frozenset, list[Service]] = {}
        self._started = 0
        self._lock = threading.Lock()

    def _start(self, env: Mapping[str, object]) -> Service:
        with self._lock:
            self._started += 1
            log = self.log_dir / f"server-{self._started}.log"
        return Service({k: str(v) for k, v in env.items()}, log)

    def prestart(self, *wanted: Mapping[str, object] | tuple[Mapping[str, object], int]) -> None:
        """Start, in parallel, what is missing for each settings (or (settings, how many))."""
        missing = []
        for item in wanted:
            env, count = item if isinstance(item, tuple) else (item, 1)
            have = [s for s in self._idle.get(_key(env), []) if s.proc.poll() is None]
            missing += [env] * (count - len(have))
        started: list[tuple[Mapping, Service]] = []
        errors: list[BaseException] = []

        def start(env):
            try:
                service = self._start(env)
            except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
                errors.append(exc)
                return
            with self._lock:
                started.append((env, service))

        threads = [threading.Thread(target=start, args=(env,)) for env in missing]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for env, service in started:
            self._idle.setdefault(_key(env), []).append(service)
        if errors:
            raise errors[0]

    def get(self, env: Mapping[str, object]) -> Service:
        """The shared server of these settings (a fresh one if there is none or it has exited)."""
        servers = self._idle.setdefault(_key(env), [])
        while servers and servers[0].proc.poll() is not None:
            stop_later(servers.pop(0))
        if not servers:
            servers.append(self._start(env))
        return servers[0]

    def take(self, env: Mapping[str, object]) -> Service:
        """A server of these settings for the caller alone; the caller stops it."""
        service = self.get(env)
        self._idle[_key(env)].remove(service)
        return service

    def close(self) -> None:
        for servers in self._idle.values():
            for service in servers:
                stop_later(service)
        self._idle.clear()


def _wanted(module: pytest.Module, items: list[pytest.Item]) -> list[tuple[dict, int]]:
    """The servers that the selected tests of `module` ask for with @pytest.mark.server: per settings, one to
    share, or one per test that takes its own if more (the tests that take one come after those that share it)."""
    envs: dict[frozenset, dict] = {}
    shared: set[frozenset] = set()
    own: dict[frozenset, int] = {}
    for item in items:
        marker = item.get_closest_marker("server")
        if marker is None or item.getparent(pytest.Module) is not module:
            continue
        key = _key(marker.args[0])
        envs[key] = marker.args[0]
        if marker.kwargs.get("own"):
            own[key] = own.get(key, 0) + 1
        else:
            shared.add(key)
    return [(env, max(own.get(key, 0), 1 if key in shared else 0)) for key, env in envs.items()]


@pytest.fixture(scope="module")
def server_pool(request, tmp_path_factory) -> Iterable[ServerPool]:
    """This module's servers (see ServerPool), all started at once when the first test needs one; stopped after
    the module."""
    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    try:
        pool.prestart(*_wanted(request.node, request.session.items))
        yield pool
    finally:
        pool.close()


@pytest.fixture
def server(request, server_pool) -> Iterable[Service]:
    """The server that the test's `@pytest.mark.server(settings)` asks for: shared by the module's tests with the
    same settings, or with `own=True` the test's alone, to kill, drain or stop (it is stopped after the test in
    any case)."""
    marker = request.node.get_closest_marker("server")
    assert marker is not None, "the `server` fixture needs @pytest.mark.server(settings)"
    if not marker.kwargs.get("own"):
        yield server_pool.get(marker.args[0])
        return
    service = server_pool.take(marker.args[0])
    yield service
    stop_later(service)


@pytest.fixture(scope="session")
def mock_service(tmp_path_factory):
    """Mock mode with a key set: auth on, at most 4 sequences running, a 1 MiB body limit."""
    service = Service({"ENABLE_MOCK_INFERENCE": "1", "NGC_API_KEY": API_KEY, "MAX_BATCH_SIZE": "4",
                       "MAX_REQUEST_BYTES": str(1024 * 1024)},
                      tmp_path_factory.mktemp("logs") / "mock.log")
    yield service
    stop_later(service)


@pytest.fixture(scope="session")
def auth_headers():
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny random-weight checkpoint in the official layout, written once per session."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_fp8_path(tiny_path, tmp_path_factory):
    """The FP8 checkpoint (ModelOpt layout, calibrated per-tensor scales) of the tiny one, once per session."""
    from model.quantization.export import write_fp8_checkpoint

    return write_fp8_checkpoint(tiny_path, tmp_path_factory.mktemp("tiny-fp8") / "ckpt", prompts=4)


@pytest.fixture(scope="session")
def tiny_service(tiny_path, tmp_path_factory):
    """The real engine on the tiny checkpoint, batching up to 8, behind a real server."""
    service = Service({"MODEL_ID": str(tiny_path), "NIM_REQUIRE_AUTH": "0", "MAX_BATCH_SIZE": "8"},
                      tmp_path_factory.mktemp("logs") / "tiny.log")
    yield service
    stop_later(service)
