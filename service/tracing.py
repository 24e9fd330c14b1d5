"""OpenTelemetry tracing in the API servers: off unless OpenTelemetry's standard variables turn it on.

On when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`; `none` = off) or an OTLP endpoint is set
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and not when `OTEL_SDK_DISABLED=true`.
`otlp` sends OTLP over HTTP (protobuf) with the SDK's own reading of `OTEL_EXPORTER_OTLP_*`; `console` writes
one JSON line per span to the log (logger `caption.trace`). Sampling is the SDK's (`OTEL_TRACES_SAMPLER`,
`OTEL_TRACES_SAMPLER_ARG`; parent-based always-on by default), the resource is the SDK's
(`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`; service name `nemotron-caption` by default).

A request continues the caller's W3C `traceparent` (and `tracestate`); one that is malformed or oversized
starts a new trace. Spans hold counts, sizes, timings and ids only: never image data, prompt text or a key.

The engine runs in another process and reports only its outputs, so the engine's part of a request is
recorded here from what the API server sees of it and what the outputs carry: `engine.queue` from
submission to the start of its prefill and `engine.prefill` from there to the first output (the first
output says how long its prefill took), then `engine.decode` from the first output to the last (with the
rows each of its outputs was decoded with).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

trace_log = logging.getLogger("caption.trace")
DEFAULT_SERVICE_NAME = "nemotron-caption"
# W3C: a version-00 traceparent is 55 characters; vendors must pass on at least 512 of tracestate.
MAX_TRACEPARENT = 128
MAX_TRACESTATE = 512
_PROPAGATOR = TraceContextTextMapPropagator()
_NO_OP = trace.NoOpTracer()
_state: dict = {"pid": None, "tracer": _NO_OP, "provider": None}


def exporters_from_env(env: dict | None = None) -> list[str]:
    """The exporters the OTEL_* variables ask for: [] means tracing is off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    return [n for n in names if n != "none"]


class LogSpanExporter:
    """`OTEL_TRACES_EXPORTER=console`: each finished span as one JSON line on the `caption.trace` logger."""

    def export(self, spans: Sequence) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        for span in spans:
            trace_log.info("span %s", json.dumps(json.loads(span.to_json()), separators=(",", ":")))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _build_tracer(names: list[str]) -> tuple[trace.Tracer, object]:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler: from OTEL_TRACES_SAMPLER
    for name in names:
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(LogSpanExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            logging.getLogger(__name__).warning("OTEL_TRACES_EXPORTER=%s: unknown exporter, ignored (otlp, console "
                                                "or none)", name)
    return provider.get_tracer("caption"), provider


def tracer() -> trace.Tracer:
    """This process's tracer (built on first use in each process: LitServe forks the API servers)."""
    if _state["pid"] != os.getpid():
        _state["pid"] = os.getpid()
        names = exporters_from_env()
        if names:
            _state["tracer"], _state["provider"] = _build_tracer(names)
        else:
            _state["tracer"], _state["provider"] = _NO_OP, None
    return _state["tracer"]


def reset() -> None:
    """Forget this process's tracer, so that the next use reads the OTEL_* variables again (tests)."""
    _state.update(pid=None, tracer=_NO_OP, provider=None)


def use_provider(provider) -> None:
    """Trace into this SDK TracerProvider (tests, with an in-memory exporter)."""
    _state.update(pid=os.getpid(), tracer=provider.get_tracer("caption"), provider=provider)


def enabled() -> bool:
    return tracer() is not _NO_OP


def incoming_context(headers: dict[bytes, bytes]) -> Context:
    """The caller's trace context from `traceparent`/`tracestate`, or an empty one (a new trace) when they are
    absent, malformed or oversized. Never raises."""
    parent = headers.get(b"traceparent", b"")
    if not parent or len(parent) > MAX_TRACEPARENT:
        return Context()
    carrier = {"traceparent": parent.decode("latin-1").strip()}
    state = headers.get(b"tracestate", b"")
    if state and len(state) <= MAX_TRACESTATE:
        carrier["tracestate"] = state.decode("latin-1")
    try:
        return _PROPAGATOR.extract(carrier)
    except Exception:  # noqa: BLE001 - a bad header starts a new trace, it never fails the request
        return Context()


def trace_id_of(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
