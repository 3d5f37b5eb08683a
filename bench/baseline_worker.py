"""The raw baseline consumer: the least work that still keeps the admission guarantee.

It consumes the same ``turn_input.submit`` bodies as the real workers (the same prefetch
as a worker of the same concurrency, and that many concurrent handlers), commits one
``INSERT ... ON CONFLICT DO NOTHING`` per message into a table keyed like the pipeline's
inputs (``session_id``, ``source_key``), publishes a small confirmation to a fanout
exchange (with publisher confirms, as the pipeline's outbox does) and acks only after the
commit. The benchmark observes that confirmation exactly as it observes
``turn.committed``, so the two are measured the same way.

Run as a process by the benchmark: ``python -m bench.baseline_worker`` with
``BENCH_DATABASE_URL``, ``BENCH_AMQP_URL``, ``BENCH_NAMESPACE``, ``BENCH_CONCURRENCY`` and
``BENCH_PREFETCH`` (default: the concurrency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from psycopg_pool import AsyncConnectionPool

from consumer import broker

COMMITTED_TYPE = "baseline.committed"

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS bench_baseline_inputs (
    session_id text NOT NULL,
    source_key text NOT NULL,
    input_id text NOT NULL,
    body jsonb NOT NULL,
    admitted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, source_key)
)
"""

INSERT = """
INSERT INTO bench_baseline_inputs (session_id, source_key, input_id, body)
VALUES (%s, %s, %s, %s::jsonb)
ON CONFLICT DO NOTHING
"""


def ingress_name(namespace: str) -> str:
    return f"{namespace}.baseline-ingress"


def observations_name(namespace: str) -> str:
    return f"{namespace}.baseline-observations"


async def declare_topology(channel: AbstractChannel, namespace: str) -> list[str]:
    """The baseline's own exchanges and queue (shaped like the contract's ingress)."""
    ingress = await channel.declare_exchange(
        ingress_name(namespace), aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        ingress_name(namespace), durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(ingress, routing_key="#")
    await channel.declare_exchange(
        observations_name(namespace), aio_pika.ExchangeType.FANOUT, durable=True
    )
    return [ingress_name(namespace), observations_name(namespace)]


async def serve(
    database_url: str, amqp_url: str, namespace: str, concurrency: int, prefetch: int
) -> None:
    """Consume until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    pool = AsyncConnectionPool(
        database_url,
        min_size=concurrency,
        max_size=concurrency,
        kwargs={"autocommit": True},
        open=False,
    )
    await pool.open(wait=True)
    connection = await broker.connect_plain(amqp_url)
    try:
        consume_channel = await broker.open_channel(connection)
        await consume_channel.set_qos(prefetch_count=prefetch)
        publish_channel = await broker.open_channel(connection)
        observations = await publish_channel.get_exchange(observations_name(namespace))
        queue = await consume_channel.get_queue(ingress_name(namespace))
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def handle_forever() -> None:
            while True:
                message = await inbox.get()
                try:
                    body = json.loads(message.body)
                    session_id = str(body["session_id"])
                    source_key = str(body["source_key"])
                    input_id = str(body["input_id"])
                except (ValueError, KeyError, TypeError):
                    await message.reject(requeue=False)
                    continue
                async with pool.connection() as conn:
                    await conn.execute(
                        INSERT, (session_id, source_key, input_id, message.body.decode())
                    )
                confirmation = json.dumps(
                    {
                        "protocol_version": 1,
                        "type": COMMITTED_TYPE,
                        "session_id": session_id,
                        "input_ids": [input_id],
                    }
                ).encode()
                await observations.publish(
                    aio_pika.Message(
                        confirmation,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=f"{session_id}:{source_key}",
                        type=COMMITTED_TYPE,
                    ),
                    routing_key="",
                )
                await message.ack()

        handlers = [asyncio.create_task(handle_forever()) for _ in range(concurrency)]
        await queue.consume(inbox.put)
        await stop.wait()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
        await pool.close()


def main() -> None:
    concurrency = int(os.environ.get("BENCH_CONCURRENCY", "16"))
    settings = (
        os.environ["BENCH_DATABASE_URL"],
        os.environ["BENCH_AMQP_URL"],
        os.environ["BENCH_NAMESPACE"],
        concurrency,
        int(os.environ.get("BENCH_PREFETCH", str(concurrency))),
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(*settings))
    else:
        uvloop.run(serve(*settings))


if __name__ == "__main__":
    main()
