"""The ``openai`` provider: any OpenAI-compatible Chat Completions endpoint, streamed.

One model call is ``POST {base_url}/chat/completions`` with ``stream: true`` and
``stream_options.include_usage``; the SSE response becomes text chunks, tool-call requests
and a final :class:`ModelDone` (see :mod:`lash_core.providers.openai_wire`). A server that
ignores ``stream`` and answers with one JSON completion yields the same event sequence.

Transient failures - 429, 408, 5xx, connection errors, timeouts, a stream cut off before
it said it was done - are retried here with exponential backoff and jitter, honouring the
server's ``Retry-After``, but only while nothing has been yielded: once the caller has seen
part of a reply, replaying the call would duplicate it, so the failure is raised as
:class:`ProviderError` (``retryable=True``) and the turn decides. Other 4xx responses are
the request's fault and raise at once with ``retryable=False``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx

from lash_core.errors import ProviderError
from lash_core.providers.base import ModelRequest, ProviderEvent
from lash_core.providers.openai_wire import (
    ChunkAssembler,
    MalformedChunk,
    StreamError,
    completion_events,
    request_body,
)
from lash_core.providers.retry import backoff_delay, is_retryable_status, parse_retry_after
from lash_core.providers.sse import sse_data

_ERROR_BODY_LIMIT = 2000


class _Transient(Exception):
    """An attempt failed in a way a fresh attempt may not."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class OpenAIProvider:
    """Streams Chat Completions from an OpenAI-compatible server.

    ``timeout_s`` bounds each read (the wait for the next bytes of the stream) and the
    write; connecting is bounded by ``min(timeout_s, connect_timeout_s)``. ``max_retries``
    counts retries after the first attempt. A ``Retry-After`` longer than
    ``max_retry_after_s`` is not waited out: the call fails as retryable instead, so a
    worker never sleeps for minutes inside a turn. Pass ``client`` to share a connection
    pool; the provider then leaves closing it to the owner.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        *,
        timeout_s: float = 60,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        client: httpx.AsyncClient | None = None,
        connect_timeout_s: float = 10,
        max_backoff_s: float = 30,
        max_retry_after_s: float = 60,
        rng: random.Random | None = None,
    ) -> None:
        if not base_url:
            raise ValueError("base_url is required")
        if not model:
            raise ValueError("model is required")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._model = model
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, connect_timeout_s))
        self._max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._max_backoff_s = max_backoff_s
        self._max_retry_after_s = max_retry_after_s
        self._rng = rng or random.Random()
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(timeout=self._timeout)

    @property
    def provider_id(self) -> str:
        return "openai"

    @property
    def model(self) -> str:
        return self._model

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        body = request_body(request, self._model)
        attempt = 0
        while True:
            yielded = False
            try:
                async for event in self._attempt(body):
                    yielded = True
                    yield event
                return
            except _Transient as failure:
                if yielded:
                    raise ProviderError(
                        f"openai stream failed after output began: {failure}",
                        retryable=True,
                        status=failure.status,
                    ) from failure
                if attempt >= self._max_retries:
                    raise ProviderError(
                        f"openai request failed after {attempt + 1} attempt(s): {failure}",
                        retryable=True,
                        status=failure.status,
                    ) from failure
                delay = self._retry_delay(attempt, failure)
                attempt += 1
                await asyncio.sleep(delay)

    def _retry_delay(self, attempt: int, failure: _Transient) -> float:
        if failure.retry_after is None:
            return backoff_delay(
                attempt, base_s=self._backoff_base_s, max_s=self._max_backoff_s, rng=self._rng
            )
        if failure.retry_after > self._max_retry_after_s:
            raise ProviderError(
                f"openai asked to retry after {failure.retry_after:.0f}s "
                f"(more than {self._max_retry_after_s:.0f}s): {failure}",
                retryable=True,
                status=failure.status,
            ) from failure
        return failure.retry_after

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    async def _attempt(self, body: dict[str, Any]) -> AsyncIterator[ProviderEvent]:
        """One HTTP exchange. Transient failures raise :class:`_Transient`."""
        try:
            async with self._client.stream(
                "POST", self._url, json=body, headers=self._headers(), timeout=self._timeout
            ) as response:
                if response.status_code >= 400:
                    await self._raise_for_status(response)
                if response.headers.get("content-type", "").startswith("application/json"):
                    payload = (await response.aread()).decode("utf-8", errors="replace")
                    for event in completion_events(payload):
                        yield event
                    return
                assembler = ChunkAssembler()
                async with aclosing(sse_data(response.aiter_lines())) as payloads:
                    async for payload in payloads:
                        for event in assembler.feed(payload):
                            yield event
                        if assembler.done:
                            break
                if not assembler.complete:
                    raise _Transient("stream ended before the response was complete")
                for event in assembler.finish():
                    yield event
        except httpx.TimeoutException as exc:
            raise _Transient(f"timed out ({type(exc).__name__})") from exc
        except httpx.RequestError as exc:
            raise _Transient(f"connection failed ({type(exc).__name__}: {exc})") from exc
        except MalformedChunk as exc:
            raise _Transient(str(exc)) from exc
        except StreamError as exc:
            raise ProviderError(str(exc), retryable=False) from exc

    async def _raise_for_status(self, response: httpx.Response) -> None:
        status = response.status_code
        raw = await response.aread()
        detail = _error_detail(raw)
        message = f"HTTP {status} from {self._url}: {detail}"
        if is_retryable_status(status):
            raise _Transient(
                message,
                status=status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        raise ProviderError(message, retryable=False, status=status)


def _error_detail(raw: bytes) -> str:
    """The ``error.message`` of an OpenAI error body, else the body text (truncated)."""
    text = raw.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text[:_ERROR_BODY_LIMIT] or "(empty body)"
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_ERROR_BODY_LIMIT]
        if isinstance(error, str):
            return error[:_ERROR_BODY_LIMIT]
    return text[:_ERROR_BODY_LIMIT]
