"""Per-request id, access log line and HTTP metrics, as one pure ASGI middleware; log formatting.

Pure ASGI rather than BaseHTTPMiddleware so that streamed answers are timed to their last byte
and are not buffered.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from opentelemetry import context as otel_context
from opentelemetry import trace

from service import metrics, tracing
from service.routes import OPEN_PATHS

access_log = logging.getLogger("caption.access")
_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")
# uvicorn adds `color_message`, the same message with ANSI colours: never a field of ours.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class RequestContextMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["log_fields"] = {}
        start = time.perf_counter()
        status = 500
        span = None
        token = None
        if scope["path"] not in OPEN_PATHS and tracing.enabled():  # probes and scrapes are not traced
            span = tracing.tracer().start_span(
                f"{scope['method']} {scope['path']}", context=tracing.incoming_context(headers),
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": scope["method"], "url.path": scope["path"],
                            "caption.request_id": request_id})
            token = otel_context.attach(trace.set_span_in_context(span))
            trace_id = tracing.trace_id_of(span)
            if trace_id:
                state["log_fields"]["trace_id"] = trace_id

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = _route_label(scope)
            if span is not None:
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                for key in ("images", "tiles", "prompt_tokens", "completion_tokens", "finish_reason"):
                    if key in state["log_fields"]:
                        span.set_attribute(f"caption.{key}", state["log_fields"][key])
                if status >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
                span.end()
                otel_context.detach(token)
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.LATENCY.labels(route).observe(elapsed)
            if route not in OPEN_PATHS:  # probes and scrapes would drown the log
                access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], status, elapsed * 1000,
                                extra={"request_id": request_id, "method": scope["method"], "path": scope["path"],
                                       "status": status, "latency_ms": round(elapsed * 1000, 1),
                                       **state["log_fields"]})


def _route_label(scope) -> str:
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    # Answered before routing (a 413 from the body limit): label it by the route its path names.
    app = scope.get("app")
    known = {getattr(route, "path", None) for route in getattr(app, "routes", ())}
    return scope["path"] if scope.get("path") in known else "unmatched"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any `extra=` fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        return line + ("".join(f" {k}={v}" for k, v in extra.items()) if extra else "")


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # LitServe gives its logger a handler and format of its own, at import and again when the server
    # starts: its lines go through ours instead, so the log has one format.
    import litserve.server

    litserve.server.configure_logging = lambda *args, **kwargs: None
    library = logging.getLogger("litserve")
    library.handlers.clear()
    library.propagate = True
    quiet_library_advice()


class _DropMambaAdvice(logging.Filter):
    """transformers advises installing mamba-ssm / causal-conv1d when its Mamba functions run in PyTorch. The
    service does not follow it (the Dockerfile says why) and the model logs its own `kernels: ...` line saying
    which kernels run, so the advice is dropped; every other line of that logger stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("falling back to its reference PyTorch implementation" in message
                    and ("mamba" in message or "causal-conv1d" in message))


_MAMBA_ADVICE = _DropMambaAdvice()


def quiet_library_advice() -> None:
    for name in ("transformers.integrations.hub_kernels", "transformers.models.nemotron_h.modeling_nemotron_h"):
        logger = logging.getLogger(name)
        if _MAMBA_ADVICE not in logger.filters:
            logger.addFilter(_MAMBA_ADVICE)


def one_line(exc: BaseException) -> str:
    """An exception as one log line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
