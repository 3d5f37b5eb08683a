"""Optional OpenTelemetry tracing, off by default.

Tracing is an extra (``pip install 'lash-consumer[otel]'``) because most deployments do
not run a collector and the SDK is not free. The service calls :func:`span` around its
units of work whatever the mode; when tracing is off (the default, or the packages are
missing) that is a shared no-op context manager, so instrumented code costs next to
nothing and never imports OpenTelemetry.

Modes (``LASH_TRACING``): ``off``; ``console`` (spans printed as JSON to stderr, keeping
stdout for log lines); ``otlp`` (batched export to an OTLP collector, configured by the
standard ``OTEL_EXPORTER_OTLP_*`` environment variables; needs
``opentelemetry-exporter-otlp``).

Span names used by the service: ``lash.admission`` (one per message, or per batch of
submits with a ``batch_size`` attribute), ``lash.drain`` (one session's drain),
``lash.turn``, ``lash.model_call``, ``lash.tool_call``, ``lash.commit`` (the engine's, via
``AgentConfig.span``), ``lash.publish``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from consumer.observability.logs import get_logger

__all__ = [
    "SPAN_NAMES",
    "AttributeValue",
    "SpanHandle",
    "configure_tracing",
    "shutdown_tracing",
    "span",
    "tracing_enabled",
]

AttributeValue = str | int | float | bool

SPAN_NAMES = (
    "lash.admission",
    "lash.drain",
    "lash.turn",
    "lash.model_call",
    "lash.tool_call",
    "lash.commit",
    "lash.publish",
)
MODES = ("off", "console", "otlp")
SERVICE_NAME = "lash-consumer"

_log = get_logger(__name__)


class SpanHandle(Protocol):
    """What ``with span(...) as s`` gives: enough to annotate the current unit of work."""

    def set_attribute(self, key: str, value: AttributeValue) -> Any: ...


class _NoopSpan:
    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None


_NOOP_SPAN = _NoopSpan()
# The active SDK tracer provider and tracer, or None when tracing is off.
_provider: Any = None
_tracer: Any = None


@contextlib.contextmanager
def _noop() -> Iterator[SpanHandle]:
    yield _NOOP_SPAN


def tracing_enabled() -> bool:
    return _tracer is not None


def span(name: str, **attributes: AttributeValue) -> AbstractContextManager[SpanHandle]:
    """A span named ``name`` around a block; a no-op unless tracing is configured.

    Exceptions leaving the block are recorded on the span and set its status to error.
    """
    tracer = _tracer
    if tracer is None:
        return _noop()
    manager: AbstractContextManager[SpanHandle] = tracer.start_as_current_span(
        name, attributes=attributes, record_exception=True, set_status_on_exception=True
    )
    return manager


def _exporter(mode: str) -> Any:
    if mode == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=SERVICE_NAME, out=sys.stderr)
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


def configure_tracing(mode: str) -> None:
    """Switch tracing to ``mode`` (``off`` | ``console`` | ``otlp``).

    Missing OpenTelemetry packages are not fatal: the worker logs a warning and runs
    untraced. Calling it again replaces the previous configuration (flushing it first).
    """
    global _provider, _tracer
    mode = mode.strip().lower()
    if mode not in MODES:
        raise ValueError(f"unknown tracing mode {mode!r}; use one of {list(MODES)}")
    shutdown_tracing()
    if mode == "off":
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        exporter = _exporter(mode)
    except ImportError as exc:
        _log.warning(
            "tracing disabled: OpenTelemetry packages are missing",
            mode=mode,
            missing=exc.name or str(exc),
            hint="pip install 'lash-consumer[otel]'",
        )
        return
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    # Console output is for a person watching: print each span as it ends. A collector
    # gets batches, off the hot path.
    processor = SimpleSpanProcessor(exporter) if mode == "console" else BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    _provider = provider
    _tracer = provider.get_tracer("consumer")
    _log.info("tracing enabled", mode=mode)


def shutdown_tracing() -> None:
    """Flush and stop the current tracer provider, leaving tracing off."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()
