"""``consumer.broker``: the connection and channels keep no 10-frame hand-offs between
aiormq's tasks, also after the broker drops the connection and it is restored."""

from __future__ import annotations

import asyncio
import os

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from consumer import broker
from tests import services
from tests.fault.faults import (
    FaultLog,
    close_broker_connections,
    fast_reconnect,
    have_rabbitmqctl,
)

pytestmark = [pytest.mark.rabbitmq]


def test_unbound_lifts_the_limit_of_a_queue_in_place() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue(maxsize=10)
    broker.unbound(queue)
    for n in range(100):
        queue.put_nowait(n)  # QueueFull at the eleventh with the limit
    assert queue.maxsize == 0
    assert queue.qsize() == 100


async def _limits(connection: AbstractRobustConnection, channel: AbstractChannel) -> list[int]:
    """The outgoing queue's limit, then the channel's incoming one (0: none)."""
    assert connection.transport is not None
    underlay = await channel.get_underlay_channel()
    return [connection.transport.connection.write_queue.maxsize, underlay.frames.maxsize]


async def _round_trip(channel: AbstractChannel) -> bytes:
    """Publish (with a confirm) to a queue of our own and get the message back."""
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=queue.name)
    message = await queue.get(timeout=10, fail=True)
    assert message is not None
    await message.ack()
    return message.body


async def test_the_queues_stay_unbounded_after_a_reconnect(amqp_url: str) -> None:
    if not have_rabbitmqctl():
        services.missing("rabbitmqctl (to close this process's broker connection)")
    connection = await broker.connect(fast_reconnect(amqp_url))
    try:
        channel = await broker.open_channel(connection)
        plain = await connection.channel()  # what aiormq makes on its own
        assert (await plain.get_underlay_channel()).frames.maxsize == 10
        await plain.close()
        assert await _limits(connection, channel) == [0, 0]
        assert await _round_trip(channel) == b"ping"

        assert connection.transport is not None
        before = connection.transport.connection
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        closed = await close_broker_connections([os.getpid()], FaultLog())
        assert closed >= 1
        await asyncio.wait_for(reconnected.wait(), timeout=30)

        assert connection.transport is not None
        assert connection.transport.connection is not before  # new aiormq queues
        assert await _limits(connection, channel) == [0, 0]
        assert await _round_trip(channel) == b"ping"
    finally:
        await connection.close()
