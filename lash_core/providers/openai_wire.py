"""The OpenAI Chat Completions wire format: requests out, streamed chunks in.

Pure translation with no I/O, so the mapping is testable on its own and the HTTP client in
:mod:`lash_core.providers.openai` only deals with transport and retries.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
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
    ToolSpec,
)
from lash_core.transcript import ToolCall


class MalformedChunk(ValueError):
    """A streamed chunk is not the JSON object the protocol promises."""


class StreamError(RuntimeError):
    """The server reported an error inside an otherwise successful stream."""


def message_to_wire(message: ChatMessage) -> dict[str, Any]:
    """One :class:`ChatMessage` as a Chat Completions message object."""
    wire: dict[str, Any] = {"role": message.role}
    if message.role == "assistant" and message.tool_calls:
        # The API allows null content next to tool calls; an empty string is rejected by some
        # compatible servers.
        wire["content"] = message.content or None
        wire["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": arguments_to_wire(call.arguments)},
            }
            for call in message.tool_calls
        ]
    else:
        wire["content"] = message.content
    if message.role == "tool":
        wire["tool_call_id"] = message.tool_call_id or ""
    elif message.name and message.role in ("user", "system", "assistant"):
        wire["name"] = message.name
    return wire


def arguments_to_wire(arguments: dict[str, Any]) -> str:
    """Arguments as the JSON string the API expects.

    Arguments that arrived unparseable (``{"_raw": text}``) go back verbatim, so the model
    sees exactly what it produced.
    """
    if set(arguments) == {RAW_ARGUMENTS_KEY} and isinstance(arguments[RAW_ARGUMENTS_KEY], str):
        return str(arguments[RAW_ARGUMENTS_KEY])
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def arguments_from_wire(text: str) -> dict[str, Any]:
    """The streamed argument string as a dict; anything but a JSON object -> ``{"_raw": text}``."""
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return {RAW_ARGUMENTS_KEY: text}
    if not isinstance(parsed, dict):
        return {RAW_ARGUMENTS_KEY: text}
    return parsed


def tool_to_wire(spec: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": spec.name,
            "description": spec.description,
            "parameters": spec.parameters,
        },
    }


def request_body(request: ModelRequest, default_model: str) -> dict[str, Any]:
    """The JSON body of ``POST /chat/completions`` for a streamed call."""
    body: dict[str, Any] = {
        "model": request.model or default_model,
        "messages": [message_to_wire(m) for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        body["tools"] = [tool_to_wire(t) for t in request.tools]
    if request.max_output_tokens is not None:
        body["max_tokens"] = request.max_output_tokens
    return body


def usage_from_wire(usage: dict[str, Any]) -> Usage:
    """The ``usage`` object of the final chunk, including cached and reasoning details."""
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=_int(usage.get("prompt_tokens")),
        output_tokens=_int(usage.get("completion_tokens")),
        cache_read_input_tokens=_int(prompt_details.get("cached_tokens")),
        reasoning_output_tokens=_int(completion_details.get("reasoning_tokens")),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def completion_events(payload: str) -> list[ProviderEvent]:
    """Events from a non-streamed ``chat.completion`` body.

    Some OpenAI-compatible servers ignore ``stream: true`` and answer with one JSON
    document; the caller then still gets the same event sequence: text, tool calls, done.
    """
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise MalformedChunk(f"response is not JSON: {payload[:200]!r}") from exc
    if not isinstance(body, dict):
        raise MalformedChunk(f"response is not an object: {payload[:200]!r}")
    if body.get("error"):
        error = body["error"]
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise StreamError(f"provider reported an error: {message}")
    choices = body.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    events: list[ProviderEvent] = []
    content = message.get("content")
    if isinstance(content, str) and content:
        events.append(TextChunk(text=content))
    calls = message.get("tool_calls") or []
    for call in calls:
        if not isinstance(call, dict):
            raise MalformedChunk(f"tool call is not an object: {call!r}")
        function = call.get("function") or {}
        events.append(
            ToolCallRequest(
                call=ToolCall(
                    id=str(call.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
                    name=str(function.get("name") or ""),
                    arguments=arguments_from_wire(str(function.get("arguments") or "")),
                )
            )
        )
    usage = body.get("usage")
    reason = choice.get("finish_reason") or ("tool_calls" if calls else "stop")
    events.append(
        ModelDone(
            usage=usage_from_wire(usage) if isinstance(usage, dict) else Usage(),
            finish_reason=str(reason),
        )
    )
    return events


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class ChunkAssembler:
    """Turns the decoded chunks of one stream into provider events.

    Text deltas become :class:`TextChunk` at once. Tool-call deltas are accumulated by their
    ``index`` (id and name arrive first, the argument string in fragments) and emitted as
    complete :class:`ToolCallRequest` events when the choice finishes. Usage comes from the
    last chunk (``stream_options.include_usage``).
    """

    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    done: bool = False
    _calls: dict[int, _PartialCall] = field(default_factory=dict)
    _emitted_calls: int = 0

    def feed(self, payload: str) -> list[ProviderEvent]:
        """Consume one SSE data payload; ``[DONE]`` marks the end of the stream."""
        if payload.strip() == "[DONE]":
            self.done = True
            return self._flush_calls()
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise MalformedChunk(f"stream chunk is not JSON: {payload[:200]!r}") from exc
        if not isinstance(chunk, dict):
            raise MalformedChunk(f"stream chunk is not an object: {payload[:200]!r}")
        error = chunk.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise StreamError(f"provider reported an error mid-stream: {message}")
        events: list[ProviderEvent] = []
        if isinstance(chunk.get("usage"), dict):
            self.usage = usage_from_wire(chunk["usage"])
        choices = chunk.get("choices") or []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                events.append(TextChunk(text=content))
            for position, fragment in enumerate(delta.get("tool_calls") or []):
                self._add_fragment(position, fragment)
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
                events.extend(self._flush_calls())
        return events

    @property
    def complete(self) -> bool:
        """Whether the stream said it was finished (``[DONE]`` or a finish reason)."""
        return self.done or self.finish_reason is not None

    def finish(self) -> list[ProviderEvent]:
        """The events that close the stream: pending tool calls, then :class:`ModelDone`."""
        events = self._flush_calls()
        default_reason = "tool_calls" if self._emitted_calls else "stop"
        events.append(
            ModelDone(usage=self.usage, finish_reason=self.finish_reason or default_reason)
        )
        return events

    def _add_fragment(self, position: int, fragment: Any) -> None:
        if not isinstance(fragment, dict):
            raise MalformedChunk(f"tool call delta is not an object: {fragment!r}")
        index = fragment.get("index", position)
        partial = self._calls.setdefault(
            index if isinstance(index, int) else position, _PartialCall()
        )
        if fragment.get("id"):
            partial.id = str(fragment["id"])
        function = fragment.get("function") or {}
        if function.get("name"):
            partial.name += str(function["name"])
        if function.get("arguments"):
            partial.arguments += str(function["arguments"])

    def _flush_calls(self) -> list[ProviderEvent]:
        events: list[ProviderEvent] = []
        for index in sorted(self._calls):
            partial = self._calls[index]
            call_id = partial.id or f"call_{uuid.uuid4().hex[:24]}"
            events.append(
                ToolCallRequest(
                    call=ToolCall(
                        id=call_id,
                        name=partial.name,
                        arguments=arguments_from_wire(partial.arguments),
                    )
                )
            )
        self._emitted_calls += len(self._calls)
        self._calls.clear()
        return events
