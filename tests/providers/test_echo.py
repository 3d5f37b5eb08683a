"""The echo provider: reply contents, chunking, pacing, cancellation and tool triggers."""

from __future__ import annotations

import asyncio
import time

import pytest

from lash_core.providers.base import (
    RAW_ARGUMENTS_KEY,
    ChatMessage,
    ModelDone,
    ModelRequest,
    ProviderEvent,
    TextChunk,
    ToolCallRequest,
)
from lash_core.providers.echo import EchoProvider, split_chunks
from lash_core.transcript import ToolCall


def request(*messages: ChatMessage) -> ModelRequest:
    return ModelRequest(model="echo", messages=list(messages))


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def assistant(text: str = "", calls: list[ToolCall] | None = None) -> ChatMessage:
    return ChatMessage(role="assistant", content=text, tool_calls=calls or [])


def tool(call_id: str, output: str) -> ChatMessage:
    return ChatMessage(role="tool", content=output, tool_call_id=call_id)


async def collect(provider: EchoProvider, req: ModelRequest) -> list[ProviderEvent]:
    return [event async for event in provider.stream(req)]


def text_of(events: list[ProviderEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


async def test_reply_contains_the_user_text_of_the_turn() -> None:
    events = await collect(
        EchoProvider(),
        request(
            ChatMessage(role="system", content="be brief"),
            user("old question"),
            assistant("echo: old question"),
            user("Summarise the thread"),
            user("and keep it short"),
        ),
    )
    assert text_of(events) == "echo: Summarise the thread\nand keep it short"
    assert "old question" not in text_of(events)
    done = events[-1]
    assert isinstance(done, ModelDone)
    assert done.finish_reason == "stop"
    assert sum(isinstance(e, ModelDone) for e in events) == 1


async def test_usage_counts_words() -> None:
    events = await collect(EchoProvider(), request(user("one two three")))
    done = events[-1]
    assert isinstance(done, ModelDone)
    assert done.usage.input_tokens == 3
    assert done.usage.output_tokens == 4  # "echo:" + three words


async def test_reply_is_streamed_in_several_chunks_without_delay() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    started = time.monotonic()
    events = await collect(EchoProvider(delay_ms=0, max_chunks=8), request(user(text)))
    assert time.monotonic() - started < 0.5
    chunks = [e for e in events if isinstance(e, TextChunk)]
    assert len(chunks) > 1
    assert all(c.text for c in chunks)
    assert text_of(events) == "echo: " + text


async def test_zero_delay_sends_one_chunk_by_default_and_a_delay_several() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    instant = await collect(EchoProvider(delay_ms=0), request(user(text)))
    assert [e.text for e in instant if isinstance(e, TextChunk)] == ["echo: " + text]
    paced = await collect(EchoProvider(delay_ms=20), request(user(text)))
    assert len([e for e in paced if isinstance(e, TextChunk)]) == 8
    assert text_of(paced) == "echo: " + text


async def test_model_name_is_configurable() -> None:
    provider = EchoProvider(model="echo-large")
    assert provider.provider_id == "echo"
    assert provider.model == "echo-large"
    await provider.aclose()


def test_split_chunks_preserves_text_and_bounds_count() -> None:
    text = "  leading and   inner  whitespace\nnew line  "
    for max_chunks in (1, 2, 3, 8, 100):
        chunks = split_chunks(text, max_chunks)
        assert "".join(chunks) == text
        assert 1 <= len(chunks) <= max_chunks
    assert split_chunks("", 4) == []
    assert split_chunks("one", 4) == ["one"]


async def test_delay_spreads_chunks_over_time() -> None:
    provider = EchoProvider(delay_ms=400)
    stamps: list[float] = []
    started = time.monotonic()
    async for event in provider.stream(request(user("a b c d e f g h i j"))):
        if isinstance(event, TextChunk):
            stamps.append(time.monotonic() - started)
    total = time.monotonic() - started
    assert len(stamps) > 2
    assert 0.35 <= total < 3.0
    # The first chunk comes after one slice, not after the whole delay: it is spread out.
    assert stamps[0] < 0.3
    assert stamps[-1] >= 0.35


async def test_cancellation_interrupts_the_delay() -> None:
    provider = EchoProvider(delay_ms=30_000)
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for event in provider.stream(request(user("a b c d e f g h"))):
            if isinstance(event, TextChunk):
                first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5
    assert not first_chunk.is_set()


async def test_tool_line_triggers_tool_calls_on_first_call() -> None:
    events = await collect(
        EchoProvider(),
        request(
            user('please compute\n/tool calculate {"expression": "6*7"}\n/tool current_time {}'),
        ),
    )
    calls = [e.call for e in events if isinstance(e, ToolCallRequest)]
    assert [c.name for c in calls] == ["calculate", "current_time"]
    assert calls[0].arguments == {"expression": "6*7"}
    assert calls[1].arguments == {}
    assert [c.id for c in calls] == ["call_1", "call_2"]
    assert not any(isinstance(e, TextChunk) for e in events)
    done = events[-1]
    assert isinstance(done, ModelDone)
    assert done.finish_reason == "tool_calls"


async def test_tool_call_ids_continue_across_the_transcript() -> None:
    earlier = ToolCall(id="call_1", name="calculate", arguments={"expression": "1"})
    events = await collect(
        EchoProvider(),
        request(
            user('/tool calculate {"expression": "1"}'),
            assistant(calls=[earlier]),
            tool("call_1", "1"),
            assistant("echo: done"),
            user('/tool word_count {"text": "a b"}'),
        ),
    )
    calls = [e.call for e in events if isinstance(e, ToolCallRequest)]
    assert [c.id for c in calls] == ["call_2"]


async def test_malformed_tool_arguments_pass_through_raw() -> None:
    events = await collect(EchoProvider(), request(user("/tool calculate {not json")))
    calls = [e.call for e in events if isinstance(e, ToolCallRequest)]
    assert calls[0].arguments == {RAW_ARGUMENTS_KEY: "{not json"}


async def test_reply_after_tool_results_contains_user_text_and_outputs() -> None:
    call = ToolCall(id="call_1", name="calculate", arguments={"expression": "6*7"})
    events = await collect(
        EchoProvider(),
        request(
            user('/tool calculate {"expression": "6*7"}'),
            assistant(calls=[call]),
            tool("call_1", "42"),
        ),
    )
    assert not any(isinstance(e, ToolCallRequest) for e in events)
    reply = text_of(events)
    assert reply.startswith('echo: /tool calculate {"expression": "6*7"}')
    assert reply.endswith("\ncalculate: 42")
    done = events[-1]
    assert isinstance(done, ModelDone)
    assert done.finish_reason == "stop"


async def test_tool_calls_respect_the_delay() -> None:
    started = time.monotonic()
    events = await collect(EchoProvider(delay_ms=200), request(user("/tool current_time {}")))
    assert time.monotonic() - started >= 0.15
    assert isinstance(events[0], ToolCallRequest)


async def test_concurrent_calls_do_not_share_pacing_state() -> None:
    provider = EchoProvider(delay_ms=200)
    started = time.monotonic()
    results = await asyncio.gather(
        collect(provider, request(user("first call here"))),
        collect(provider, request(user("second call here"))),
    )
    assert time.monotonic() - started < 1.5
    assert text_of(results[0]) == "echo: first call here"
    assert text_of(results[1]) == "echo: second call here"


def test_negative_delay_is_rejected() -> None:
    with pytest.raises(ValueError):
        EchoProvider(delay_ms=-1)
