"""Process lifecycle in the main process: graceful SIGTERM drain and inference-worker death.

LitServe's own handling falls short for a service behind a supervisor: a plain SIGTERM left an
orphaned API server holding the port, and a dead worker left requests hanging. Here SIGTERM (or Ctrl+C) stops
admission, lets in-flight requests finish (bounded by a grace period) and exits 0; a dead worker
fails in-flight requests with 503 (the API servers poll the shared flag), turns readiness off,
and the process exits non-zero so that Docker, Kubernetes or systemd restart it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time

from service.state import SharedState

logger = logging.getLogger(__name__)
WORKER_DIED_EXIT_CODE = 3
_stopping = threading.Event()


def ignore_stop_signals_in_worker() -> None:
    """Inference workers leave SIGTERM and Ctrl+C to the main process, which drains first and then stops them.

    Without this, a signal sent to the whole process group (systemd's default, `kill -TERM -PGID`, or
    Ctrl+C in a terminal) would kill the worker under the requests the drain is waiting for.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def install_drain(shared: SharedState, grace_period: float) -> None:
    """SIGTERM or Ctrl+C: stop admitting, let in-flight requests finish (up to the grace period), exit 0.
    A second signal stops at once."""
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid or _stopping.is_set():
            return  # the drain is over and LitServe is stopping: an interruption now would leave processes behind
        if shared.draining:
            raise KeyboardInterrupt
        logger.info("%s: refusing new requests, draining %d in flight (up to %.0fs)", signal.Signals(signum).name,
                    shared.in_flight, grace_period)
        shared.start_draining()
        deadline = time.monotonic() + grace_period
        while shared.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        if shared.in_flight:
            logger.warning("grace period over with %d requests still in flight", shared.in_flight)
        _stopping.set()  # from here on, workers end because we end them
        shared.stop_workers()  # rather than wait out LitServe's 5 s before it kills them
        raise KeyboardInterrupt  # LitServe's run() shuts everything down on this

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _api_servers() -> list[mp.Process]:
    """LitServe's forked uvicorn processes (named LitServer-N), children of this process."""
    return [p for p in mp.active_children() if p.name.startswith("LitServer-")]


def watch_workers(server, shared: SharedState, interval: float = 0.5, flush_seconds: float = 2.0) -> None:
    """Start a thread that notices a dead inference worker or API server and takes the service down."""
    server._monitor_workers = False  # LitServe's monitor would shut down without answering anyone
    # LitServe keeps the port closed until a worker has loaded the model, which can take a long
    # first download; we listen at once so that liveness answers and readiness says "not yet".
    # A worker whose setup fails exits, and the watch below takes the service down.
    server.verify_worker_status = lambda: None

    def watch():
        api_servers: list[mp.Process] = []
        while not getattr(server, "inference_workers", None) or not api_servers:
            api_servers = api_servers or _api_servers()
            time.sleep(interval)
        while True:
            if _stopping.is_set():
                return
            dead = [p for p in server.inference_workers if not p.is_alive()]
            if dead:  # during a drain too: its requests must not hang
                was_ready = bool(shared.engine_slots)
                if was_ready:
                    logger.error("inference worker %s (pid %s) died with exit code %s; failing in-flight "
                                 "requests and exiting with code %d", dead[0].name, dead[0].pid, dead[0].exitcode,
                                 WORKER_DIED_EXIT_CODE)
                else:  # its setup failed, and said why above
                    logger.error("the inference worker stopped before it was ready (exit code %s); exiting with "
                                 "code %d", dead[0].exitcode, WORKER_DIED_EXIT_CODE)
                shared.mark_worker_dead()
                if was_ready:
                    time.sleep(flush_seconds)  # the API servers answer their waiting requests with 503
                server._shutdown_event.set()  # run() returns and LitServe stops its processes
                return
            gone = [p for p in api_servers if not p.is_alive()]
            if gone and not shared.draining:  # after SIGTERM to the whole group they end on purpose
                # Nothing answers on the port any more (liveness included): exit so that the
                # supervisor starts a fresh service, rather than hang with the port held.
                logger.error("API server %s (pid %s) died with exit code %s; exiting with code %d",
                             gone[0].name, gone[0].pid, gone[0].exitcode, WORKER_DIED_EXIT_CODE)
                shared.mark_worker_dead()
                shared.stop_workers()  # nothing can reach them any more: they leave now, not after LitServe's 5 s
                server._shutdown_event.set()
                return
            time.sleep(interval)

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()
