"""Pure pieces of the HTTP provider: Retry-After, backoff, SSE framing, chunk assembly."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from lash_core.providers.base import RAW_ARGUMENTS_KEY, ModelDone, TextChunk, ToolCallRequest
from lash_core.providers.openai_wire import (
    ChunkAssembler,
    MalformedChunk,
    StreamError,
    arguments_from_wire,
    arguments_to_wire,
)
from lash_core.providers.retry import backoff_delay, is_retryable_status, parse_retry_after
from lash_core.providers.sse import sse_data

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("3", 3.0),
        ("0.5", 0.5),
        ("-4", 0.0),
        ("soon", None),
        ("nan", None),
        (format_datetime(NOW + timedelta(seconds=7), usegmt=True), 7.0),
        (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == expected


def test_retryable_statuses() -> None:
    assert all(is_retryable_status(s) for s in (408, 429, 500, 502, 503, 504, 599))
    assert not any(is_retryable_status(s) for s in (400, 401, 403, 404, 409, 422))


def test_backoff_grows_exponentially_with_jitter_and_cap() -> None:
    rng = random.Random(7)
    for attempt in range(8):
        nominal = min(10.0, 0.5 * 2**attempt)
        for _ in range(50):
            delay = backoff_delay(attempt, base_s=0.5, max_s=10.0, rng=rng)
            assert nominal / 2 <= delay <= nominal
    draws = {backoff_delay(3, base_s=0.5, max_s=10.0, rng=rng) for _ in range(20)}
    assert len(draws) > 1  # jittered


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def test_sse_framing() -> None:
    payloads = [
        p
        async for p in sse_data(
            _lines(
                ": keep-alive comment",
                "event: message",
                'data: {"a": 1}',
                "",
                "data:first",
                "data: second",
                "id: 7",
                "",
                "",
                "data: [DONE]",
            )
        )
    ]
    assert payloads == ['{"a": 1}', "first\nsecond", "[DONE]"]


def test_arguments_round_trip() -> None:
    assert arguments_from_wire('{"x": 1}') == {"x": 1}
    assert arguments_from_wire("") == {}
    assert arguments_from_wire("[1, 2]") == {RAW_ARGUMENTS_KEY: "[1, 2]"}
    assert arguments_from_wire("{oops") == {RAW_ARGUMENTS_KEY: "{oops"}
    assert arguments_to_wire({RAW_ARGUMENTS_KEY: "{oops"}) == "{oops"
    assert arguments_to_wire({"x": "é"}) == '{"x":"é"}'


def test_assembler_text_tool_calls_and_usage() -> None:
    assembler = ChunkAssembler()
    events = assembler.feed('{"choices": [{"index": 0, "delta": {"content": "Hi"}}]}')
    assert events == [TextChunk(text="Hi")]
    assembler.feed(
        '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "b",'
        ' "function": {"name": "two", "arguments": "{\\"k\\""}}]}}]}'
    )
    assembler.feed(
        '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "a",'
        ' "function": {"name": "one", "arguments": ""}}]}}]}'
    )
    assembler.feed(
        '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1,'
        ' "function": {"arguments": ": 2}"}}]}}]}'
    )
    flushed = assembler.feed(
        '{"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}'
    )
    calls = [e.call for e in flushed if isinstance(e, ToolCallRequest)]
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("a", "one", {}),
        ("b", "two", {"k": 2}),
    ]
    assembler.feed('{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}')
    assert assembler.complete
    closing = assembler.finish()
    assert len(closing) == 1
    done = closing[0]
    assert isinstance(done, ModelDone)
    assert done.finish_reason == "tool_calls"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (5, 2)


def test_assembler_rejects_garbage() -> None:
    with pytest.raises(MalformedChunk):
        ChunkAssembler().feed("not json")
    with pytest.raises(MalformedChunk):
        ChunkAssembler().feed("[1]")
    with pytest.raises(StreamError):
        ChunkAssembler().feed('{"error": {"message": "overloaded"}}')
