"""Log lines are JSON with bound context, library logs share the pipeline, secrets vanish."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from consumer.observability.logs import configure_logging, get_logger, redact_text


@pytest.fixture(autouse=True)
def _clean_context() -> Iterator[None]:
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_json_lines_carry_level_logger_timestamp_and_bound_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    structlog.contextvars.bind_contextvars(
        session_id="chat-42", turn_id="turn-1", input_id="ti_1", lease_generation=7
    )
    get_logger("lash.test").info("turn started", inputs=2)

    (line,) = _lines(capsys)
    assert line["event"] == "turn started"
    assert line["level"] == "info"
    assert line["logger"] == "lash.test"
    assert line["inputs"] == 2
    assert line["session_id"] == "chat-42"
    assert line["turn_id"] == "turn-1"
    assert line["input_id"] == "ti_1"
    assert line["lease_generation"] == 7
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]


def test_unnamed_logger_is_named_after_the_calling_module(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    get_logger().info("hello")
    (line,) = _lines(capsys)
    assert line["logger"] == __name__


def test_stdlib_library_logs_use_the_same_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    structlog.contextvars.bind_contextvars(session_id="s-lib")
    logging.getLogger("aio_pika.robust_connection").info("chatter is hidden at info")
    logging.getLogger("sqlalchemy.engine").info("so is statement logging")
    logging.getLogger("aiormq.connection").warning("connection %s lost", "amqp-1")

    (line,) = _lines(capsys)
    assert line["event"] == "connection amqp-1 lost"
    assert line["level"] == "warning"
    assert line["logger"] == "aiormq.connection"
    assert line["session_id"] == "s-lib"


def test_debug_level_lets_library_logs_through(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "debug")
    logging.getLogger("aio_pika").debug("channel opened")
    get_logger("lash.test").debug("own debug")
    events = [line["event"] for line in _lines(capsys)]
    assert events == ["channel opened", "own debug"]
    configure_logging("json", "info")
    get_logger("lash.test").debug("filtered")
    assert _lines(capsys) == []


def test_secrets_are_redacted_in_keys_urls_and_exceptions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    log = get_logger("lash.test")
    log.info(
        "connecting",
        amqp_url="amqp://guest:hunter2@rabbit:5672/",
        database_url="postgresql+psycopg://lash:s3cr3t@db:5432/lash",
        password="pw-value",
        openai_api_key="sk-live-abcdefghijklmnopqrstuvwxyz",
        token="tok-value",
        headers={"Authorization": "Bearer abc.def.ghi", "Accept": "application/json"},
        usage={"input_tokens": 12, "output_tokens": 3},
    )
    logging.getLogger("alembic").error("cannot reach postgresql://admin:rootpw@db/postgres")
    try:
        raise ConnectionError("amqp://user:leaked@broker:5672/ refused")
    except ConnectionError:
        log.exception("broker down")

    out = capsys.readouterr().out
    for secret in ("hunter2", "s3cr3t", "pw-value", "abcdefghijklmnop", "tok-value", "abc.def"):
        assert secret not in out
    assert "rootpw" not in out and "leaked" not in out
    first, second, third = (json.loads(line) for line in out.splitlines())
    assert first["amqp_url"] == "amqp://guest:***@rabbit:5672/"
    assert first["database_url"] == "postgresql+psycopg://lash:***@db:5432/lash"
    assert first["password"] == "***"
    assert first["openai_api_key"] == "***"
    assert first["headers"] == {"Authorization": "***", "Accept": "application/json"}
    assert first["usage"] == {"input_tokens": 12, "output_tokens": 3}
    assert second["event"] == "cannot reach postgresql://admin:***@db/postgres"
    assert third["level"] == "error"
    assert "ConnectionError" in third["exception"]
    assert "amqp://user:***@broker:5672/" in third["exception"]


def test_redact_text_leaves_plain_urls_alone() -> None:
    assert redact_text("http://example.test/a?b=c") == "http://example.test/a?b=c"
    assert redact_text("amqp://guest@host/") == "amqp://guest@host/"
    assert redact_text("Authorization: Bearer xyz123") == "Authorization: Bearer ***"


def test_console_format_is_human_readable(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", "info")
    structlog.contextvars.bind_contextvars(session_id="s-console")
    get_logger("lash.test").info("hello console", password="nope")
    out = capsys.readouterr().out
    assert "hello console" in out and "s-console" in out
    assert "nope" not in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_auto_format_is_json_when_stdout_is_not_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("auto", "info")
    get_logger("lash.test").info("auto")
    (line,) = _lines(capsys)
    assert line["event"] == "auto"


def test_reconfiguring_does_not_duplicate_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    configure_logging("json", "info")
    get_logger("lash.test").info("once")
    assert len(_lines(capsys)) == 1


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        configure_logging("xml", "info")
    with pytest.raises(ValueError):
        configure_logging("json", "loud")
