"""The outbox relay against real PostgreSQL and RabbitMQ: order, identity, one publisher
per shard, takeover of a closed relay's shards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from consumer.outbox import OutboxRelay
from consumer.producer import Producer
from consumer.topology import declare
from lash_core.inputs import TextItem, TurnInput, TurnInputDraft
from lash_core.store.base import Store
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


async def admit(store: Store, session_id: str, n: int) -> None:
    for i in range(n):
        await store.enqueue_input(
            TurnInputDraft(
                session_id=session_id,
                source_key=f"k{i}",
                input=TurnInput(items=[TextItem(text=f"{session_id} {i}")]),
            )
        )


async def test_relays_publish_in_order_and_take_over(
    store: Store, db_url: str, amqp_url: str, clean_namespace: str
) -> None:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, clean_namespace, 5)

        def relay() -> OutboxRelay:
            return OutboxRelay(
                store,
                topology.observations_exchange,
                database_url=db_url,
                namespace=clean_namespace,
                shards=4,
                batch=7,
                poll_interval_s=0.1,
            )

        a, b = relay(), relay()
        async with (
            await Producer.on_connection(connection, clean_namespace) as producer,
            producer.observe() as observer,
        ):
            run_a = asyncio.create_task(a.run())
            await _until(lambda: len(a.held_shards) == 4)
            run_b = asyncio.create_task(b.run())
            sessions = [f"ob-{i}" for i in range(6)]
            await asyncio.gather(*(admit(store, s, 5) for s in sessions))
            events: list[dict[str, Any]] = []
            await collect_until(observer, events, lambda evs: len(evs) >= 30, timeout_s=30)
            assert b.held_shards == set()  # a holds every shard: b never publishes
            assert b.published == 0

            # a goes away: its advisory locks die with its connection; b takes over
            await a.stop()
            await run_a
            await a.close()
            await _until(lambda: len(b.held_shards) == 4)
            await asyncio.gather(*(admit(store, f"{s}-late", 3) for s in sessions))
            await collect_until(observer, events, lambda evs: len(evs) >= 48, timeout_s=30)
            await b.stop()
            await run_b
            await b.close()

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


async def _until(condition: Any, timeout_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)
