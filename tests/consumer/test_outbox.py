"""The outbox relay against real PostgreSQL and RabbitMQ: order, identity, one publisher
per shard, takeover of a closed relay's shards."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import psycopg
import pytest

from consumer.outbox import (
    MARK_LINGER_S,
    OutboxRelay,
    lock_keys,
    properties,
    publish_confirmed,
)
from consumer.producer import Producer
from consumer.topology import Topology, declare
from lash_core.events import session_shard
from lash_core.inputs import TextItem, TurnInput, TurnInputDraft
from lash_core.store.base import Notification, Store
from lash_core.store.postgres import PostgresStore
from tests.consumer.checks import assert_gapless, assert_message_properties, collect_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    pg = PostgresStore(db_url, pool_size=4)
    await pg.start()
    try:
        yield pg
    finally:
        await pg.close()


async def admit(store: Store, session_id: str, n: int, key: str = "k") -> None:
    for i in range(n):
        await store.enqueue_input(
            TurnInputDraft(
                session_id=session_id,
                source_key=f"{key}{i}",
                input=TurnInput(items=[TextItem(text=f"{session_id} {i}")]),
            )
        )


def _relay(
    store: Store,
    topology: Topology,
    db_url: str,
    namespace: str,
    *,
    shards: int,
    batch: int,
    poll: float,
    retake: float | None = None,
    linger: float = MARK_LINGER_S,
) -> OutboxRelay:
    """A relay of ``namespace`` publishing to its observations exchange."""
    return OutboxRelay(
        store,
        topology.observations_exchange,
        database_url=db_url,
        namespace=namespace,
        shards=shards,
        batch=batch,
        poll_interval_s=poll,
        retake_interval_s=retake,
        mark_linger_s=linger,
    )


async def test_relays_publish_in_order_and_take_over(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)

        def relay() -> OutboxRelay:
            return _relay(store, topology, db_url, clean_namespace, shards=4, batch=7, poll=0.1)

        a, b = relay(), relay()
        async with (
            await Producer.on_connection(connection, clean_namespace) as producer,
            producer.observe() as observer,
        ):
            run_a = asyncio.create_task(a.run())
            await _until(lambda: len(a.held_shards) == 4)
            sessions = [f"ob-{i}" for i in range(6)]
            await asyncio.gather(*(admit(store, s, 2) for s in sessions))
            # b joins while a publishes: a gives up half of the shards (on its timer here,
            # with no notifications routed) and b takes them
            run_b = asyncio.create_task(b.run())
            await _until(lambda: len(a.held_shards) == 2 and len(b.held_shards) == 2)
            assert not a.held_shards & b.held_shards
            await asyncio.gather(*(admit(store, s, 3, key="j") for s in sessions))
            events: list[dict[str, Any]] = []
            await collect_until(observer, events, lambda evs: len(evs) >= 30, timeout_s=30)
            assert {s for s in sessions if b.publishes(s)} and {
                s for s in sessions if a.publishes(s)
            }
            assert b.published > 0

            # a goes away: its advisory locks die with its connection; b takes over
            await _stopped(a, run_a)
            await _until(lambda: len(b.held_shards) == 4)
            await asyncio.gather(*(admit(store, f"{s}-late", 3) for s in sessions))
            await collect_until(observer, events, lambda evs: len(evs) >= 48, timeout_s=30)
            await _stopped(b, run_b)

            assert_message_properties(observer)
            assert_gapless(events)
            # per session, first publication order is seq order
            first: dict[str, list[int]] = {}
            seen: set[tuple[str, int]] = set()
            for e in events:
                key = (e["session_id"], e["seq"])
                if key not in seen:
                    seen.add(key)
                    first.setdefault(e["session_id"], []).append(e["seq"])
            for session_id, seqs in first.items():
                assert seqs == sorted(seqs), f"{session_id} out of order: {seqs}"
            assert await store.unpublished_events(100) == []
            assert all(json.dumps(e) for e in events)
    finally:
        await connection.close()


async def _local_relay(
    store: Store,
    topology: Topology,
    db_url: str,
    namespace: str,
    *,
    linger: float = MARK_LINGER_S,
) -> tuple[OutboxRelay, asyncio.Task[None]]:
    """A running one-shard relay that ``store`` hands its events to, once it holds the
    shard (its poll a minute away: only hand-overs and notifications wake it)."""
    relay = _relay(store, topology, db_url, namespace, shards=1, batch=50, poll=60.0, linger=linger)
    store.set_local_publisher(relay)
    run = asyncio.create_task(relay.run())
    await _until(lambda: relay.held_shards == {0})
    return relay, run


async def _stopped(relay: OutboxRelay, run: asyncio.Task[None]) -> None:
    """Stop ``relay``, wait for its ``run`` task and close it (releasing its shards)."""
    await relay.stop()
    await run
    await relay.close()


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _closed(notes: AsyncIterator[Notification]) -> None:
    """End a notification stream (its LISTEN connection)."""
    closer = getattr(notes, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


async def _until(condition: Any, timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_relays_scan_once_per_wake_and_retake_only_on_timer_or_release(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    """A relay without shards never scans and retakes only on its (slow) timer; one
    holding every shard publishes what the notifications carry without a scan; a relay
    that closes announces it and the other retakes at once, long before its timer."""
    connection = await aio_pika.connect_robust(amqp_url)
    notes = store.notifications()
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)

        def relay() -> OutboxRelay:
            return _relay(
                store,
                topology,
                db_url,
                clean_namespace,
                shards=8,
                batch=500,
                poll=60.0,
                retake=60.0,
            )

        a, b = relay(), relay()
        run_a = asyncio.create_task(a.run())
        await _until(lambda: len(a.held_shards) == 8)
        run_b = asyncio.create_task(b.run())
        await _until(lambda: b.retakes == 1)

        routed: list[str] = []

        async def route() -> None:
            async for note in notes:
                if note.kind == "events":
                    routed.append(note.session_id)
                    a.on_notification(note)
                    b.on_notification(note)

        router = asyncio.create_task(route())
        probes = 0
        while not routed:  # until LISTEN is in place
            await admit(store, f"probe-{probes}", 1)
            probes += 1
            await asyncio.sleep(0.05)
        a.wake()  # probes admitted before LISTEN was in place are found by a scan
        await _until(lambda: a.published == probes)
        scans_before = a.scans
        sessions = [f"wake-{i}" for i in range(10)]
        await asyncio.gather(*(admit(store, s, 3) for s in sessions))
        await _until(lambda: a.published == probes + 30)
        await asyncio.sleep(0.2)
        assert b.held_shards == set() and b.scans == 0 and b.published == 0
        assert b.retakes == 1  # 30 notifications later: no retake storm
        assert a.scans == scans_before  # every notification carried its event
        assert a.retakes == 1

        await _stopped(a, run_a)  # announces the release
        await _until(lambda: len(b.held_shards) == 8, timeout_s=10)
        assert b.retakes == 2
        await admit(store, "after-release", 2)
        await _until(lambda: b.published == 2)
        assert await store.unpublished_events(100) == []

        await _cancelled(router)
        await _stopped(b, run_b)
    finally:
        await _closed(notes)
        await connection.close()


async def test_relays_share_the_shards_out_at_once_when_one_joins_or_leaves(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    """A relay that joins short of its share says so, and the holder above its share
    releases the difference at once (their timers are a minute away): each ends with half.
    When one leaves, the other takes every shard at once, no longer counting it."""
    connection = await aio_pika.connect_robust(amqp_url)
    notes = store.notifications()
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)
        relays: list[OutboxRelay] = []

        async def route() -> None:
            async for note in notes:
                if note.kind == "events":
                    for relay in relays:
                        relay.on_notification(note)

        router = asyncio.create_task(route())

        def relay() -> OutboxRelay:
            made = _relay(store, topology, db_url, clean_namespace, shards=8, batch=500, poll=60.0)
            relays.append(made)
            return made

        a = relay()
        run_a = asyncio.create_task(a.run())
        await _until(lambda: len(a.held_shards) == 8)
        probes = 0
        while a.published < 1:  # until LISTEN is in place (a scans on the notification)
            await admit(store, f"share-probe-{probes}", 1)
            probes += 1
            await asyncio.sleep(0.05)

        b = relay()
        run_b = asyncio.create_task(b.run())
        await _until(lambda: len(a.held_shards) == 4 and len(b.held_shards) == 4, timeout_s=10)
        assert not a.held_shards & b.held_shards
        assert a.retakes >= 2 and b.retakes >= 2  # by announcement: the timers are far off

        await _stopped(a, run_a)
        await _until(lambda: len(b.held_shards) == 8, timeout_s=10)

        await _cancelled(router)
        await _stopped(b, run_b)
    finally:
        await _closed(notes)
        await connection.close()


def _session_in_shard(shard: int, shards: int, prefix: str) -> str:
    return next(
        f"{prefix}-{i}" for i in range(1000) if session_shard(f"{prefix}-{i}") % shards == shard
    )


async def test_a_local_relay_is_woken_by_its_stores_commits_not_by_notifications(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    """Wired as its store's local publisher, a relay publishes the events of its shards
    with no notification routed to it (its poll is a minute away): each commit wakes it.
    It answers ``events`` notifications only for sessions of the shards it holds."""
    connection = await aio_pika.connect_robust(amqp_url)
    other = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)
        # Another relay's shard 0, held before this relay starts.
        key, _ = lock_keys(clean_namespace, 0)
        await other.execute("SELECT pg_advisory_lock(%s, 0)", (key,))
        relay = _relay(store, topology, db_url, clean_namespace, shards=4, batch=500, poll=60.0)
        run = asyncio.create_task(relay.run())
        await _until(lambda: relay.held_shards == {1, 2, 3})
        mine = _session_in_shard(2, 4, "mine")
        theirs = _session_in_shard(0, 4, "theirs")
        assert relay.publishes(mine) and not relay.publishes(theirs)

        store.set_local_publisher(relay)
        await admit(store, mine, 2)
        await admit(store, theirs, 1)  # not this relay's to publish
        await _until(lambda: relay.published == 2)

        scans = relay.scans
        relay.on_notification(Notification(kind="events", session_id=theirs))
        await asyncio.sleep(0.1)
        assert relay.scans == scans
        relay.on_notification(Notification(kind="events", session_id=mine))
        await _until(lambda: relay.scans == scans + 1)
        assert relay.published == 2
        assert [e.session_id for e in await store.unpublished_events(100)] == [theirs]

        await _stopped(relay, run)
    finally:
        store.set_local_publisher(None)
        await other.close()
        await connection.close()


async def test_a_nacked_publish_stays_unpublished_and_goes_again_in_order(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    """A batch goes out as one write; the broker confirms each message on its own. Here a
    bound queue that holds two messages and rejects more makes the broker nack the rest:
    only the confirmed prefix is marked published, and the rest goes again, in order, once
    the broker takes it."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)
        full = await channel.declare_queue(
            f"{clean_namespace}.full",
            arguments={"x-max-length": 2, "x-overflow": "reject-publish"},
        )
        await full.bind(topology.observations_exchange)
        await admit(store, "nacked", 5)
        seqs = sorted(e.seq for e in await store.unpublished_events(100))
        assert len(seqs) == 5

        relay = _relay(store, topology, db_url, clean_namespace, shards=1, batch=50, poll=0.05)
        run = asyncio.create_task(relay.run())
        await _until(lambda: relay.published == 2)
        scans = relay.scans
        await _until(lambda: relay.scans >= scans + 3)  # retried, and nacked again
        assert relay.published == 2
        assert [e.seq for e in await store.unpublished_events(100)] == seqs[2:]
        kept = [await full.get(timeout=5) for _ in range(2)]
        assert [m.message_id for m in kept] == [f"nacked:{s}" for s in seqs[:2]]

        await full.delete(if_unused=False, if_empty=False)  # now nothing refuses them
        await _until(lambda: relay.published == 5)
        assert await store.unpublished_events(100) == []
        await _stopped(relay, run)
    finally:
        await connection.close()


async def test_publish_confirmed_without_confirms_sends_each_message(
    amqp_url: str, clean_namespace: str
) -> None:
    """On a channel without publisher confirms there is nothing to batch confirms on:
    every message still goes, in order, each through ``send``."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        topology = await declare(channel, clean_namespace, 5)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(topology.observations_exchange)
        messages = [
            (b"{}", properties("t", "s", message_id=f"s:{i}", persistent=True), "t")
            for i in range(3)
        ]
        assert await publish_confirmed(topology.observations_exchange, messages) == [None] * 3
        got = [await queue.get(timeout=5) for _ in range(3)]
        assert [m.message_id for m in got] == ["s:0", "s:1", "s:2"]
        assert got[0].headers == {"session_id": "s"} and got[0].type == "t"
        assert got[0].delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    finally:
        await connection.close()


async def test_marks_ride_on_the_next_scan_or_go_alone_after_the_linger(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    """Confirmed events are marked published by the relay's next scan, in that scan's
    statement; with no scan coming they are marked alone once the linger passes, and a
    stopping relay marks what it has left."""
    assert isinstance(store, PostgresStore)
    statements: list[str] = []
    store.database.add_listener(statements.append)
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)
        relay, run = await _local_relay(store, topology, db_url, clean_namespace, linger=60.0)

        def marks() -> tuple[int, int]:
            alone = sum(s.startswith("UPDATE lash_events e SET published") for s in statements)
            return alone, sum(s.startswith("WITH marked AS") for s in statements)

        await admit(store, "linger-a", 1)  # handed over: published without a scan
        await _until(lambda: relay.pending_marks == 1)
        assert relay.published == 0 and len(await store.unpublished_events(100)) == 1
        store.set_local_publisher(None)  # b's event is announced, as another worker's are
        await admit(store, "linger-b", 1)
        relay.on_notification(Notification(kind="events", session_id="linger-b"))
        await _until(lambda: relay.published == 1 and relay.pending_marks == 1)  # scan marked a
        assert marks() == (0, 1)
        assert [e.session_id for e in await store.unpublished_events(100)] == ["linger-b"]
        await relay.stop()
        await run  # stopping: b's event is marked on its own
        assert relay.published == 2 and relay.pending_marks == 0 and marks() == (1, 1)
        assert await store.unpublished_events(100) == []
        await relay.close()

        quick, run = await _local_relay(store, topology, db_url, clean_namespace, linger=0.05)
        await admit(store, "linger-c", 1)
        await _until(lambda: quick.published == 1)  # no scan came: the linger ran out
        assert marks() == (2, 1) and await store.unpublished_events(100) == []
        await _stopped(quick, run)
    finally:
        store.set_local_publisher(None)
        store.database.remove_listener(statements.append)
        await connection.close()


async def test_handed_over_events_go_out_without_a_scan_while_they_follow_on(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    """Events its store hands over are published from memory while each follows the last
    one the relay published for its session. One committed elsewhere (by another store,
    never announced to this relay) leaves a gap: the next handed-over event makes the relay
    scan, which publishes both in order; after that the session follows on again."""
    other = PostgresStore(db_url, pool_size=1)
    await other.start()
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)
        relay, run = await _local_relay(store, topology, db_url, clean_namespace)
        async with (
            await Producer.on_connection(connection, clean_namespace) as producer,
            producer.observe() as observer,
        ):
            await _until(lambda: relay.scans == 1)  # the scan that taking the shard asks for
            events: list[dict[str, Any]] = []

            await admit(store, "handed", 3)
            await collect_until(observer, events, lambda evs: len(evs) >= 3, timeout_s=30)
            await _until(lambda: relay.published + relay.pending_marks == 3)
            assert relay.scans == 1 and relay.handed_published == 3

            await admit(other, "handed", 1, key="elsewhere")
            await admit(store, "handed", 1, key="after")
            await collect_until(observer, events, lambda evs: len(evs) >= 5, timeout_s=30)
            await _until(lambda: relay.published + relay.pending_marks == 5)
            assert relay.scans == 2 and relay.handed_published == 3

            await admit(store, "handed", 1, key="last")
            await collect_until(observer, events, lambda evs: len(evs) >= 6, timeout_s=30)
            await _until(lambda: relay.published + relay.pending_marks == 6)
            assert relay.scans == 2 and relay.handed_published == 4

            assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
            assert_gapless(events)
            assert_message_properties(observer)
            await _stopped(relay, run)
        assert await store.unpublished_events(100) == []
    finally:
        store.set_local_publisher(None)
        await other.close()
        await connection.close()


async def test_events_another_store_commits_go_out_from_their_notification(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    """Events another worker's store commits (one by one and in a batch) arrive in their
    ``events`` notifications and go out from memory like the relay's own store's, with no
    scan, each following on from the last, whichever store committed it."""
    other = PostgresStore(db_url, pool_size=1)
    await other.start()
    notes = store.notifications()
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)
        relay, run = await _local_relay(store, topology, db_url, clean_namespace)

        async def route() -> None:
            async for note in notes:
                if note.kind == "events":
                    relay.on_notification(note)

        router = asyncio.create_task(route())
        async with (
            await Producer.on_connection(connection, clean_namespace) as producer,
            producer.observe() as observer,
        ):
            await _until(lambda: relay.scans == 1)  # the scan that taking the shard asks for
            probes = 0
            while relay.handed_published == 0:  # until LISTEN is in place
                assert probes < 200, "no notification carried its event to the relay"
                await admit(other, f"carried-probe-{probes}", 1)
                probes += 1
                await asyncio.sleep(0.05)
            scans, handed = relay.scans, relay.handed_published

            await admit(other, "carried", 2)
            await other.enqueue_inputs(
                [
                    TurnInputDraft(
                        session_id="carried",
                        source_key=f"batch{i}",
                        input=TurnInput(items=[TextItem(text=f"batch {i}")]),
                    )
                    for i in range(2)
                ]
            )
            await admit(store, "carried", 1, key="mine")
            await admit(other, "carried", 1, key="again")
            events: list[dict[str, Any]] = []

            def carried(evs: list[dict[str, Any]]) -> list[int]:
                return [e["seq"] for e in evs if e["session_id"] == "carried"]

            await collect_until(observer, events, lambda evs: len(carried(evs)) >= 6)
            assert carried(events) == [1, 2, 3, 4, 5, 6]
            assert relay.scans == scans and relay.handed_published == handed + 6
            assert_message_properties(observer)
            await _stopped(relay, run)
    finally:
        store.set_local_publisher(None)
        await _cancelled(router)
        await _closed(notes)
        await other.close()
        await connection.close()


async def test_steady_handed_over_events_cannot_put_their_marks_off(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    """Each handed-over event wakes the relay without a scan to carry the marks: the
    linger counts from the oldest unmarked confirm, so a steady stream of them (one every
    few milliseconds, against a linger of 0.2 s) is still marked published on time."""
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)
        relay, run = await _local_relay(store, topology, db_url, clean_namespace, linger=0.2)
        scans = relay.scans
        admitted = 0
        while relay.published == 0:
            assert admitted < 400, "marks put off while handed-over events kept coming"
            await admit(store, f"steady-{admitted}", 1)
            admitted += 1
        assert relay.scans == scans and relay.handed_published >= relay.published
        await _stopped(relay, run)
    finally:
        store.set_local_publisher(None)
        await connection.close()
