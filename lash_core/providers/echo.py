"""The built-in ``echo`` provider: deterministic, no network, for tests and demos.

Why it exists: the service must run end to end without a real model, and tests need a
provider whose reply is predictable from its input and whose timing is controllable.

Behaviour of one model call (one :meth:`EchoProvider.stream`):

* **The turn** is every message after the last assistant message that has no tool calls
  (that message ended the previous turn). Its user messages are the *user text* (joined
  with ``"\\n"``); user messages that arrive mid-turn (steering) are part of it.
* **Plain reply**: ``"echo: " + user text``.
* **Tool use**: every user line of the form ``/tool <name> <json-object>`` (for example
  ``/tool calculate {"expression": "6*7"}``) makes the *first* model call of the turn emit
  one :class:`ToolCallRequest` per line, in order, instead of text (``finish_reason``
  ``"tool_calls"``). Call ids are ``call_<n>``, numbered on from the tool calls already in
  the conversation, so they are deterministic and unique within a transcript. A malformed
  JSON object is passed on as ``{"_raw": "<text>"}``, just as a real model's bad arguments
  would be.
* **After tool results** (the turn already contains an assistant message with tool calls)
  the reply is ``"echo: " + user text`` followed by one line per tool result of the turn:
  ``"<tool name>: <output>"``. No further tool calls are made, so a turn always ends.
* **Streaming**: the reply is split at word boundaries into up to ``max_chunks``
  :class:`TextChunk` events whose concatenation is the reply. With ``delay_ms > 0`` the
  chunks are spread evenly over that time (the call takes about ``delay_ms``); with 0 there
  is no sleeping at all. Cancelling the consuming task interrupts the wait at once.
  ``max_chunks`` defaults to 8 with a delay and to 1 without: chunks that all arrive at
  once stream nothing to an observer, and each one costs a live ``turn.activity`` message.
* **Usage**: whitespace-separated words count as tokens - every prompt message's text for
  ``input_tokens``, the reply (or the emitted tool calls) for ``output_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from lash_core.outcomes import Usage
from lash_core.providers.base import (
    RAW_ARGUMENTS_KEY,
    ChatMessage,
    ModelDone,
    ModelRequest,
    ProviderEvent,
    TextChunk,
    ToolCallRequest,
)
from lash_core.transcript import ToolCall

ECHO_PREFIX = "echo: "
TOOL_LINE = re.compile(r"^\s*/tool\s+(?P<name>[A-Za-z0-9_\-]+)(?:\s+(?P<args>.*?))?\s*$")
_PIECE = re.compile(r"\s*\S+\s*|\s+")
DEFAULT_CHUNKS = 8
"""Chunks per reply when the reply is paced over a delay."""


def _count_words(text: str) -> int:
    return len(text.split())


def current_turn(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The messages after the last assistant message without tool calls."""
    start = 0
    for index, message in enumerate(messages):
        if message.role == "assistant" and not message.tool_calls:
            start = index + 1
    return list(messages[start:])


def parse_tool_line(line: str) -> tuple[str, dict[str, Any]] | None:
    """``/tool <name> <json-object>`` -> ``(name, arguments)``; other lines -> ``None``."""
    match = TOOL_LINE.match(line)
    if match is None:
        return None
    raw = (match.group("args") or "").strip()
    if not raw:
        return match.group("name"), {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        return match.group("name"), {RAW_ARGUMENTS_KEY: raw}
    if not isinstance(parsed, dict):
        return match.group("name"), {RAW_ARGUMENTS_KEY: raw}
    return match.group("name"), parsed


def split_chunks(text: str, max_chunks: int) -> list[str]:
    """Split ``text`` at word boundaries into at most ``max_chunks`` non-empty pieces."""
    pieces = _PIECE.findall(text)
    if not pieces:
        return [text] if text else []
    count = min(len(pieces), max(1, max_chunks))
    chunks: list[str] = []
    for i in range(count):
        lo = i * len(pieces) // count
        hi = (i + 1) * len(pieces) // count
        chunks.append("".join(pieces[lo:hi]))
    return chunks


class EchoProvider:
    """Replies with the user's own text; see the module docstring for the exact rules."""

    def __init__(
        self, delay_ms: int = 0, model: str = "echo", *, max_chunks: int | None = None
    ) -> None:
        if delay_ms < 0:
            raise ValueError("delay_ms must not be negative")
        if max_chunks is not None and max_chunks < 1:
            raise ValueError("max_chunks must be at least 1")
        self._delay_s = delay_ms / 1000.0
        self._model = model
        if max_chunks is None:
            max_chunks = DEFAULT_CHUNKS if delay_ms > 0 else 1
        self._max_chunks = max_chunks

    @property
    def provider_id(self) -> str:
        return "echo"

    @property
    def model(self) -> str:
        return self._model

    async def aclose(self) -> None:
        """Nothing to release: the echo provider holds no connections."""

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        turn = current_turn(request.messages)
        user_text = "\n".join(m.content for m in turn if m.role == "user")
        input_tokens = sum(_count_words(m.content) for m in request.messages)
        already_called = any(m.role == "assistant" and m.tool_calls for m in turn)

        pacer = _Pacer(self._delay_s)
        requested = [] if already_called else self._requested_calls(request.messages, user_text)
        if requested:
            await pacer.wait(0, 1)
            for call in requested:
                yield ToolCallRequest(call=call)
            output_tokens = sum(
                _count_words(c.name) + _count_words(json.dumps(c.arguments)) for c in requested
            )
            yield ModelDone(
                usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens),
                finish_reason="tool_calls",
            )
            return

        reply = ECHO_PREFIX + user_text
        results = [m for m in turn if m.role == "tool"]
        if results:
            names = _tool_names(turn)
            lines = [
                f"{names.get(m.tool_call_id or '', m.name or 'tool')}: {m.content}" for m in results
            ]
            reply = "\n".join([reply, *lines])

        chunks = split_chunks(reply, self._max_chunks)
        for index, chunk in enumerate(chunks):
            await pacer.wait(index, len(chunks))
            yield TextChunk(text=chunk)
        yield ModelDone(
            usage=Usage(input_tokens=input_tokens, output_tokens=_count_words(reply)),
            finish_reason="stop",
        )

    def _requested_calls(self, messages: Sequence[ChatMessage], user_text: str) -> list[ToolCall]:
        prior = sum(len(m.tool_calls) for m in messages if m.role == "assistant")
        calls: list[ToolCall] = []
        for line in user_text.splitlines():
            parsed = parse_tool_line(line)
            if parsed is not None:
                name, arguments = parsed
                calls.append(
                    ToolCall(id=f"call_{prior + len(calls) + 1}", name=name, arguments=arguments)
                )
        return calls


class _Pacer:
    """Spreads one call's pieces evenly over its delay (one instance per call).

    Deadlines are measured from the loop clock at the first piece, not summed, so the call
    takes about the delay however long the consumer spends between chunks.
    """

    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s
        self._started: float | None = None

    async def wait(self, index: int, total: int) -> None:
        """Sleep until piece ``index`` of ``total`` is due; no sleeping when the delay is 0."""
        if self._delay_s <= 0:
            return
        loop = asyncio.get_running_loop()
        if self._started is None:
            self._started = loop.time()
        target = self._started + self._delay_s * (index + 1) / total
        await asyncio.sleep(max(0.0, target - loop.time()))


def _tool_names(turn: Sequence[ChatMessage]) -> dict[str, str]:
    """Tool call id -> tool name, from the assistant messages of the turn."""
    return {call.id: call.name for m in turn if m.role == "assistant" for call in m.tool_calls}
