"""Metric families: ``lash_`` names, no per-session labels, and an instrumented provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumer.observability import metrics
from lash_core.errors import ProviderError
from lash_core.providers.base import (
    ChatMessage,
    ModelDone,
    ModelRequest,
    Provider,
    ProviderEvent,
    TextChunk,
)

EXPECTED = {
    "TURNS": ("lash_turns", "counter", ("outcome",)),
    "TURN_DURATION": ("lash_turn_duration_seconds", "histogram", ()),
    "ADMISSIONS": ("lash_admissions", "counter", ("status",)),
    "ADMISSION_BATCH_SIZE": ("lash_admission_batch_size", "histogram", ()),
    "MESSAGES": ("lash_messages", "counter", ("type",)),
    "LEASE_EVENTS": ("lash_lease_events", "counter", ("event",)),
    "CLAIMS": ("lash_claimed_inputs", "counter", ("mode",)),
    "COMMIT_CONFLICTS": ("lash_commit_conflicts", "counter", ("kind",)),
    "OUTBOX_LAG": ("lash_outbox_lag_seconds", "histogram", ()),
    "OUTBOX_BACKLOG": ("lash_outbox_backlog_events", "gauge", ()),
    "OUTBOX_PUBLISHED": ("lash_outbox_published", "counter", ()),
    "DEAD_LETTERS": ("lash_dead_letters", "counter", ("code",)),
    "ACTIVE_SESSIONS": ("lash_active_sessions", "gauge", ()),
    "PROVIDER_LATENCY": ("lash_provider_request_duration_seconds", "histogram", ("provider",)),
    "PROVIDER_ERRORS": ("lash_provider_errors", "counter", ("provider", "kind")),
}
FORBIDDEN_LABELS = {"session_id", "turn_id", "input_id", "session", "turn", "input"}


@pytest.mark.parametrize("attr", sorted(EXPECTED))
def test_family_name_type_and_labels(attr: str) -> None:
    name, kind, labels = EXPECTED[attr]
    metric = getattr(metrics, attr)
    assert metric._name == name
    assert metric._type == kind
    assert tuple(metric._labelnames) == labels
    assert not FORBIDDEN_LABELS & set(labels)


def test_exposition_has_only_lash_families_without_session_labels() -> None:
    metrics.TURNS.labels(outcome="finished").inc()
    metrics.MESSAGES.labels(type="turn_input.submit").inc()
    metrics.OUTBOX_PUBLISHED.inc()
    metrics.TURN_DURATION.observe(0.2)
    text = generate_latest(REGISTRY).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {name for name in families if name.startswith("lash_")}
    assert {name for name, _kind, _labels in EXPECTED.values()} <= ours
    for name in ours:
        for sample in families[name].samples:
            assert not FORBIDDEN_LABELS & set(sample.labels), sample
    assert 'lash_turns_total{outcome="finished"}' in text
    assert "lash_outbox_published_total" in text
    assert "lash_turn_duration_seconds_bucket" in text
    # Known label values exist at zero before the first event.
    assert 'lash_lease_events_total{event="takeover"}' in text


class _FakeProvider:
    def __init__(self, *, fail: ProviderError | None = None, hang: bool = False) -> None:
        self.fail = fail
        self.hang = hang
        self.closed = 0
        self.stream_closed = False

    @property
    def provider_id(self) -> str:
        return "fake"

    @property
    def model(self) -> str:
        return "fake-1"

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        try:
            yield TextChunk(text="hel")
            if self.hang:
                await asyncio.Event().wait()
            if self.fail is not None:
                raise self.fail
            yield TextChunk(text="lo")
            yield ModelDone()
        finally:
            self.stream_closed = True

    async def aclose(self) -> None:
        self.closed += 1


REQUEST = ModelRequest(model="fake-1", messages=[ChatMessage(role="user", content="hi")])


def _value(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_instrumented_provider_passes_events_through_and_times_them() -> None:
    inner = _FakeProvider()
    provider: Provider = metrics.InstrumentedProvider(inner)
    assert provider.provider_id == "fake" and provider.model == "fake-1"
    before = _value("lash_provider_request_duration_seconds_count", provider="fake")
    events = [event async for event in provider.stream(REQUEST)]
    assert [e.kind for e in events] == ["text", "text", "done"]
    assert _value("lash_provider_request_duration_seconds_count", provider="fake") == before + 1
    await provider.aclose()
    assert inner.closed == 1


@pytest.mark.parametrize(("retryable", "kind"), [(True, "retryable"), (False, "fatal")])
async def test_instrumented_provider_counts_errors(retryable: bool, kind: str) -> None:
    provider = metrics.InstrumentedProvider(
        _FakeProvider(fail=ProviderError("boom", retryable=retryable))
    )
    before = _value("lash_provider_errors_total", provider="fake", kind=kind)
    with pytest.raises(ProviderError):
        async for _event in provider.stream(REQUEST):
            pass
    assert _value("lash_provider_errors_total", provider="fake", kind=kind) == before + 1


async def test_instrumented_provider_counts_cancellation_and_closes_inner_stream() -> None:
    inner = _FakeProvider(hang=True)
    provider = metrics.InstrumentedProvider(inner)
    first = asyncio.Event()

    async def consume() -> None:
        async for _event in provider.stream(REQUEST):
            first.set()

    before = _value("lash_provider_errors_total", provider="fake", kind="cancelled")
    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _value("lash_provider_errors_total", provider="fake", kind="cancelled") == before + 1
    assert inner.stream_closed


async def test_stopping_early_is_not_an_error() -> None:
    inner = _FakeProvider()
    provider = metrics.InstrumentedProvider(inner)
    errors_before = sum(
        _value("lash_provider_errors_total", provider="fake", kind=k)
        for k in ("retryable", "fatal", "cancelled")
    )
    stream = provider.stream(REQUEST)
    async for _event in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    errors_after = sum(
        _value("lash_provider_errors_total", provider="fake", kind=k)
        for k in ("retryable", "fatal", "cancelled")
    )
    assert errors_after == errors_before
    assert inner.stream_closed
