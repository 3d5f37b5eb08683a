"""The OpenAI-compatible provider against a real local HTTP server (no httpx patching)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from email.utils import formatdate

import httpx
import pytest

from lash_core.errors import ProviderError
from lash_core.providers.base import (
    RAW_ARGUMENTS_KEY,
    ChatMessage,
    ModelDone,
    ModelRequest,
    ProviderEvent,
    TextChunk,
    ToolCallRequest,
    ToolSpec,
)
from lash_core.providers.openai import OpenAIProvider
from lash_core.transcript import ToolCall
from tests.providers.fake_openai import (
    FakeOpenAI,
    SSEReply,
    StatusReply,
    text_events,
    tool_call_events,
    usage_chunk,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


def provider_for(server: FakeOpenAI, **kwargs: float | int) -> OpenAIProvider:
    options: dict[str, float | int] = {"backoff_base_s": 0.01, "timeout_s": 5, "max_retries": 3}
    options.update(kwargs)
    return OpenAIProvider(server.base_url, "sk-test", "fake-model", **options)  # type: ignore[arg-type]


def simple_request(text: str = "hello") -> ModelRequest:
    return ModelRequest(model="fake-model", messages=[ChatMessage(role="user", content=text)])


async def collect(provider: OpenAIProvider, request: ModelRequest) -> list[ProviderEvent]:
    try:
        return [event async for event in provider.stream(request)]
    finally:
        await provider.aclose()


def text_of(events: list[ProviderEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


async def test_streams_text_and_usage(server: FakeOpenAI) -> None:
    server.enqueue(
        SSEReply(
            text_events(
                ["Hel", "lo", " world"],
                usage=usage_chunk(11, 3, cached=2, reasoning=1),
            )
        )
    )
    events = await collect(provider_for(server), simple_request())

    assert [e.text for e in events if isinstance(e, TextChunk)] == ["Hel", "lo", " world"]
    done = events[-1]
    assert isinstance(done, ModelDone)
    assert done.finish_reason == "stop"
    assert done.usage.input_tokens == 11
    assert done.usage.output_tokens == 3
    assert done.usage.cache_read_input_tokens == 2
    assert done.usage.reasoning_output_tokens == 1
    assert sum(isinstance(e, ModelDone) for e in events) == 1


async def test_request_wire_format(server: FakeOpenAI) -> None:
    server.enqueue(SSEReply(text_events(["ok"])))
    calls = [
        ToolCall(id="call_a", name="calculate", arguments={"expression": "6*7"}),
        ToolCall(id="call_b", name="word_count", arguments={RAW_ARGUMENTS_KEY: "{bad"}),
    ]
    request = ModelRequest(
        model="fake-model",
        messages=[
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content="what is 6*7?"),
            ChatMessage(role="assistant", content="", tool_calls=calls),
            ChatMessage(role="tool", content="42", tool_call_id="call_a", name="calculate"),
            ChatMessage(role="tool", content="bad args", tool_call_id="call_b"),
            ChatMessage(role="assistant", content="42"),
            ChatMessage(role="user", content="thanks"),
        ],
        tools=[
            ToolSpec(
                name="calculate",
                description="arithmetic",
                parameters={"type": "object", "properties": {"expression": {"type": "string"}}},
            )
        ],
        max_output_tokens=256,
    )
    await collect(provider_for(server), request)

    assert len(server.requests) == 1
    sent = server.requests[0]
    assert sent.method == "POST"
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test"
    body = sent.body
    assert body["model"] == "fake-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 256
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "calculate",
                "description": "arithmetic",
                "parameters": {
                    "type": "object",
                    "properties": {"expression": {"type": "string"}},
                },
            },
        }
    ]
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 6*7?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "calculate", "arguments": '{"expression":"6*7"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "word_count", "arguments": "{bad"},
                },
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "call_a"},
        {"role": "tool", "content": "bad args", "tool_call_id": "call_b"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "thanks"},
    ]


async def test_no_tools_key_without_tools_and_no_auth_without_key(server: FakeOpenAI) -> None:
    server.enqueue(SSEReply(text_events(["ok"])))
    provider = OpenAIProvider(server.base_url, None, "fake-model")
    await collect(provider, simple_request())
    sent = server.requests[0]
    assert "tools" not in sent.body
    assert "max_tokens" not in sent.body
    assert "authorization" not in sent.headers


async def test_streamed_tool_call_deltas_are_assembled_by_index(server: FakeOpenAI) -> None:
    server.enqueue(
        SSEReply(
            tool_call_events(
                [
                    ("call_1", "calculate", ['{"expr', 'ession": ', '"6*7"}']),
                    ("call_2", "word_count", ['{"text":', ' "a b c"}']),
                    ("call_3", "sleep", ["{not", " json"]),
                    ("call_4", "current_time", []),
                ],
                usage=usage_chunk(20, 9),
            )
        )
    )
    events = await collect(provider_for(server), simple_request())

    calls = [e.call for e in events if isinstance(e, ToolCallRequest)]
    assert [(c.id, c.name) for c in calls] == [
        ("call_1", "calculate"),
        ("call_2", "word_count"),
        ("call_3", "sleep"),
        ("call_4", "current_time"),
    ]
    assert calls[0].arguments == {"expression": "6*7"}
    assert calls[1].arguments == {"text": "a b c"}
    assert calls[2].arguments == {RAW_ARGUMENTS_KEY: "{not json"}
    assert calls[3].arguments == {}
    assert not any(isinstance(e, TextChunk) for e in events)
    done = events[-1]
    assert isinstance(done, ModelDone)
    assert done.finish_reason == "tool_calls"
    assert done.usage.input_tokens == 20


async def test_non_streamed_json_completion_is_accepted(server: FakeOpenAI) -> None:
    server.enqueue(
        StatusReply(
            200,
            {
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "thinking aloud",
                            "tool_calls": [
                                {
                                    "id": "call_x",
                                    "type": "function",
                                    "function": {"name": "calculate", "arguments": '{"a": 1}'},
                                }
                            ],
                        },
                        "finish_reason": "tool_calls",
                    }
                ],
                "usage": {"prompt_tokens": 4, "completion_tokens": 6},
            },
        )
    )
    events = await collect(provider_for(server), simple_request())
    assert text_of(events) == "thinking aloud"
    calls = [e.call for e in events if isinstance(e, ToolCallRequest)]
    assert [(c.id, c.name, c.arguments) for c in calls] == [("call_x", "calculate", {"a": 1})]
    done = events[-1]
    assert isinstance(done, ModelDone)
    assert (done.finish_reason, done.usage.output_tokens) == ("tool_calls", 6)


async def test_429_with_retry_after_seconds_then_success(server: FakeOpenAI) -> None:
    server.enqueue(
        StatusReply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "1"}),
        SSEReply(text_events(["after", " wait"])),
    )
    # A backoff this large would take >= 2.5 s: finishing sooner proves Retry-After was used.
    provider = provider_for(server, backoff_base_s=5)
    started = time.monotonic()
    events = await collect(provider, simple_request())
    elapsed = time.monotonic() - started

    assert text_of(events) == "after wait"
    assert len(server.requests) == 2
    assert 0.9 <= elapsed < 2.4


async def test_429_with_retry_after_http_date(server: FakeOpenAI) -> None:
    server.enqueue(
        StatusReply(
            429,
            {"error": {"message": "slow down"}},
            headers={"Retry-After": formatdate(time.time() + 1, usegmt=True)},
        ),
        SSEReply(text_events(["ok"])),
    )
    provider = provider_for(server, backoff_base_s=5)
    started = time.monotonic()
    events = await collect(provider, simple_request())

    assert text_of(events) == "ok"
    assert len(server.requests) == 2
    assert time.monotonic() - started < 2.4


async def test_500_then_success(server: FakeOpenAI) -> None:
    server.enqueue(
        StatusReply(500, {"error": {"message": "boom"}}),
        StatusReply(503, "upstream down"),
        SSEReply(text_events(["recovered"])),
    )
    events = await collect(provider_for(server), simple_request())
    assert text_of(events) == "recovered"
    assert len(server.requests) == 3


async def test_retries_are_bounded(server: FakeOpenAI) -> None:
    server.default = StatusReply(502, {"error": {"message": "bad gateway"}})
    with pytest.raises(ProviderError) as raised:
        await collect(provider_for(server, max_retries=2), simple_request())
    assert raised.value.retryable is True
    assert raised.value.status == 502
    assert "bad gateway" in str(raised.value)
    assert len(server.requests) == 3


async def test_retry_after_beyond_the_cap_fails_fast(server: FakeOpenAI) -> None:
    server.default = StatusReply(429, {}, headers={"Retry-After": "120"})
    provider = OpenAIProvider(
        server.base_url, "k", "fake-model", backoff_base_s=0.01, max_retry_after_s=5
    )
    started = time.monotonic()
    with pytest.raises(ProviderError) as raised:
        await collect(provider, simple_request())
    assert time.monotonic() - started < 2
    assert raised.value.retryable is True
    assert raised.value.status == 429
    assert len(server.requests) == 1


async def test_400_is_not_retried(server: FakeOpenAI) -> None:
    server.default = StatusReply(
        400, {"error": {"message": "unknown model 'nope'", "type": "invalid_request_error"}}
    )
    with pytest.raises(ProviderError) as raised:
        await collect(provider_for(server), simple_request())
    assert raised.value.retryable is False
    assert raised.value.status == 400
    assert "unknown model 'nope'" in str(raised.value)
    assert len(server.requests) == 1


async def test_mid_stream_disconnect_after_output_raises(server: FakeOpenAI) -> None:
    server.enqueue(
        SSEReply(text_events(["partial", " answer", " never", " finished"]), cut_after=3),
        SSEReply(text_events(["must not be used"])),
    )
    received: list[ProviderEvent] = []
    provider = provider_for(server)
    with pytest.raises(ProviderError) as raised:
        try:
            async for event in provider.stream(simple_request()):
                received.append(event)
        finally:
            await provider.aclose()
    assert raised.value.retryable is True
    assert text_of(received) == "partial answer"
    assert not any(isinstance(e, ModelDone) for e in received)
    assert len(server.requests) == 1


async def test_disconnect_before_any_output_is_retried(server: FakeOpenAI) -> None:
    server.enqueue(
        SSEReply(text_events(["lost"]), cut_after=1),  # only the empty role delta got through
        SSEReply(text_events(["second", " try"])),
    )
    events = await collect(provider_for(server), simple_request())
    assert text_of(events) == "second try"
    assert len(server.requests) == 2


async def test_stream_ending_without_finish_is_incomplete(server: FakeOpenAI) -> None:
    unfinished = text_events(["half"])[:-1]  # no finish_reason chunk
    server.enqueue(SSEReply([unfinished[0]], done=False), SSEReply(text_events(["whole"])))
    events = await collect(provider_for(server), simple_request())
    assert text_of(events) == "whole"
    assert len(server.requests) == 2


async def test_finish_reason_without_done_marker_is_complete(server: FakeOpenAI) -> None:
    server.enqueue(SSEReply(text_events(["fine"], usage=usage_chunk(1, 1)), done=False))
    events = await collect(provider_for(server), simple_request())
    assert text_of(events) == "fine"
    done = events[-1]
    assert isinstance(done, ModelDone)
    assert done.usage.output_tokens == 1
    assert len(server.requests) == 1


async def test_error_inside_the_stream_raises(server: FakeOpenAI) -> None:
    server.enqueue(SSEReply([{"error": {"message": "context length exceeded"}}]))
    with pytest.raises(ProviderError) as raised:
        await collect(provider_for(server), simple_request())
    assert "context length exceeded" in str(raised.value)
    assert raised.value.retryable is False
    assert len(server.requests) == 1


async def test_slow_response_times_out_and_is_retried(server: FakeOpenAI) -> None:
    server.default = SSEReply(text_events(["too late"]), stall_s=10)
    started = time.monotonic()
    with pytest.raises(ProviderError) as raised:
        await collect(provider_for(server, timeout_s=0.3, max_retries=1), simple_request())
    assert time.monotonic() - started < 3
    assert raised.value.retryable is True
    assert "timed out" in str(raised.value)
    assert len(server.requests) == 2


async def test_slow_response_within_timeout_succeeds(server: FakeOpenAI) -> None:
    server.enqueue(SSEReply(text_events(["a", "b"]), stall_s=0.2, gap_s=0.05))
    events = await collect(provider_for(server, timeout_s=2), simple_request())
    assert text_of(events) == "ab"
    assert len(server.requests) == 1


async def test_read_timeout_mid_stream_raises_without_retry(server: FakeOpenAI) -> None:
    # Skip the role delta so the first event is text: output has begun before the stall.
    server.enqueue(SSEReply(text_events(["first", "second"])[1:], gap_s=5))
    received: list[ProviderEvent] = []
    provider = provider_for(server, timeout_s=0.3)
    with pytest.raises(ProviderError):
        try:
            async for event in provider.stream(simple_request()):
                received.append(event)
        finally:
            await provider.aclose()
    assert text_of(received) == "first"
    assert len(server.requests) == 1


async def test_connection_refused_is_retried_then_raises() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = OpenAIProvider(
        f"http://127.0.0.1:{port}/v1", "k", "m", max_retries=2, backoff_base_s=0.01
    )
    with pytest.raises(ProviderError) as raised:
        await collect(provider, simple_request())
    assert raised.value.retryable is True
    assert "3 attempt" in str(raised.value)


async def test_cancellation_stops_the_stream_promptly(server: FakeOpenAI) -> None:
    server.enqueue(SSEReply(text_events(["one", "two", "three"]), gap_s=10))
    provider = provider_for(server, timeout_s=30)
    first = asyncio.Event()

    async def consume() -> None:
        async for event in provider.stream(simple_request()):
            if isinstance(event, TextChunk):
                first.set()

    task = asyncio.create_task(consume())
    # The role delta arrives at once; the first text only after one gap. Cancel while waiting.
    await asyncio.sleep(0.3)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1
    assert not first.is_set()
    await provider.aclose()


async def test_cancellation_interrupts_backoff(server: FakeOpenAI) -> None:
    server.default = StatusReply(503, {}, headers={"Retry-After": "30"})
    provider = provider_for(server)
    task = asyncio.create_task(collect(provider, simple_request()))
    await server.wait_for_requests(1)
    await asyncio.sleep(0.05)  # let the provider read the 503 and enter its backoff
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1


async def test_shared_client_is_left_open(server: FakeOpenAI) -> None:
    server.enqueue(SSEReply(text_events(["x"])), SSEReply(text_events(["y"])))
    async with httpx.AsyncClient() as client:
        first = OpenAIProvider(server.base_url, "k", "fake-model", client=client)
        assert text_of(await collect(first, simple_request())) == "x"
        assert not client.is_closed
        second = OpenAIProvider(server.base_url, "k", "fake-model", client=client)
        assert text_of(await collect(second, simple_request())) == "y"
    assert first.provider_id == "openai"
    assert first.model == "fake-model"
