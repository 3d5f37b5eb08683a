"""Injected time and identity sources.

The pure domain never reads a clock or mints an id itself: stores and the engine pass
values in. The PostgreSQL store uses the database clock for every lease, claim and
ordering decision; these host-side sources only stamp diagnostics and mint ids.
"""

from __future__ import annotations

import time
import uuid
from typing import Protocol


class Clock(Protocol):
    """Milliseconds since the Unix epoch."""

    def now_ms(self) -> int: ...


class SystemClock:
    """The host wall clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that only moves when told to; for tests and the in-memory store."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms

    def now_ms(self) -> int:
        return self._now

    def advance(self, ms: int) -> None:
        self._now += ms

    def set(self, now_ms: int) -> None:
        self._now = now_ms


class IdFactory(Protocol):
    """Mints unique opaque ids with a readable prefix (``ti_``, ``turn_``, ...)."""

    def new_id(self, prefix: str) -> str: ...


class UuidIds:
    """Random ids: ``<prefix><uuid4 hex>``."""

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{uuid.uuid4().hex}"


class SequentialIds:
    """Deterministic ids for tests: ``<prefix>1``, ``<prefix>2``, ..."""

    def __init__(self) -> None:
        self._n = 0

    def new_id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"
