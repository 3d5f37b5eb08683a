"""Session observation for hosts: a read view with a cursor, events after a cursor, and a
subscription that follows new durable events (lash-semantics §6, DESIGN.md difference 4).

Unlike lash's per-process live replay, the event log is durable and shared by every worker,
so a cursor taken on one process resumes on another. When events a cursor needs are no
longer retained, the subscription yields a fresh :class:`SessionObservation` (the reader
replaces its projection) and continues from there instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from lash_core._model import Frozen
from lash_core.errors import InvalidRequest
from lash_core.events import CursorError, DurableEvent, make_cursor, parse_cursor
from lash_core.store.base import EventPage, SessionView, Store

DEFAULT_POLL_INTERVAL_S = 1.0
"""Fallback wake-up of a subscription if a notification is ever missed."""

PAGE_SIZE = 1000


class SessionObservation(Frozen):
    """The committed read view of a session and the cursor that continues after it."""

    session_id: str
    cursor: str
    revision: int
    last_seq: int
    view: SessionView


async def observe(store: Store, session_id: str) -> SessionObservation:
    view = await store.read_session(session_id)
    return SessionObservation(
        session_id=session_id,
        cursor=make_cursor(session_id, view.head_revision, view.last_seq),
        revision=view.head_revision,
        last_seq=view.last_seq,
        view=view,
    )


def cursor_seq(session_id: str, cursor: str) -> int:
    """The ``seq`` a cursor of ``session_id`` stands at; bad cursors are invalid requests."""
    try:
        return parse_cursor(cursor, session_id)[2]
    except CursorError as exc:
        raise InvalidRequest(str(exc)) from exc


async def events_after_cursor(
    store: Store, session_id: str, cursor: str, limit: int = PAGE_SIZE
) -> EventPage:
    return await store.events_after(session_id, cursor_seq(session_id, cursor), limit)


class Wakeups:
    """A latch set by store notifications for one session (see :func:`session_wakeups`)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    async def wait(self, timeout_s: float) -> None:
        """Until a wake-up or ``timeout_s``, whichever comes first (never raises on timeout).

        ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11 ``wait_for`` can swallow
        a cancellation that arrives as the event is set, and a loop around it never stops.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._event.wait()


@contextlib.asynccontextmanager
async def session_wakeups(
    store: Store, session_id: str, kinds: tuple[str, ...] = ("work", "cancel", "events")
) -> AsyncIterator[Wakeups]:
    """Follow ``store.notifications()`` for one session while the block runs.

    The subscription is registered before the block starts, so a caller that reads state
    after entering misses nothing; polling with a timeout stays the fallback.
    """
    notes = store.notifications()
    wakeups = Wakeups()

    async def pump() -> None:
        async for note in notes:
            if note.session_id == session_id and note.kind in kinds:
                wakeups.set()

    pumper = asyncio.create_task(pump(), name=f"wakeups:{session_id}")
    try:
        yield wakeups
    finally:
        pumper.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pumper
        closer = getattr(notes, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()


async def subscribe(
    store: Store,
    session_id: str,
    cursor: str | None = None,
    *,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
) -> AsyncIterator[DurableEvent | SessionObservation]:
    """Follow a session's durable events, oldest first, forever.

    Without a cursor the first item is the current observation. After a cursor, every
    event after it is yielded; if some are no longer retained, a fresh observation is
    yielded instead and following continues from its cursor.
    """
    async with session_wakeups(store, session_id, kinds=("events",)) as wakeups:
        if cursor is None:
            first = await observe(store, session_id)
            yield first
            seq = first.last_seq
        else:
            seq = cursor_seq(session_id, cursor)
        while True:
            wakeups.clear()
            page = await store.events_after(session_id, seq, PAGE_SIZE)
            if page.gap:
                fresh = await observe(store, session_id)
                yield fresh
                seq = fresh.last_seq
                continue
            for event in page.events:
                yield event
                seq = event.seq
            if len(page.events) >= PAGE_SIZE:
                continue
            await wakeups.wait(poll_interval_s)
