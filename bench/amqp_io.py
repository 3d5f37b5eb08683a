"""The benchmark's two AMQP roles: publishing the workload and observing commits.

Both run in the benchmark process on one connection, so publish and commit timestamps
come from one monotonic clock. Publishing uses publisher confirms (a message counts as
sent only once the broker has it) and, in latency mode, a fixed schedule so the offered
load is a rate, not a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from bench.tracker import CommitTracker
from bench.workload import Submission
from consumer import broker
from consumer.outbox import Outgoing, publish_confirmed

EventHandler = Callable[[CommitTracker, dict[str, Any], float], None]

PUBLISH_BATCH = 32
"""Messages per write in a burst: like the outbox relay's batches, enough to make the
per-write cost small, few enough that the first inputs reach the broker at once."""


class Observer:
    """An exclusive queue bound to an observation exchange, feeding a :class:`CommitTracker`.

    It consumes on the channel's aiormq layer: aio-pika's consumer wraps each delivery in
    an ``IncomingMessage`` and a second task, which made the observer, standing in for UIs
    on other machines, a tenth of this machine's CPU while the pipeline ran (every input
    brings it two events or more, the baseline's one).
    """

    def __init__(
        self,
        connection: AbstractConnection,
        exchange_name: str,
        tracker: CommitTracker,
        handler: EventHandler,
    ) -> None:
        self._connection = connection
        self._exchange_name = exchange_name
        self._tracker = tracker
        self._handler = handler
        self._channel: AbstractChannel | None = None
        self.received = 0
        self.undecodable = 0

    async def start(self) -> None:
        channel = await broker.open_channel(self._connection)
        await channel.set_qos(prefetch_count=2000)
        exchange = await channel.get_exchange(self._exchange_name, ensure=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        raw = await channel.get_underlay_channel()
        await raw.basic_consume(queue.name, self._on_message, no_ack=True)
        self._channel = channel

    async def stop(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()
            self._channel = None

    async def _on_message(self, message: DeliveredMessage) -> None:
        at = time.perf_counter()
        self.received += 1
        try:
            body = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            self.undecodable += 1
            return
        if not isinstance(body, dict):
            self.undecodable += 1
            return
        properties = message.header.properties
        event_type = str(body.get("type") or properties.message_type or "?")
        self._tracker.count_event(event_type)
        durable = body.get("durable", True) is not False
        if durable and self._tracker.seen_message(properties.message_id):
            return
        self._handler(self._tracker, body, at)


async def publish_workload(
    channel: AbstractChannel,
    exchange_name: str,
    routing_key: str,
    submissions: list[Submission],
    tracker: CommitTracker,
    *,
    rate: float | None = None,
    max_in_flight: int = 256,
    batch_size: int = PUBLISH_BATCH,
) -> int:
    """Publish every submission (confirmed); at ``rate`` per second if given.

    Messages leave in batches, each one socket write whose confirmations are awaited
    together (``consumer.outbox.publish_confirmed``, the workers' own event publishing):
    a burst goes out in batches of ``batch_size``, a paced run in whatever is due at each
    tick (one message at the usual rates). One ``exchange.publish`` task per message
    cost the bench about four times the CPU, and on a machine the workers share that
    slowed the burst itself down, so a session's inputs arrived further apart the more
    workers competed with the publisher. At most ``max_in_flight // batch_size`` batches
    await their confirmations at once (``max_in_flight`` messages in a burst).

    Returns the number of messages published. The publish time of each input is taken
    just before its batch is written, on the same clock the observer stamps commits with.
    """
    exchange = await channel.get_exchange(exchange_name, ensure=True)
    batch_size = max(1, batch_size)
    slots = asyncio.Semaphore(max(1, max_in_flight // batch_size))
    errors: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()

    async def send(batch: list[Submission]) -> None:
        try:
            messages: list[Outgoing] = []
            for sub in batch:
                props = Basic.Properties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=uuid.uuid4().hex,
                    message_type=routing_key,
                )
                messages.append((sub.body, props, routing_key))
            at = time.perf_counter()
            for sub in batch:
                tracker.published(sub.input_id, at)
            outcomes = await publish_confirmed(exchange, messages)
            errors.extend(outcome for outcome in outcomes if outcome is not None)
        except BaseException as exc:
            errors.append(exc)
        finally:
            slots.release()

    loop = asyncio.get_running_loop()
    start = loop.time()
    index = 0
    while index < len(submissions) and not errors:
        end = min(index + batch_size, len(submissions))
        if rate is not None:
            delay = start + index / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # Everything due by now, the first message included.
            due = int((loop.time() - start) * rate) + 1
            end = min(end, max(due, index + 1))
        await slots.acquire()
        task = asyncio.create_task(send(submissions[index:end]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index = end
    if tasks:
        await asyncio.gather(*tasks)
    if errors:
        raise RuntimeError(f"publishing failed: {errors[0]!r}") from errors[0]
    return len(submissions)


async def queue_state(connection: AbstractConnection, name: str) -> tuple[int, int] | None:
    """``(messages, consumers)`` of a queue, or None if it does not exist (yet)."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    except (aio_pika.exceptions.ChannelClosed, aio_pika.exceptions.ChannelNotFoundEntity):
        return None
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
