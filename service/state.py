"""State shared by LitServe's processes: the main process, the forked API servers and the
spawned inference workers.

Plain shared-memory values, created in the main process before any child starts: forked API
servers inherit them and spawned workers receive them pickled with the LitAPI at start-up.
"""

from __future__ import annotations

import multiprocessing as mp
import secrets

import numpy as np

CANCEL_SLOTS = 4096
# Spawn-context locks: inference workers are spawned, and forked API servers inherit them too.
_ctx = mp.get_context("spawn")


class SharedState:
    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self._in_flight = _ctx.Value("i", 0)
        self._worker_dead = _ctx.RawValue("b", 0)
        self._draining = _ctx.RawValue("b", 0)
        self._aborting = _ctx.RawValue("b", 0)
        # Ring of cancelled job ids: API servers write, workers read once per decoding step.
        self._cancelled = _ctx.RawArray("q", CANCEL_SLOTS)
        self._cancel_next = _ctx.Value("q", 0)
        # What the worker's engine settled on at start (the slot pool is sized there).
        self._engine_slots = _ctx.RawValue("i", 0)
        self._engine_where = _ctx.RawArray("c", 64)  # "<device> <dtype>"
        self._stop_workers = _ctx.RawValue("b", 0)

    # Admission ---------------------------------------------------------------------------
    @property
    def full(self) -> bool:
        return self._in_flight.value >= self.max_in_flight

    def try_admit(self) -> bool:
        with self._in_flight.get_lock():
            if self.full:
                return False
            self._in_flight.value += 1
            return True

    def release(self) -> None:
        with self._in_flight.get_lock():
            self._in_flight.value -= 1

    @property
    def in_flight(self) -> int:
        return self._in_flight.value

    # Health ------------------------------------------------------------------------------
    @property
    def worker_dead(self) -> bool:
        return bool(self._worker_dead.value)

    def mark_worker_dead(self) -> None:
        self._worker_dead.value = 1

    @property
    def draining(self) -> bool:
        return bool(self._draining.value)

    def start_draining(self) -> None:
        self._draining.value = 1

    @property
    def aborting(self) -> bool:
        """A second SIGTERM or Ctrl+C: requests in flight are cut off with 503 now."""
        return bool(self._aborting.value)

    def abort_in_flight(self) -> None:
        self._aborting.value = 1

    @property
    def workers_should_stop(self) -> bool:
        return bool(self._stop_workers.value)

    def stop_workers(self) -> None:
        """The drain is over: inference workers (which ignore SIGTERM) leave on their own, at once."""
        self._stop_workers.value = 1

    # Cancellation ------------------------------------------------------------------------
    @staticmethod
    def new_job_id() -> int:
        return secrets.randbits(62) + 1  # never 0, the ring's empty value

    def cancel(self, job_id: int) -> None:
        with self._cancel_next.get_lock():
            slot = self._cancel_next.value % CANCEL_SLOTS
            self._cancel_next.value += 1
        self._cancelled[slot] = job_id

    def cancelled_ids(self) -> np.ndarray:
        return np.frombuffer(self._cancelled, dtype=np.int64)

    # Engine ------------------------------------------------------------------------------
    @property
    def engine_slots(self) -> int:
        """Sequences the engine runs at once (0 until a worker is ready)."""
        return self._engine_slots.value

    @property
    def engine_device(self) -> str:
        """The device the worker's engine runs on ("" until a worker is ready)."""
        return self._engine_where.value.decode().partition(" ")[0]

    @property
    def engine_dtype(self) -> str:
        return self._engine_where.value.decode().partition(" ")[2]

    def set_engine(self, slots: int, device: str, dtype: str) -> None:
        self._engine_slots.value = slots
        self._engine_where.value = f"{device} {dtype}".encode()[:63]
