"""LISTEN/NOTIFY wake-ups travel between independent stores, on commit only."""

from __future__ import annotations

import asyncio
import contextlib
import json

import psycopg
import pytest

from lash_core.store.base import Notification, NotifiedEvent
from lash_core.store.postgres import PostgresStore
from tests.conformance.conftest import append, commit, final, node
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


async def test_events_notifications_carry_the_events_as_stored(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """Every path that appends events sends them along in its ``events`` notification
    (admission one by one and in a batch, turn start, commit), numbered, typed and with
    the payload exactly as stored, so that their publisher needs no scan; events too large
    for a notification are announced without them."""
    a, b = stores
    s, t = sid("carry"), sid("carry-batch")
    received: asyncio.Queue[Notification] = asyncio.Queue()

    async def consume() -> None:
        async for note in b.notifications():
            if note.kind == "events" and note.session_id in (s, t):
                await received.put(note)

    task = asyncio.create_task(consume())
    try:
        await _produce_until_received(a, s, received, "warm")
        while not received.empty():
            received.get_nowait()
        base = len((await a.events_after(s, 0)).events)

        await a.enqueue_input(draft(s, "one"))
        await a.enqueue_inputs([draft(s, "two"), draft(t, "three"), draft(s, "four")])
        lease = acquired(await a.try_claim_lease(s, owner("A"), 60_000))
        start = await a.start_turn(lease.fence(), "t1")
        assert start is not None and start.claim is not None
        await a.commit(
            commit(
                s,
                lease,
                graph=append(node("u", "one")),
                turn=final("t1"),
                completed_input_claims=[start.claim.completion()],
                release_lease=True,
            )
        )
        await a.enqueue_input(draft(s, "x" * 9000))  # too large to carry

        carried: dict[str, list[NotifiedEvent]] = {s: [], t: []}
        plain = 0
        while plain == 0:
            note = await asyncio.wait_for(received.get(), 5)
            carried[note.session_id].extend(note.events)
            plain += not note.events
        assert plain == 1 and received.empty()
        for session_id, skip, count in ((s, base, 5), (t, 0, 1)):
            stored = (await a.events_after(session_id, 0)).events[skip:]
            assert len(stored) == count + (session_id == s)  # the large one is not carried
            assert [(e.seq, e.revision, e.type) for e in carried[session_id]] == [
                (e.seq, e.revision, e.type) for e in stored[:count]
            ]
            assert [json.loads(e.payload) for e in carried[session_id]] == [
                e.payload.model_dump(mode="json") for e in stored[:count]
            ]
            messages = Notification(
                kind="events", session_id=session_id, events=tuple(carried[session_id])
            ).outbox_messages()
            assert [json.loads(m.body) for m in messages] == [e.to_wire() for e in stored[:count]]
        assert [e.type for e in carried[s]] == [
            "input.admitted",
            "input.admitted",
            "input.admitted",
            "turn.started",
            "turn.committed",
        ]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
