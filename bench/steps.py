"""The service's per-step log (`STEP_LOG=<path>`: one JSON line per engine step), summarised.

Each line has `t` (unix seconds), `prefill_tokens`, `prefill_rows`, `decode_rows`, `running`,
`waiting`, `gpu_ms` and `host_ms` (host time between the end of one step and the start of the next).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_steps(path: Path) -> list[dict] | None:
    """The log's records (lines that do not parse are skipped: the last one may be half-written), or None
    when there is no such file."""
    if not path.is_file():
        return None
    records = []
    with path.open("r", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _numbers(records: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None}
    arr = np.asarray(values)
    return {"mean": round(float(arr.mean()), 3), "p50": round(float(np.percentile(arr, 50)), 3),
            "p90": round(float(np.percentile(arr, 90)), 3)}


def summarize_steps(records: list[dict], start: float | None = None, end: float | None = None) -> dict:
    """Steps whose `t` is in [start, end) (all when no bounds): how many, mean decode rows, share of steps
    with a prefill, gpu_ms and host_ms (mean, p50, p90), and the host's share of the wall time
    (sum of host_ms over sum of gpu_ms + host_ms)."""
    chosen = [r for r in records
              if (start is None or _t(r) >= start) and (end is None or _t(r) < end)]
    decode_rows = _numbers(chosen, "decode_rows")
    gpu, host = _numbers(chosen, "gpu_ms"), _numbers(chosen, "host_ms")
    busy = sum(gpu) + sum(host)
    return {
        "steps": len(chosen),
        "mean_decode_rows": round(float(np.mean(decode_rows)), 2) if decode_rows else None,
        "share_with_prefill": (round(sum(1 for r in chosen if (r.get("prefill_tokens") or 0) > 0) / len(chosen), 3)
                               if chosen else None),
        "mean_prefill_tokens": round(float(np.mean(_numbers(chosen, "prefill_tokens"))), 1)
        if _numbers(chosen, "prefill_tokens") else None,
        "gpu_ms": _stats(gpu),
        "host_ms": _stats(host),
        "host_share_of_wall": round(sum(host) / busy, 3) if busy > 0 else None,
    }


def _t(record: dict) -> float:
    t = record.get("t")
    return float(t) if isinstance(t, (int, float)) else float("nan")
