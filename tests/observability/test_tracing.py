"""Tracing is a no-op when off, prints spans in console mode, degrades without packages."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from consumer.observability import tracing
from consumer.observability.logs import configure_logging


@pytest.fixture(autouse=True)
def _tracing_off() -> Iterator[None]:
    tracing.configure_tracing("off")
    yield
    tracing.configure_tracing("off")


def test_off_is_a_noop() -> None:
    assert not tracing.tracing_enabled()
    with tracing.span("lash.turn", session_id="s1", iteration=1) as handle:
        handle.set_attribute("outcome", "finished")
    with pytest.raises(RuntimeError), tracing.span("lash.commit"):
        raise RuntimeError("propagates")


def _spans(err: str) -> list[dict[str, Any]]:
    decoder = json.JSONDecoder()
    spans: list[dict[str, Any]] = []
    index = 0
    while True:
        start = err.find("{", index)
        if start < 0:
            return spans
        obj, index = decoder.raw_decode(err, start)
        spans.append(obj)


def test_console_mode_produces_nested_spans(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("opentelemetry.sdk")
    tracing.configure_tracing("console")
    assert tracing.tracing_enabled()
    with tracing.span("lash.turn", session_id="chat-42", lease_generation=3) as turn:
        turn.set_attribute("outcome", "finished")
        with tracing.span("lash.model_call", provider="echo"):
            pass
    with pytest.raises(ValueError), tracing.span("lash.commit"):
        raise ValueError("conflict")
    tracing.shutdown_tracing()

    spans = {s["name"]: s for s in _spans(capsys.readouterr().err)}
    assert set(spans) == {"lash.turn", "lash.model_call", "lash.commit"}
    turn_span, call_span = spans["lash.turn"], spans["lash.model_call"]
    assert turn_span["attributes"] == {
        "session_id": "chat-42",
        "lease_generation": 3,
        "outcome": "finished",
    }
    assert call_span["parent_id"] == turn_span["context"]["span_id"]
    assert call_span["context"]["trace_id"] == turn_span["context"]["trace_id"]
    assert spans["lash.commit"]["status"]["status_code"] == "ERROR"
    assert spans["lash.commit"]["events"][0]["name"] == "exception"
    assert turn_span["resource"]["attributes"]["service.name"] == "lash-consumer"


def test_missing_packages_warn_and_stay_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("json", "info")
    # A None entry in sys.modules makes that import raise ImportError.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    tracing.configure_tracing("console")
    assert not tracing.tracing_enabled()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    (warning,) = [line for line in lines if line["level"] == "warning"]
    assert "OpenTelemetry" in warning["event"]
    with tracing.span("lash.publish"):
        pass


def test_otlp_without_exporter_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    tracing.configure_tracing("otlp")
    assert not tracing.tracing_enabled()


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError):
        tracing.configure_tracing("jaeger")
