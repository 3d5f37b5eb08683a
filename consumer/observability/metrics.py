"""Prometheus metrics of a worker, on the default registry.

Every family is named ``lash_*`` with a unit suffix and labelled only by small, fixed
sets of values (outcome kinds, message types, error codes, provider ids). Session ids,
turn ids and input ids are never labels: a fleet serves an unbounded number of sessions
and one time series per session would exhaust the metrics backend. Per-session detail
belongs in logs (bound context) and traces.

:class:`InstrumentedProvider` wraps any model provider to record request latency and
errors without the turn engine knowing about metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from prometheus_client import Counter, Gauge, Histogram

from lash_core.errors import ProviderError
from lash_core.providers.base import ModelRequest, Provider, ProviderEvent

__all__ = [
    "ACTIVE_SESSIONS",
    "ADMISSIONS",
    "ADMISSION_BATCH_SIZE",
    "CLAIMS",
    "COMMIT_CONFLICTS",
    "DEAD_LETTERS",
    "LEASE_EVENTS",
    "MESSAGES",
    "OUTBOX_BACKLOG",
    "OUTBOX_LAG",
    "OUTBOX_PUBLISHED",
    "PROVIDER_ERRORS",
    "PROVIDER_LATENCY",
    "TURNS",
    "TURN_DURATION",
    "InstrumentedProvider",
]

# LLM turns range from milliseconds (echo) to minutes (long tool loops).
_LONG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Outbox lag: commit-to-confirmed-publish, normally milliseconds.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

TURNS = Counter(
    "lash_turns_total",
    "Turns committed, by outcome (finished, or the stop reason).",
    ["outcome"],
)
TURN_DURATION = Histogram(
    "lash_turn_duration_seconds",
    "Time from claiming a turn's input to its final commit.",
    buckets=_LONG_BUCKETS,
)
ADMISSIONS = Counter(
    "lash_admissions_total",
    "Producer requests answered, by receipt status (admitted, duplicate, conflict, ...).",
    ["status"],
)
# Batch sizes are bounded by the consumer's prefetch (twice the concurrency by default).
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ADMISSION_BATCH_SIZE = Histogram(
    "lash_admission_batch_size",
    "Submits admitted together in one store call (1 at low load: batches never wait to fill).",
    buckets=_BATCH_BUCKETS,
)
MESSAGES = Counter(
    "lash_messages_total",
    "Messages consumed from the ingress queue, by message type.",
    ["type"],
)
LEASE_EVENTS = Counter(
    "lash_lease_events_total",
    "Session execution lease events: acquired, busy, takeover, lost.",
    ["event"],
)
CLAIMS = Counter(
    "lash_claimed_inputs_total",
    "Turn inputs claimed into turns, by claim mode.",
    ["mode"],
)
COMMIT_CONFLICTS = Counter(
    "lash_commit_conflicts_total",
    "Commits rejected by the store, by conflict kind.",
    ["kind"],
)
OUTBOX_LAG = Histogram(
    "lash_outbox_lag_seconds",
    "Time from an event's commit to its confirmed publication.",
    buckets=_LAG_BUCKETS,
)
OUTBOX_BACKLOG = Gauge(
    "lash_outbox_backlog_events",
    "Durable events committed but not yet published (as last seen by this worker).",
)
OUTBOX_PUBLISHED = Counter(
    "lash_outbox_published_total",
    "Durable events published to the observations exchange with a broker confirm and"
    " marked published in the store.",
)
DEAD_LETTERS = Counter(
    "lash_dead_letters_total",
    "Messages sent to the dead-letter exchange, by error code.",
    ["code"],
)
ACTIVE_SESSIONS = Gauge(
    "lash_active_sessions",
    "Sessions this worker is driving right now (holding their lease).",
)
PROVIDER_LATENCY = Histogram(
    "lash_provider_request_duration_seconds",
    "Duration of one model call, from request to the end of its stream.",
    ["provider"],
    buckets=_LONG_BUCKETS,
)
PROVIDER_ERRORS = Counter(
    "lash_provider_errors_total",
    "Failed model calls, by provider and kind (retryable, fatal, cancelled).",
    ["provider", "kind"],
)

# Pre-create the series whose label values are known, so dashboards and alerts see a 0
# instead of a missing series before the first event.
for _event in ("acquired", "busy", "takeover", "lost"):
    LEASE_EVENTS.labels(event=_event)
for _status in ("admitted", "duplicate", "conflict", "rejected"):
    ADMISSIONS.labels(status=_status)


class InstrumentedProvider:
    """A :class:`Provider` that records latency and errors of the provider it wraps.

    Latency covers the whole streamed call (first byte to ``ModelDone``), including calls
    that fail or are cancelled. Error kinds: ``retryable`` / ``fatal`` from
    :class:`ProviderError` (any other exception counts as ``fatal``) and ``cancelled``
    when the consuming task is cancelled mid-stream. A consumer that simply stops reading
    early is not an error.
    """

    def __init__(self, provider: Provider) -> None:
        self._inner = provider

    @property
    def inner(self) -> Provider:
        return self._inner

    @property
    def provider_id(self) -> str:
        return self._inner.provider_id

    @property
    def model(self) -> str:
        return self._inner.model

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        provider = self._inner.provider_id
        started = time.perf_counter()
        events = self._inner.stream(request)
        try:
            async for event in events:
                yield event
        except asyncio.CancelledError:
            PROVIDER_ERRORS.labels(provider=provider, kind="cancelled").inc()
            raise
        except ProviderError as exc:
            kind = "retryable" if exc.retryable else "fatal"
            PROVIDER_ERRORS.labels(provider=provider, kind=kind).inc()
            raise
        except GeneratorExit:
            raise
        except Exception:
            PROVIDER_ERRORS.labels(provider=provider, kind="fatal").inc()
            raise
        finally:
            PROVIDER_LATENCY.labels(provider=provider).observe(time.perf_counter() - started)
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        await self._inner.aclose()
