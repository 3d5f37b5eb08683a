"""A small, real OpenAI-compatible HTTP/1.1 server for provider tests.

It listens on 127.0.0.1 with a random port and plays a script: each request to
``POST /v1/chat/completions`` takes the next scripted reply (or the default one) - an SSE
stream (optionally slow, or cut off mid-stream), an HTTP error with headers, or a stall
before any response. Every request is recorded (headers and JSON body) for assertions.

The point of a real socket instead of patching httpx: timeouts, disconnects, chunked
framing and ``Retry-After`` go through the same code paths as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

CHAT_PATH = "/v1/chat/completions"


@dataclass
class SSEReply:
    """A 200 ``text/event-stream`` response.

    ``events`` are JSON objects (or raw strings) sent as ``data:`` events, ``gap_s`` apart;
    ``done`` appends ``data: [DONE]``. ``cut_after`` aborts the TCP connection after that
    many events (no terminating chunk: the client sees a broken stream). ``stall_s`` waits
    before even sending the status line.
    """

    events: list[dict[str, Any] | str]
    done: bool = True
    gap_s: float = 0.0
    cut_after: int | None = None
    stall_s: float = 0.0


@dataclass
class StatusReply:
    """A non-streaming response, typically an error: status, JSON or text body, headers."""

    status: int
    body: dict[str, Any] | str = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


Reply = SSEReply | StatusReply


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class FakeOpenAI:
    """Use as ``async with FakeOpenAI() as server:``; point the provider at ``server.base_url``."""

    def __init__(self, *replies: Reply, default: Reply | None = None) -> None:
        self.script: deque[Reply] = deque(replies)
        self.default = default
        self.requests: list[RecordedRequest] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Condition()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def enqueue(self, *replies: Reply) -> None:
        self.script.extend(replies)

    async def wait_for_requests(self, count: int, timeout_s: float = 5) -> None:
        """Wait until at least ``count`` requests have arrived (bounded by ``timeout_s``)."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)

    async def __aenter__(self) -> FakeOpenAI:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._server.wait_closed()

    # -- protocol -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            request = await self._read_request(reader)
            if request is None:
                return
            self.requests.append(request)
            async with self._arrived:
                self._arrived.notify_all()
            if request.method != "POST" or request.path != CHAT_PATH:
                await self._write_status(writer, StatusReply(404, {"error": {"message": "no"}}))
                return
            reply = self.script.popleft() if self.script else self.default
            if reply is None:
                reply = StatusReply(500, {"error": {"message": "fake server: script exhausted"}})
            if isinstance(reply, StatusReply):
                await self._write_status(writer, reply)
            else:
                await self._write_sse(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> RecordedRequest | None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        raw = await reader.readexactly(length) if length else b""
        body: Any = json.loads(raw) if raw else None
        return RecordedRequest(method=method, path=path, headers=headers, body=body)

    async def _write_status(self, writer: asyncio.StreamWriter, reply: StatusReply) -> None:
        if isinstance(reply.body, str):
            payload = reply.body.encode()
            content_type = "text/plain"
        else:
            payload = json.dumps(reply.body).encode()
            content_type = "application/json"
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(payload)),
            "Connection": "close",
            **reply.headers,
        }
        writer.write(_head(reply.status, headers) + payload)
        await writer.drain()

    async def _write_sse(self, writer: asyncio.StreamWriter, reply: SSEReply) -> None:
        if reply.stall_s:
            await asyncio.sleep(reply.stall_s)
        writer.write(
            _head(
                200,
                {
                    "Content-Type": "text/event-stream",
                    "Transfer-Encoding": "chunked",
                    "Connection": "close",
                },
            )
        )
        await writer.drain()
        for sent, event in enumerate(reply.events):
            if reply.cut_after is not None and sent >= reply.cut_after:
                writer.transport.abort()
                return
            if sent and reply.gap_s:
                await asyncio.sleep(reply.gap_s)
            data = event if isinstance(event, str) else json.dumps(event)
            writer.write(_chunk(f"data: {data}\n\n".encode()))
            await writer.drain()
        if reply.cut_after is not None:
            writer.transport.abort()
            return
        if reply.done:
            writer.write(_chunk(b"data: [DONE]\n\n"))
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{key}: {value}" for key, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# -- chunk builders -------------------------------------------------------------------------


def _chunk_obj(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def usage_chunk(
    prompt: int, completion: int, *, cached: int = 0, reasoning: int = 0
) -> dict[str, Any]:
    """The final ``include_usage`` chunk: no choices, only usage."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        },
    }


def text_events(
    pieces: list[str], *, usage: dict[str, Any] | None = None, finish_reason: str = "stop"
) -> list[dict[str, Any] | str]:
    """A streamed text reply: role delta, one content delta per piece, finish, usage."""
    events: list[dict[str, Any] | str] = [_chunk_obj({"role": "assistant", "content": ""})]
    events += [_chunk_obj({"content": piece}) for piece in pieces]
    events.append(_chunk_obj({}, finish_reason))
    if usage is not None:
        events.append(usage)
    return events


def tool_call_events(
    calls: list[tuple[str, str, list[str]]], *, usage: dict[str, Any] | None = None
) -> list[dict[str, Any] | str]:
    """Streamed tool calls: ``(id, name, argument fragments)`` per call, fragments interleaved
    across calls by round, the way parallel tool calls arrive."""
    events: list[dict[str, Any] | str] = [_chunk_obj({"role": "assistant", "content": None})]
    for index, (call_id, name, _fragments) in enumerate(calls):
        events.append(
            _chunk_obj(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
        )
    rounds = max((len(fragments) for _, _, fragments in calls), default=0)
    for step in range(rounds):
        for index, (_, _, fragments) in enumerate(calls):
            if step < len(fragments):
                events.append(
                    _chunk_obj(
                        {
                            "tool_calls": [
                                {"index": index, "function": {"arguments": fragments[step]}}
                            ]
                        }
                    )
                )
    events.append(_chunk_obj({}, "tool_calls"))
    if usage is not None:
        events.append(usage)
    return events
