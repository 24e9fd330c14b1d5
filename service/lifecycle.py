"""Process lifecycle in the main process: graceful SIGTERM drain and inference-worker death.

LitServe's own handling falls short for a service behind a supervisor: a plain SIGTERM left an
orphaned API server holding the port, and a dead worker left requests hanging. Here SIGTERM (or Ctrl+C) stops
admission, lets in-flight requests finish (bounded by a grace period) and exits 0; a second signal
cuts the requests still in flight off with 503 (the API servers poll the shared flag; streams get a
final error event) and stops at once, exiting 128 + the signal's number when it cut any off. A dead
worker fails in-flight requests with 503, turns readiness off, and the process exits non-zero so
that Docker, Kubernetes or systemd restart it.

When the signal reaches the whole process group, the API servers (uvicorn) get it too: they stop
listening at once (the listening socket is shut down, so new connections are refused rather than
left in the backlog of a socket that other processes still hold open), and a second signal does not
make uvicorn cancel the requests under way (tracebacks, a plain-text 500): they end with the 503 above.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time

import uvicorn

from service.state import SharedState

logger = logging.getLogger(__name__)
WORKER_DIED_EXIT_CODE = 3
ABORT_FLUSH_SECONDS = 2.0  # after a second signal: time for the API servers to answer 503 (they poll every 0.25 s)
_stopping = threading.Event()
_cut_off = {"signal": 0, "requests": 0}


def exit_code() -> int:
    """0, or 128 + the signal's number when a second signal cut requests off."""
    return 128 + _cut_off["signal"] if _cut_off["requests"] else 0


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
            abort(signum)
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

    def abort(signum):
        """The second signal, during the drain: cut off what is in flight with 503, then stop."""
        _stopping.set()
        _cut_off.update(signal=signum, requests=shared.in_flight)
        logger.warning("%s again: stopping now, cutting off %d requests in flight with 503",
                       signal.Signals(signum).name, shared.in_flight)
        shared.abort_in_flight()
        deadline = time.monotonic() + ABORT_FLUSH_SECONDS
        while shared.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        shared.stop_workers()
        raise KeyboardInterrupt  # out of the first signal's drain loop too: LitServe's run() shuts down

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    _patch_uvicorn_exit()


def _patch_uvicorn_exit() -> None:
    """How the API servers (uvicorn, forked from this process) take a stop signal of their own."""
    if getattr(uvicorn.Server.handle_exit, "_caption", False):
        return
    original = uvicorn.Server.handle_exit

    def handle_exit(self, sig, frame):
        if self.should_exit:
            # A second signal: uvicorn would cancel the requests under way (SIGINT) or keep waiting for
            # them (SIGTERM). The main process got it too and cuts them off with 503; end soon after.
            if not getattr(self, "_caption_force_timer", None):
                self._caption_force_timer = threading.Timer(ABORT_FLUSH_SECONDS + 1.0,
                                                            lambda: setattr(self, "force_exit", True))
                self._caption_force_timer.daemon = True
                self._caption_force_timer.start()
            return
        _stop_listening_soon(self)
        original(self, sig, frame)

    handle_exit._caption = True
    uvicorn.Server.handle_exit = handle_exit


def _stop_listening_soon(server) -> None:
    try:
        import asyncio

        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # not serving yet: nothing to stop
    loop.call_soon_threadsafe(_stop_listening, server)


def _stop_listening(server) -> None:
    """Close this process's listeners and shut the listening socket down for every process that shares it
    (the main process and LitServe's manager hold copies): connections are refused from now on."""
    for listener in getattr(server, "servers", []):
        fds = [os.dup(sock.fileno()) for sock in (listener.sockets or ())]
        listener.close()
        for fd in fds:
            with socket.socket(fileno=fd) as shared_socket:
                try:
                    shared_socket.shutdown(socket.SHUT_RD)
                except OSError:
                    pass  # already shut down by another API server


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
