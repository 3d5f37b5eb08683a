"""Operability of a worker: structured logs, Prometheus metrics, health endpoints, tracing.

* :mod:`.logs` - ``configure_logging`` / ``get_logger``: JSON lines (or console) on
  stdout with bound session context and secrets redacted.
* :mod:`.metrics` - the ``lash_*`` Prometheus families and ``InstrumentedProvider``.
* :mod:`.health` - ``HealthServer``: ``/healthz``, ``/readyz``, ``/metrics``.
* :mod:`.tracing` - optional OpenTelemetry spans (``configure_tracing`` / ``span``).
"""

from consumer.observability.logs import configure_logging, get_logger
from consumer.observability.tracing import configure_tracing, span

__all__ = ["configure_logging", "configure_tracing", "get_logger", "span"]
