"""Caption service for NVIDIA Nemotron Nano 12B v2 VL: settings and wiring.

`python server.py` starts an OpenAI-compatible `POST /v1/chat/completions` that nv-ingest can call
in place of the NIM. Every setting is an environment variable (see README.md); this file reads
them once, builds the LitAPI around the engine, and hands both to LitServe.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from importlib.metadata import version
from typing import Literal, Optional

import litserve as ls
from fastapi import Request
from starlette.middleware.cors import CORSMiddleware
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.request import EngineRequest, RequestOutput
from model.official import MODEL_ID, SERVED_MODEL_NAME
from service import metrics
from service.auth import BearerAuth
from service.body_limit import BodyLimitMiddleware
from service.connections import uvicorn_options
from service.errors import install_error_handlers
from service.engine_loop import EngineLoop
from service.jobs import JobLimits, PromptCheck, QueuedJob
from service.lifecycle import (WORKER_DIED_EXIT_CODE, exit_code, ignore_stop_signals_in_worker, install_drain,
                               watch_workers)
from service.observability import RequestContextMiddleware, configure_logging, one_line
from service.remote_images import RemoteImagePolicy
from service.routes import ServiceInfo
from service.spec import CaptionSpec
from service.state import SharedState
from service.step_log import StepLog
from service.transport import StepTransport

__version__ = "0.1.0"

logger = logging.getLogger("caption")


class Settings(BaseSettings):
    """All configuration, from environment variables (names are the field names, upper-cased)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Serving
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(64, ge=1, description="sequences decoded together (at most; fewer if GPU memory "
                                                      "is short)")
    max_prefill_tokens: int = Field(2048, ge=1, description="prompt tokens prefilled per engine step (chunked "
                                                           "prefill)")
    workers_per_device: int = Field(1, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = "text"
    max_queued_requests: int = Field(256, ge=1, description="requests admitted and not yet answered")
    request_timeout: float = Field(120.0, gt=0, description="seconds a request may wait and run")
    request_read_timeout: float = Field(30.0, gt=0, description="seconds a client has to send a whole request")
    max_connections: int = Field(1000, ge=1, description="open connections per API server; 503 above")
    shutdown_grace_period: float = Field(120.0, ge=0, description="seconds SIGTERM waits for in-flight work")
    step_log: Optional[str] = Field(None, description="file the inference worker appends one JSON line per "
                                                      "engine step to (service/step_log.py); unset = off")

    # Model
    enable_mock_inference: bool = False
    mock_token_delay: float = Field(0.0, ge=0, description="seconds per mock decoding step")
    model_id: str = MODEL_ID
    model_revision: Optional[str] = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_num_tiles: int = Field(12, ge=1, le=12)
    nim_served_model_name: str = Field(SERVED_MODEL_NAME, description="comma-separated names accepted in `model`; "
                                       "the first is the one answers report")
    quantization: Literal["auto", "fp8"] = Field("auto", description="auto: as the checkpoint declares; fp8: an FP8 "
                                                 "checkpoint, or random FP8 weights with LOAD_FORMAT=dummy")
    max_model_len: int = Field(16384, ge=64, description="prompt plus output tokens of one request (the size "
                                                         "of one slot)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="share of GPU memory for weights, "
                                                                           "activations and the slot pool")
    ssm_state_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    enforce_eager: bool = Field(False, description="no CUDA graphs for decoding (slower; for debugging)")
    load_format: Literal["safetensors", "dummy"] = Field(
        "safetensors", description="dummy: random weights, for benchmarks without the checkpoint")

    # Request limits
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body; 413 above")
    default_max_tokens: int = Field(1024, ge=1)
    max_output_tokens: int = Field(4096, ge=1)
    max_images_per_request: int = Field(4, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_request_pixels: int = Field(100_000_000, ge=1, description="decoded pixels of all images of one request")
    max_prompt_chars: int = Field(32_000, ge=1, description="characters of text across all messages")
    allow_remote_images: bool = False
    remote_image_timeout: float = Field(10.0, gt=0, description="seconds per remote image, redirects included")
    remote_image_max_bytes: int = Field(8 * 1024 * 1024, ge=1)
    remote_image_hosts: str = Field("", description="comma-separated hosts (*.example.com for subdomains); "
                                                    "empty = any public host")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty = CORS off")

    # Caption cache (per API-server process)
    caption_cache_size: int = Field(0, ge=0, description="cached captions; 0 = off")
    caption_cache_sampled: bool = Field(False, description="also cache requests with temperature > 0")

    # Auth: the same variables nv-ingest reads for its side.
    api_key: Optional[SecretStr] = Field(None, validation_alias=AliasChoices("NGC_API_KEY", "NVIDIA_API_KEY"))
    nim_require_auth: bool = True

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value):
        return value.lower() if isinstance(value, str) else value

    def api_keys(self) -> list[str]:
        if not self.nim_require_auth or self.api_key is None:
            return []
        return [self.api_key.get_secret_value()]

    def model_quantization(self) -> str:
        """"fp8" or "none": what the checkpoint declares (QUANTIZATION=fp8 says fp8), read without loading it."""
        if self.quantization == "fp8":
            return "fp8"
        if self.enable_mock_inference:  # no model: the name of MODEL_ID decides
            return "fp8" if "fp8" in self.model_id.lower() else "none"
        from model.quantization.config import declared_quantization

        return declared_quantization(self.model_id, self.model_revision)

    def served_model_names(self, quantization: str) -> list[str]:
        """NIM_SERVED_MODEL_NAME's names; by default the model's name and its variant's (`...-bf16`, `...-fp8`)."""
        if "nim_served_model_name" in self.model_fields_set:
            names = [n.strip() for n in self.nim_served_model_name.split(",") if n.strip()]
            return list(dict.fromkeys(names)) or [SERVED_MODEL_NAME]
        return [SERVED_MODEL_NAME, f"{SERVED_MODEL_NAME}-{'fp8' if quantization == 'fp8' else 'bf16'}"]

    def metadata(self, quantization: str = "none") -> dict:
        names = self.served_model_names(quantization)
        return {
            "version": __version__,
            "modelInfo": [{"shortName": name, "modelUrl": self.model_id} for name in names],
            "served_model_names": names,
            "quantization": quantization,
            "model_id": self.model_id,
            "revision": self.model_revision,
            "mock": self.enable_mock_inference,
            "max_num_tiles": self.max_num_tiles,
            "max_batch_size": self.max_batch_size,
            "max_prefill_tokens": self.max_prefill_tokens,
            "max_model_len": self.max_model_len,
            "ssm_state_dtype": self.ssm_state_dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "workers_per_device": self.workers_per_device,
            "litserve": version("litserve"),
        }

    def limits(self) -> JobLimits:
        return JobLimits(default_max_tokens=self.default_max_tokens, max_output_tokens=self.max_output_tokens,
                         max_images=self.max_images_per_request, max_image_pixels=self.max_image_pixels,
                         max_num_tiles=self.max_num_tiles, max_prompt_chars=self.max_prompt_chars,
                         max_model_len=self.max_model_len, max_request_pixels=self.max_request_pixels,
                         remote_images=RemoteImagePolicy.from_settings(
                             self.allow_remote_images, self.remote_image_timeout, self.remote_image_max_bytes,
                             self.remote_image_hosts))

    def auth_summary(self) -> str:
        """Whether requests need a key, and which variable gave it (never the key itself)."""
        if not self.api_keys():
            if self.api_key is not None and not self.nim_require_auth:
                return "off (NIM_REQUIRE_AUTH=0; the key that is set is not checked)"
            return "off (neither NGC_API_KEY nor NVIDIA_API_KEY is set)"
        source = next((name for name in ("NGC_API_KEY", "NVIDIA_API_KEY")
                       if any(k.upper() == name and v for k, v in os.environ.items())), "NGC_API_KEY")
        return f"required (Authorization: Bearer <key>, the key from {source})"

    def accelerator(self) -> str:
        if self.enable_mock_inference or self.device == "cpu":
            return "cpu"
        return "cuda" if self.device.startswith("cuda") else "auto"


class CaptionAPI(ls.LitAPI):
    """Runs in the inference worker: one engine, stepped by `EngineLoop` (continuous batching)."""

    def __init__(self, settings: Settings, shared: SharedState):
        quantization = settings.model_quantization()
        first, *aliases = settings.served_model_names(quantization)
        info = ServiceInfo(first, settings.model_id, settings.max_model_len, settings.request_timeout,
                           settings.metadata(quantization), tuple(aliases))
        prompt_check = None if settings.enable_mock_inference else PromptCheck(
            settings.model_id, settings.model_revision, settings.max_model_len)
        super().__init__(spec=CaptionSpec(info, settings.limits(), shared, settings.caption_cache_size,
                                          settings.caption_cache_sampled, prompt_check), loop=EngineLoop())
        self.settings = settings
        self.shared = shared
        self.auth = BearerAuth(settings.api_keys())

    def setup(self, device: str) -> None:
        ignore_stop_signals_in_worker()
        configure_logging(self.settings.log_level, self.settings.log_format)  # a spawned worker starts bare
        if mp.parent_process() is not None and (self.settings.enable_mock_inference or device.startswith("cuda")):
            # A worker process whose torch work on the CPU is small per-step tensors: a thread pool only
            # adds waiting, badly so on a busy machine (10x slower steps measured on 2 shared cores).
            import torch

            torch.set_num_threads(1)
        try:
            self.engine = self._build_engine(device)
        except Exception as exc:  # noqa: BLE001 - one line for the operator; the traceback only at DEBUG
            logger.error("the model could not be loaded: %s", one_line(exc), exc_info=logger.isEnabledFor(logging.DEBUG))
            raise SystemExit(1) from None  # the main process sees the worker gone and exits non-zero
        self.step_log = StepLog(self.settings.step_log) if self.settings.step_log else None
        runner = self.engine.runner
        self.shared.set_engine(self.engine.scheduler.num_slots, str(runner.device), str(runner.dtype).removeprefix("torch."))

    def _build_engine(self, device: str):
        s = self.settings
        if s.enable_mock_inference:
            from model.mock import mock_engine

            return mock_engine(s.max_batch_size, s.max_model_len, s.max_prefill_tokens, s.mock_token_delay)
        from model.engine import load_engine

        # DEVICE=auto takes the device LitServe gives this worker ("cuda:N" or "cpu").
        return load_engine(s.model_id, s.model_revision, device=device if s.device == "auto" else s.device,
                           dtype=s.dtype, max_num_tiles=s.max_num_tiles, max_running=s.max_batch_size,
                           max_seq_len=s.max_model_len, max_prefill_tokens=s.max_prefill_tokens,
                           ssm_dtype=s.ssm_state_dtype, memory_fraction=s.gpu_memory_utilization,
                           load_format=s.load_format, enforce_eager=s.enforce_eager, quantization=s.quantization)

    def authorize(self, request: Request) -> None:
        self.auth.check(request)

    def should_stop(self) -> bool:
        return self.shared.workers_should_stop

    def cancelled_jobs(self) -> set[int]:
        """Jobs the API servers gave up on (client gone); read once per engine step."""
        return set(self.shared.cancelled_ids().tolist())

    def decode_request(self, request: QueuedJob) -> EngineRequest:
        # Validated, decoded and tiled in the API server (service/jobs.py): only the engine's part goes in.
        return request.request

    def predict(self, x=None) -> Iterator[RequestOutput]:
        """One engine step: the outputs of every request that advanced in it."""
        yield from self.engine.step()

    def encode_response(self, outputs: Iterable[RequestOutput]) -> Iterator[RequestOutput]:
        yield from outputs  # typed all the way to the API server, which builds the OpenAI shapes


class CaptionServer(ls.LitServer):
    """LitServer with the worker -> API-server transport replaced by ours (service/transport.py)."""

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        self._transport.close(send_sentinel=False)  # the Manager queues LitServe made, never used
        self._transport = StepTransport.create(num_api_servers)
        return manager


def build_server(settings: Settings, shared: SharedState) -> ls.LitServer:
    # The body limit sits innermost, so request ids, logs and CORS also cover its 413s.
    middlewares = [(BodyLimitMiddleware, {"max_bytes": settings.max_request_bytes}), RequestContextMiddleware]
    if settings.cors_origins:
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        middlewares.append((CORSMiddleware, {"allow_origins": origins, "allow_methods": ["GET", "POST"],
                                             "allow_headers": ["Authorization", "Content-Type", "X-Request-ID"]}))
    server = CaptionServer(CaptionAPI(settings, shared), accelerator=settings.accelerator(),
                          workers_per_device=settings.workers_per_device, timeout=False, middlewares=middlewares)
    install_error_handlers(server.app)
    return server


def _env_names(name: str, field) -> list[str]:
    alias = field.validation_alias
    return list(alias.choices) if isinstance(alias, AliasChoices) else [name.upper()]


def _setting_problem(error: dict) -> str:
    """One bad setting as `NAME='value': what is allowed`, with the allowed values rather than a pattern."""
    name = ".".join(map(str, error["loc"])).upper()
    field = Settings.model_fields.get(name.lower())
    value = error.get("input")
    shown_value = "<hidden>" if field is not None and field.annotation in (SecretStr, Optional[SecretStr]) else repr(value)
    message = error["msg"]
    if error["type"] == "string_pattern_mismatch" and field is not None and field.description:
        message = f"should be {field.description}"
    return f"{name}={shown_value}: {message}"


def read_settings() -> Settings:
    """The settings, or an exit with one line naming each bad variable, its value and what it may be."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SystemExit("configuration error: " + "; ".join(map(_setting_problem, exc.errors()))) from None


def settings_help() -> str:
    """`python server.py --help`: every setting with its default and meaning."""
    lines = [__doc__.strip().splitlines()[0], "",
             "usage: [NAME=value ...] python server.py", "",
             "Every setting is an environment variable (README.md, Configuration). Tracing uses OpenTelemetry's",
             "standard OTEL_* variables (off unless OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_ENDPOINT is set).", ""]
    for name, field in Settings.model_fields.items():
        default = "unset" if field.default is None else str(field.default).lower() if isinstance(field.default, bool) \
            else str(field.default)
        names = ", ".join(_env_names(name, field))
        lines.append(f"  {names:<28} default {default}" + (f"  ({field.description})" if field.description else ""))
    return "\n".join(lines)


def check_port(host: str, port: int) -> None:
    """Exit with one line, before any process starts, when HOST:PORT cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        raise SystemExit(port_problem(host, port, exc)) from None


def port_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        advice = "another process is listening there: stop it, or set PORT to a free port"
    elif exc.errno == errno.EACCES:
        advice = "ports below 1024 need root: set PORT to 1024 or above (8000 by default)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        advice = "this machine has no such address: set HOST to 0.0.0.0, 127.0.0.1 or one of its addresses"
    else:
        advice = "set HOST and PORT to an address and port this machine can listen on"
    return f"PORT={port} (HOST={host}): cannot listen there ({exc.strerror or exc}): {advice}"


def check_device(settings: Settings) -> None:
    """DEVICE=cuda[:N] on a machine without a visible GPU: say so in one line, whatever the model."""
    if not settings.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"DEVICE={settings.device}: no CUDA GPU is visible on this machine: run where one is, or "
                         "set DEVICE=cpu for the tiny checkpoint (python -m model.tiny DIR) or ENABLE_MOCK_INFERENCE=1")
    if ":" in settings.device and int(settings.device.split(":")[1]) >= torch.cuda.device_count():
        raise SystemExit(f"DEVICE={settings.device}: this machine has {torch.cuda.device_count()} visible GPU(s), "
                         f"numbered from 0: set DEVICE=cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or cuda")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args:
        if args[0] in ("-h", "--help"):
            print(settings_help())
            return
        raise SystemExit(f"python server.py takes no arguments (got {' '.join(args)}): every setting is an "
                         "environment variable; python server.py --help lists them")
    settings = read_settings()
    configure_logging(settings.log_level, settings.log_format)
    check_port(settings.host, settings.port)
    metrics.clear_stale_files()
    if not settings.enable_mock_inference:
        from model.loader import check_can_run, check_model_source

        check_device(settings)
        check_can_run(settings.model_id, settings.device)
        check_model_source(settings.model_id, settings.model_revision)
    quantization = settings.model_quantization()
    logger.info("serving %s (quantization %s) as %s (mock=%s, max_batch_size=%d, max_model_len=%d, "
                "max_prefill_tokens=%d)", settings.model_id, quantization,
                ", ".join(f"'{n}'" for n in settings.served_model_names(quantization)), settings.enable_mock_inference,
                settings.max_batch_size, settings.max_model_len, settings.max_prefill_tokens)
    logger.info("API key: %s", settings.auth_summary())
    shared = SharedState(settings.max_queued_requests)
    server = build_server(settings, shared)
    install_drain(shared, settings.shutdown_grace_period)
    watch_workers(server, shared)
    server.run(host=settings.host, port=settings.port, generate_client_file=False,
               log_level=settings.log_level.lower(), access_log=False, log_config=None,
               **uvicorn_options(settings.request_read_timeout, settings.max_connections))
    if shared.worker_dead:
        sys.exit(WORKER_DIED_EXIT_CODE)
    if exit_code():
        sys.exit(exit_code())  # a second signal cut requests off


if __name__ == "__main__":
    main()
