"""Harness reads that ride out a briefly unavailable database.

The harness shares the PostgreSQL server with other test runs and, by design, with its
own fault injection: a read that fails with a retryable store error (too many clients, a
terminated backend) is retried with backoff for a while instead of failing the run. The
workers under test get no such help - this is only the observer's side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from lash_core.errors import RetryableStoreError
from lash_core.store.base import Store

T = TypeVar("T")


class ResilientReads:
    """A proxy of a :class:`Store` whose coroutine methods retry retryable errors."""

    def __init__(self, store: Store, patience_s: float = 60.0) -> None:
        self._store = store
        self._patience_s = patience_s

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not asyncio.iscoroutinefunction(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await retrying(lambda: target(*args, **kwargs), self._patience_s)

        return call


async def retrying(call: Callable[[], Awaitable[T]], patience_s: float) -> T:
    deadline = time.monotonic() + patience_s
    backoff = 0.1
    while True:
        try:
            return await call()
        except RetryableStoreError:
            if time.monotonic() + backoff > deadline:
                raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def resilient(store: Store, patience_s: float = 60.0) -> Store:
    return cast(Store, ResilientReads(store, patience_s))
