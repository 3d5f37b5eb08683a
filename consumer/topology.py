"""The broker topology of CONTRACT.md, declared idempotently by workers and producers.

| name                | kind                                    |
|---------------------|-----------------------------------------|
| ``{ns}.ingress``     | topic exchange + quorum queue bound ``#`` |
| ``{ns}.dead-letter`` | fanout exchange + quorum queue           |
| ``{ns}.observations``| fanout exchange                          |

The ingress queue dead-letters into ``{ns}.dead-letter`` after ``x-delivery-limit``
redeliveries: the backstop behind the worker's own poison-message check, which
dead-letters earlier with the reason attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue


@dataclass(frozen=True)
class Names:
    """Exchange and queue names of one namespace."""

    namespace: str

    @property
    def ingress(self) -> str:
        return f"{self.namespace}.ingress"

    @property
    def dead_letter(self) -> str:
        return f"{self.namespace}.dead-letter"

    @property
    def observations(self) -> str:
        return f"{self.namespace}.observations"


@dataclass(frozen=True)
class Topology:
    names: Names
    ingress_exchange: AbstractExchange
    ingress_queue: AbstractQueue
    dead_letter_exchange: AbstractExchange
    dead_letter_queue: AbstractQueue
    observations_exchange: AbstractExchange


def ingress_queue_arguments(names: Names, max_deliveries: int) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": max_deliveries,
        "x-dead-letter-exchange": names.dead_letter,
    }


DEAD_LETTER_QUEUE_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


async def declare(channel: AbstractChannel, namespace: str, max_deliveries: int) -> Topology:
    """Declare every exchange, queue and binding; safe to repeat from any process.

    A queue that already exists with other arguments (another ``LASH_MAX_DELIVERIES``)
    fails loudly with PRECONDITION_FAILED rather than running with mixed settings.
    """
    names = Names(namespace)
    dead_letter_exchange = await channel.declare_exchange(
        names.dead_letter, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_letter_queue = await channel.declare_queue(
        names.dead_letter, durable=True, arguments=DEAD_LETTER_QUEUE_ARGUMENTS
    )
    await dead_letter_queue.bind(dead_letter_exchange)
    ingress_exchange = await channel.declare_exchange(
        names.ingress, aio_pika.ExchangeType.TOPIC, durable=True
    )
    ingress_queue = await channel.declare_queue(
        names.ingress, durable=True, arguments=ingress_queue_arguments(names, max_deliveries)
    )
    await ingress_queue.bind(ingress_exchange, routing_key="#")
    observations_exchange = await channel.declare_exchange(
        names.observations, aio_pika.ExchangeType.FANOUT, durable=True
    )
    return Topology(
        names=names,
        ingress_exchange=ingress_exchange,
        ingress_queue=ingress_queue,
        dead_letter_exchange=dead_letter_exchange,
        dead_letter_queue=dead_letter_queue,
        observations_exchange=observations_exchange,
    )


async def declare_compatible(
    connection: aio_pika.abc.AbstractConnection, namespace: str, max_deliveries: int
) -> None:
    """Declare the topology unless it already exists (producers and tools).

    A producer need not know the workers' ``LASH_MAX_DELIVERIES``: when the ingress queue
    exists (checked passively on a throwaway channel, which a missing queue closes), its
    arguments are left as the workers declared them.
    """
    names = Names(namespace)
    probe = await connection.channel()
    try:
        await probe.declare_queue(names.ingress, passive=True)
        await probe.declare_queue(names.dead_letter, passive=True)
        await probe.declare_exchange(names.observations, passive=True)
        return
    except aio_pika.exceptions.ChannelClosed:
        pass
    finally:
        if not probe.is_closed:
            await probe.close()
    channel = await connection.channel()
    try:
        await declare(channel, namespace, max_deliveries)
    finally:
        await channel.close()
