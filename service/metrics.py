"""Prometheus metrics, safe across LitServe's processes.

LitServe runs API servers and inference workers as separate processes, so metrics use
prometheus-client's multiprocess mode: every process writes to files in one directory and
`/metrics` merges them. The directory must be known before prometheus_client is imported,
hence the setup at import time (children inherit the variable).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="caption-metrics-")

from prometheus_client import (  # noqa: E402 - must follow the directory setup above
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)

REQUESTS = Counter("caption_http_requests_total", "HTTP requests by route and status.", ["route", "status"])
LATENCY = Histogram("caption_request_latency_seconds", "Time from request to last byte, by route.", ["route"],
                    buckets=_LATENCY_BUCKETS)
TTFT = Histogram("caption_time_to_first_token_seconds", "Time from admission to the first generated text.",
                 buckets=_LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("caption_queue_depth", "Requests admitted and waiting for the model to start on them.",
                    multiprocess_mode="livesum")
IN_FLIGHT = Gauge("caption_requests_in_flight", "Requests admitted and not yet answered.",
                  multiprocess_mode="livesum")
REJECTED = Counter("caption_requests_rejected_total", "Requests refused before queuing, by reason.", ["reason"])
for _reason in ("queue_full", "not_ready"):  # exported at 0 from the start, so rates work before the first one
    REJECTED.labels(_reason)
BATCH_SIZE = Histogram("caption_batch_size", "Sequences decoded together, per engine step.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
RUNNING = Gauge("caption_running_sequences", "Sequences holding a slot (prefilling or decoding).",
                multiprocess_mode="livesum")
WAITING = Gauge("caption_waiting_requests", "Requests in the engine waiting for a slot.", multiprocess_mode="livesum")
STEP_SECONDS = Histogram("caption_step_seconds", "Time of one engine step (prefill chunks, decode, sampling).",
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
PREFILL_TOKENS = Histogram("caption_prefill_tokens_per_step", "Prompt tokens prefilled in one engine step.",
                           buckets=(16, 64, 256, 512, 1024, 2048, 4096, 8192))
IMAGES = Counter("caption_images_total", "Images processed.")
TILES = Counter("caption_tiles_total", "Image tiles processed by the vision encoder.")
PROMPT_TOKENS = Counter("caption_prompt_tokens_total", "Prompt tokens, image tokens included.")
COMPLETION_TOKENS = Counter("caption_completion_tokens_total", "Generated tokens.")
CACHE_HITS = Counter("caption_cache_hits_total", "Caption cache hits.")
CACHE_MISSES = Counter("caption_cache_misses_total", "Caption cache misses.")
GPU_MEMORY = Gauge("caption_gpu_memory_allocated_bytes", "GPU memory allocated by the inference worker.",
                   ["device"], multiprocess_mode="livemax")


def render() -> tuple[bytes, str]:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def clear_stale_files() -> None:
    """Drop files left by an earlier run in a reused PROMETHEUS_MULTIPROC_DIR (its counters would add up)."""
    own = f"_{os.getpid()}.db"
    for path in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        if not path.name.endswith(own):
            path.unlink(missing_ok=True)
