"""Decoding producer messages into typed models or typed bad input; settings defaults."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import SecretStr

from consumer import wire
from consumer.settings import Settings, redact_url
from consumer.worker import state_cache
from lash_core.engine.state_cache import MAX_BYTES, MAX_SESSIONS


def encode(**fields: Any) -> bytes:
    return json.dumps({"protocol_version": 1, **fields}).encode()


SUBMIT = {
    "type": "turn_input.submit",
    "session_id": "chat-42",
    "input": {"items": [{"type": "text", "text": "hi"}]},
}


def test_submit_defaults_and_unknown_fields_ignored() -> None:
    message = wire.decode_message(encode(**SUBMIT, surprise={"x": 1}), 1 << 20)
    assert isinstance(message, wire.SubmitMessage)
    assert message.ingress.scope == "next_turn"
    assert message.source_key is None and message.input_id is None


def test_active_turn_ingress_defaults_min_boundary() -> None:
    message = wire.decode_message(
        encode(**{**SUBMIT, "ingress": {"scope": "active_turn", "turn_id": "t1"}}), 1 << 20
    )
    assert isinstance(message, wire.SubmitMessage)
    assert message.ingress.scope == "active_turn"
    assert message.ingress.min_boundary == "after_work"


@pytest.mark.parametrize(
    ("fields", "cls"),
    [
        (
            {"type": "turn_input.cancel", "targets": [{"kind": "source_key", "value": "k"}]},
            wire.TurnInputCancelMessage,
        ),
        (
            {"type": "turn_input.cancel_suffix", "anchor": {"kind": "input_id", "value": "i"}},
            wire.TurnInputCancelSuffixMessage,
        ),
        ({"type": "turn.cancel"}, wire.TurnCancelMessage),
        ({"type": "turn.cancel", "turn_id": "t", "reason": "r"}, wire.TurnCancelMessage),
        (
            {
                "type": "session.command",
                "command": {"kind": "reset_session"},
                "idempotency_key": "k",
            },
            wire.SessionCommandMessage,
        ),
        (
            {"type": "session.command", "command": {"kind": "refresh_tool_catalog", "reason": "x"}},
            wire.SessionCommandMessage,
        ),
        ({"type": "session.read"}, wire.SessionReadMessage),
        ({"type": "session.read", "after_seq": 0}, wire.SessionReadMessage),
    ],
)
def test_every_message_type_decodes(fields: dict[str, Any], cls: type) -> None:
    message = wire.decode_message(encode(session_id="s", **fields), 1 << 20)
    assert isinstance(message, cls)
    assert message.type == fields["type"]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"x" * 101, "too_large"),
        (b"\x80abc", "invalid_utf8"),
        (b"", "invalid_json"),
        (b"{'single': 1}", "invalid_json"),
        (b'"a string"', "invalid_message"),
        (b"null", "invalid_message"),
        (b'{"type": "session.read", "session_id": "s"}', "unsupported_protocol_version"),
        (
            b'{"protocol_version": "1", "type": "session.read", "session_id": "s"}',
            "unsupported_protocol_version",
        ),
        (
            b'{"protocol_version": 1.0, "type": "session.read", "session_id": "s"}',
            "unsupported_protocol_version",
        ),
        (b'{"protocol_version": 1, "session_id": "s"}', "unknown_type"),
        (b'{"protocol_version": 1, "type": "receipt", "session_id": "s"}', "unknown_type"),
        (b'{"protocol_version": 1, "type": "session.read"}', "invalid_message"),
        (b'{"protocol_version": 1, "type": "session.read", "session_id": 5}', "invalid_message"),
        (
            b'{"protocol_version": 1, "type": "session.read", "session_id": "s", "after_seq": -1}',
            "invalid_message",
        ),
        (
            encode(type="turn_input.cancel", session_id="s", targets=[]),
            "invalid_message",
        ),
        (
            encode(
                type="turn_input.cancel_suffix",
                session_id="s",
                anchor={"kind": "other", "value": "v"},
            ),
            "invalid_message",
        ),
        (
            encode(type="session.command", session_id="s", command={"kind": "explode"}),
            "invalid_message",
        ),
        (
            encode(type="turn_input.submit", session_id="s", input={"items": []}),
            "invalid_message",
        ),
        (
            encode(**{**SUBMIT, "ingress": {"scope": "active_turn"}}),
            "invalid_message",
        ),
    ],
)
def test_bad_input_codes(raw: bytes, code: str) -> None:
    with pytest.raises(wire.BadInput) as caught:
        wire.decode_message(raw, 100 if code == "too_large" else 1 << 20)
    assert caught.value.code == code
    assert caught.value.message
    receipt = caught.value.receipt().to_wire()
    assert receipt["status"] == "rejected" and receipt["error"]["code"] == code


def test_session_id_limits() -> None:
    assert wire.decode_message(encode(type="session.read", session_id="x" * 256), 1 << 20)
    for bad in ("", "x" * 257, "tab\there", "nul\x00"):
        with pytest.raises(wire.BadInput) as caught:
            wire.decode_message(encode(type="session.read", session_id=bad), 1 << 20)
        assert caught.value.code == "invalid_message"
        assert caught.value.message_type == "session.read"


def test_receipt_omits_absent_fields() -> None:
    receipt = wire.Receipt(status=wire.ReceiptStatus.NO_RUNNING_TURN, session_id="s")
    assert receipt.to_wire() == {
        "protocol_version": 1,
        "type": "receipt",
        "status": "no_running_turn",
        "session_id": "s",
    }


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("LASH_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert (s.namespace, s.provider, s.echo_delay_ms) == ("lash", "echo", 0)
    assert (s.lease_ttl_ms, s.max_message_bytes, s.concurrency) == (30000, 1048576, 16)
    assert (s.prefetch, s.max_deliveries, s.http_port) == (0, 5, 8080)
    assert (s.log_format, s.log_level, s.tracing) == ("auto", "info", "off")
    assert s.effective_prefetch == 256
    monkeypatch.setenv("LASH_CONCURRENCY", "200")
    assert Settings().effective_prefetch == 400
    monkeypatch.delenv("LASH_CONCURRENCY")
    assert s.owner_id
    monkeypatch.setenv("LASH_OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("LASH_PREFETCH", "7")
    monkeypatch.setenv("LASH_AMQP_URL", "amqp://u:pw@h:5672/")
    s = Settings()
    assert isinstance(s.openai_api_key, SecretStr)
    assert s.effective_prefetch == 7
    public = json.dumps(s.public())
    assert "sk-secret" not in public and "pw" not in public
    assert redact_url("postgresql://a:b@h/db") == "postgresql://a:***@h/db"


def test_the_state_cache_takes_its_bounds_from_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("LASH_"):
            monkeypatch.delenv(key)
    default = state_cache(Settings())
    assert (default.max_sessions, default.max_bytes) == (MAX_SESSIONS, MAX_BYTES)
    monkeypatch.setenv("LASH_STATE_CACHE_SESSIONS", "3")
    monkeypatch.setenv("LASH_STATE_CACHE_MIB", "64")
    tuned = state_cache(Settings())
    assert (tuned.max_sessions, tuned.max_bytes) == (3, 64 * 1024 * 1024)
    monkeypatch.setenv("LASH_STATE_CACHE_SESSIONS", "0")
    with pytest.raises(ValueError):
        Settings()
