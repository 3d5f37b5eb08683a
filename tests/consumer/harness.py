"""In-process building blocks for consumer tests: a broker-connected ingress over any store."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection

from consumer.admission import Admission
from consumer.ingress import IngressConsumer
from consumer.producer import Producer
from consumer.topology import Topology, declare
from lash_core.store.base import Store


@dataclass
class IngressRig:
    connection: AbstractConnection
    topology: Topology
    ingress: IngressConsumer
    producer: Producer
    kicked: list[str]


@contextlib.asynccontextmanager
async def ingress_rig(
    store: Store, amqp_url: str, namespace: str, *, max_deliveries: int = 3, max_bytes: int = 4096
) -> AsyncIterator[IngressRig]:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        consume = await connection.channel()
        await consume.set_qos(prefetch_count=8)
        publish = await connection.channel(publisher_confirms=True)
        topology = await declare(consume, namespace, max_deliveries)
        kicked: list[str] = []
        admission = Admission(store, on_work=kicked.append)
        ingress = IngressConsumer(
            admission,
            topology,
            consume,
            publish,
            max_message_bytes=max_bytes,
            max_deliveries=max_deliveries,
            retry_budget_s=0.2,
        )
        await ingress.start()
        producer = await Producer.on_connection(connection, namespace)
        try:
            yield IngressRig(connection, topology, ingress, producer, kicked)
        finally:
            await ingress.stop_consuming()
            await ingress.drain(5)
            await producer.close()
            await delete_topology(connection, namespace)
    finally:
        await connection.close()


async def delete_topology(connection: AbstractConnection, namespace: str) -> None:
    """Remove a test namespace's exchanges and queues from the shared broker."""
    channel = await connection.channel()
    try:
        for queue in (f"{namespace}.ingress", f"{namespace}.dead-letter"):
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for exchange in (
            f"{namespace}.ingress",
            f"{namespace}.dead-letter",
            f"{namespace}.observations",
        ):
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def get_dead_letters(
    connection: AbstractConnection, namespace: str, count: int, timeout_s: float = 10.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take ``count`` messages from ``{ns}.dead-letter`` (acking them), polling to a deadline."""
    channel = await connection.channel()
    out: list[aio_pika.abc.AbstractIncomingMessage] = []
    try:
        queue = await channel.get_queue(f"{namespace}.dead-letter", ensure=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(out) < count and loop.time() < deadline:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            out.append(message)
    finally:
        await channel.close()
    return out


def body(**fields: Any) -> bytes:
    return json.dumps({"protocol_version": 1, **fields}).encode()
