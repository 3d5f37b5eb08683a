"""LISTEN/NOTIFY wake-ups travel between independent stores, on commit only."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import pytest

from lash_core.store.base import Notification
from lash_core.store.postgres import PostgresStore
from tests.postgres.conftest import acquired, draft, owner, sid

pytestmark = pytest.mark.postgres


async def test_notifications_arrive_across_connections(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = stores
    s = sid()
    received: asyncio.Queue[Notification] = asyncio.Queue()

    async def consume() -> None:
        async for note in b.notifications():
            if note.session_id == s:
                await received.put(note)

    task = asyncio.create_task(consume())
    try:
        # LISTEN is in place once a notification for this session comes through; until
        # then keep producing wake-ups (each admission is a new input), with a deadline.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        first: Notification | None = None
        n = 0
        while first is None:
            assert loop.time() < deadline, "no notification arrived"
            n += 1
            await a.enqueue_input(draft(s, f"m{n}"))
            with contextlib.suppress(TimeoutError):
                first = await asyncio.wait_for(received.get(), 0.25)
        while not received.empty():
            received.get_nowait()

        lease = acquired(await a.try_claim_lease(s, owner("A"), 60_000))
        start = await a.start_turn(lease.fence(), "t1")
        assert start is not None
        kinds = {(await asyncio.wait_for(received.get(), 5)).kind}
        assert kinds == {"events"}
        assert await a.request_turn_cancel(s, None, "stop") == "t1"
        note = await asyncio.wait_for(received.get(), 5)
        assert note.kind == "cancel" and note.turn_id == "t1"
        await a.release_lease(lease.fence())
        note = await asyncio.wait_for(received.get(), 5)
        assert note.kind == "work"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _produce_until_received(
    store: PostgresStore, s: str, received: asyncio.Queue[Notification], tag: str
) -> Notification:
    """Keep admitting inputs until a wake-up for ``s`` arrives (bounded by a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    n = 0
    while True:
        assert loop.time() < deadline, "no notification arrived"
        n += 1
        await store.enqueue_input(draft(s, f"{tag}{n}"))
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(received.get(), 0.25)


async def test_listener_reconnects_after_its_connection_is_killed(
    stores: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    a, b = stores
    s = sid()
    received: asyncio.Queue[Notification] = asyncio.Queue()

    async def consume() -> None:
        async for note in b.notifications():
            if note.session_id == s:
                await received.put(note)

    task = asyncio.create_task(consume())
    try:
        await _produce_until_received(a, s, received, "before")
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'lash-notify'"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        while not received.empty():
            received.get_nowait()
        await _produce_until_received(a, s, received, "after")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
