"""The operational routes beside chat completions: models, health, metadata, version, metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Response
from fastapi.responses import JSONResponse

from service import metrics
from service.protocol import ModelCard, ModelList
from service.state import SharedState

LIVE, READY, METRICS = "/v1/health/live", "/v1/health/ready", "/metrics"
LITSERVE_HEALTH = "/health"  # LitServe's own route
# Probes and scrapers call these without a key and are kept out of the access log.
OPEN_PATHS = frozenset({LIVE, READY, METRICS, LITSERVE_HEALTH})


@dataclass(frozen=True)
class ServiceInfo:
    served_model_name: str
    model_root: str
    max_model_len: int
    request_timeout: float
    metadata: dict  # its "version" is the release
    aliases: tuple[str, ...] = ()  # more names accepted in `model` and listed by /v1/models

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.served_model_name, *self.aliases)


class OperationalRoutes:
    def __init__(self, info: ServiceInfo, shared: SharedState, is_ready: Callable[[], bool]):
        self.info, self.shared, self.is_ready = info, shared, is_ready

    def endpoints(self) -> list[tuple[str, Callable, list[str]]]:
        return [("/v1/models", self.list_models, ["GET"]), (LIVE, self.live, ["GET"]), (READY, self.ready, ["GET"]),
                ("/v1/metadata", self.metadata, ["GET"]), ("/v1/version", self.version, ["GET"]),
                (METRICS, self.metrics, ["GET"])]

    async def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=self.info.model_root, max_model_len=self.info.max_model_len)
                               for name in self.info.model_names])

    async def live(self) -> JSONResponse:
        return JSONResponse({"object": "health.response", "message": "Service is live."})

    async def ready(self) -> JSONResponse:
        if self.is_ready():
            return JSONResponse({"object": "health.response", "message": "Service is ready."})
        return JSONResponse({"object": "health.response", "message": "Service is not ready."}, status_code=503)

    async def metadata(self) -> JSONResponse:
        # What the worker settled on at start: the device and dtype in use, the slots free memory allows.
        return JSONResponse({**self.info.metadata, "device": self.shared.engine_device,
                             "dtype": self.shared.engine_dtype, "max_running_sequences": self.shared.engine_slots})

    async def version(self) -> JSONResponse:
        return JSONResponse({"release": self.info.metadata["version"], "api": "1.0.0"})

    async def metrics(self) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)
