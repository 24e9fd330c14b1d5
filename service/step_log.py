"""STEP_LOG: one JSON line per engine step, appended by the inference worker.

Keys (and nothing else, so that tools can rely on them): `t` (unix seconds when the step ended),
`prefill_tokens`, `prefill_rows`, `decode_rows`, `running`, `waiting`, `gpu_ms` (the step's model work,
up to the sampled ids on the host: on a GPU, the sampler's copy waits for the device) and `host_ms` (from
the end of the previous step's model work to the start of this one's: outputs, new requests,
scheduling; 0 after the engine was idle).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the API servers import this module through server.py: no torch there
    from engine.llm_engine import StepStats


class StepLog:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)  # line-buffered: one append per step, readable at once

    def write(self, stats: StepStats) -> None:
        self._file.write(json.dumps({
            "t": round(stats.ended_at, 6), "prefill_tokens": stats.prefill_tokens, "prefill_rows": stats.prefill_rows,
            "decode_rows": stats.decode_rows, "running": stats.running, "waiting": stats.waiting,
            "gpu_ms": round(stats.model_seconds * 1e3, 3), "host_ms": round(stats.host_seconds * 1e3, 3),
        }) + "\n")
