"""Caption service for NVIDIA Nemotron Nano 12B v2 VL: settings and wiring.

`python server.py` starts an OpenAI-compatible `POST /v1/chat/completions` that nv-ingest can call
in place of the NIM. Every setting is an environment variable (see README.md); this file reads
them once, builds the LitAPI around the engine, and hands both to LitServe.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional

import litserve as ls
from fastapi import Request
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.types import CaptionJob, Delta
from service.auth import BearerAuth
from service.errors import install_error_handlers
from service.jobs import JobLimits
from service.spec import CaptionSpec

logger = logging.getLogger("caption")


class Settings(BaseSettings):
    """All configuration, from environment variables (names are the field names, upper-cased)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Serving
    host: str = "0.0.0.0"
    port: int = 8000
    max_batch_size: int = Field(8, ge=1)
    batch_timeout: float = Field(0.05, ge=0.0, description="seconds a batch waits to fill")
    workers_per_device: int = Field(1, ge=1)
    log_level: str = "info"

    # Model
    enable_mock_inference: bool = False
    model_id: str = "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16"
    model_revision: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    max_num_tiles: int = Field(12, ge=1, le=12)
    nim_served_model_name: str = "nvidia/nemotron-nano-12b-v2-vl"
    max_model_len: int = 131072

    # Request limits
    default_max_tokens: int = Field(1024, ge=1)
    max_output_tokens: int = Field(4096, ge=1)
    max_images_per_request: int = Field(4, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)

    # Auth: the same variables nv-ingest reads for its side.
    api_key: Optional[SecretStr] = Field(None, validation_alias=AliasChoices("NGC_API_KEY", "NVIDIA_API_KEY"))
    nim_require_auth: bool = True

    def api_keys(self) -> list[str]:
        if not self.nim_require_auth or self.api_key is None:
            return []
        return [self.api_key.get_secret_value()]

    def limits(self) -> JobLimits:
        return JobLimits(default_max_tokens=self.default_max_tokens, max_output_tokens=self.max_output_tokens,
                         max_images=self.max_images_per_request, max_image_pixels=self.max_image_pixels)


class CaptionAPI(ls.LitAPI):
    """Runs in each inference worker: one engine, one `generate` per LitServe batch."""

    def __init__(self, settings: Settings):
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout,
            spec=CaptionSpec(settings.nim_served_model_name, settings.model_id, settings.max_model_len,
                             settings.limits()),
        )
        self.settings = settings
        self.auth = BearerAuth(settings.api_keys())

    def setup(self, device: str) -> None:
        if self.settings.enable_mock_inference:
            from model.mock import MockEngine

            self.engine = MockEngine()
        else:
            from model.engine import load_engine

            self.engine = load_engine(self.settings, device)

    def authorize(self, request: Request) -> None:
        self.auth.check(request)

    def decode_request(self, request: CaptionJob) -> CaptionJob:
        return request  # validated and decoded in the API server (service/jobs.py)

    def batch(self, inputs: list[CaptionJob]) -> list[CaptionJob]:
        return list(inputs)

    def predict(self, x):
        # LitServe passes a single job when max_batch_size is 1 and a list above (upstream #412).
        batched = isinstance(x, list)
        for step in self.engine.generate(x if batched else [x]):
            yield step if batched else step[0]

    def unbatch(self, output):
        return output  # predict already yields per-step lists aligned with the batch

    def encode_response(self, output):
        for step in output:
            yield [_encode(d) for d in step] if isinstance(step, list) else _encode(step)


def _encode(delta: Delta | None) -> dict | None:
    return None if delta is None else delta.__dict__


def build_server(settings: Settings) -> ls.LitServer:
    server = ls.LitServer(CaptionAPI(settings), accelerator="cpu" if settings.enable_mock_inference else "auto",
                          workers_per_device=settings.workers_per_device, timeout=False)
    install_error_handlers(server.app)
    return server


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.enable_mock_inference:
        from model.engine import check_can_run

        check_can_run(settings)
    logger.info("serving %s as '%s' (mock=%s, max_batch_size=%d, batch_timeout=%.3fs)",
                settings.model_id, settings.nim_served_model_name, settings.enable_mock_inference,
                settings.max_batch_size, settings.batch_timeout)
    _stop_on_sigterm()
    build_server(settings).run(host=settings.host, port=settings.port, generate_client_file=False,
                               log_level=settings.log_level.lower())


def _stop_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl+C, so LitServe's shutdown also stops its forked API servers."""
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() == main_pid:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    main()
