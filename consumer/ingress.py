"""The AMQP half of ingress: consume ``{ns}.ingress``, reply, ack, dead-letter.

Per message: decode (bad input is dead-lettered, answered ``rejected`` and acked, never
retried); admit through :class:`~consumer.admission.Admission` (the DB commit happens
there); publish exactly one reply to ``reply_to``; then ack.

``turn_input.submit`` is by far the most frequent message and its cost under load is the
transaction per message, so submits are admitted in batches: decoded submits wait in an
in-process :class:`SubmitQueue`, and two batch loops each take whatever is queued right
now (never waiting for a batch to fill, so latency at low load does not grow) and admit
it with one store call; then each message gets its reply and ack as before. Every other
message type is handled on its own, as it arrives. A transient failure (store
unavailable) is retried in process with backoff, then nacked with requeue; once a
message has used its deliveries (the quorum queue's ``x-delivery-count``), it is
dead-lettered here with the reason attached instead of being requeued again. The queue's
own ``x-delivery-limit`` is only the backstop (its dead letters carry no reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from structlog.contextvars import bound_contextvars

from consumer import wire
from consumer.admission import Admission, SubmitOutcome
from consumer.observability.logs import get_logger
from consumer.observability.metrics import ADMISSIONS, DEAD_LETTERS, MESSAGES
from consumer.topology import Topology
from lash_core import jsontext
from lash_core.errors import RetryableStoreError

log = get_logger(__name__)

JSON = "application/json"
ERROR_CODE_HEADER = "x-lash-error-code"
ERROR_MESSAGE_HEADER = "x-lash-error-message"
ROUTING_KEY_HEADER = "x-lash-original-routing-key"
EXCHANGE_HEADER = "x-lash-original-exchange"


MAX_TRACKED_FAILURES = 10_000
BATCH_LOOPS = 2
"""Batch loops sharing the submit queue: while one waits on a slow batch (a lock wait),
the other keeps admitting the rest."""

T = TypeVar("T")


def failure_key(message: AbstractIncomingMessage) -> str:
    """Identifies a message across its redeliveries to this worker."""
    if message.message_id:
        return f"id:{message.message_id}"
    return "sha256:" + hashlib.sha256(message.body).hexdigest()


def delivery_count(message: AbstractIncomingMessage) -> int:
    """How many times the broker delivered this message before (quorum queues count)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True, slots=True)
class PendingSubmit:
    """A decoded submit waiting for admission, with the delivery to answer and ack."""

    message: AbstractIncomingMessage
    submit: wire.SubmitMessage


class SubmitQueue:
    """Decoded submits in delivery order, taken in batches by the batch loops.

    A session's inputs must be admitted in delivery order. Within one batch the store
    keeps the order given; across batches, a session with inputs in a batch in flight is
    *busy*: :meth:`take` leaves its later inputs queued (and keeps their order) until that
    batch is :meth:`done`, so two loops never admit one session's inputs concurrently,
    while other sessions' inputs still go ahead.
    """

    def __init__(self) -> None:
        self._items: deque[PendingSubmit] = deque()
        self._busy: Counter[str] = Counter()
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def put(self, item: PendingSubmit) -> None:
        self._items.append(item)
        self._idle.clear()
        self._wakeup.set()

    def take(self, limit: int) -> list[PendingSubmit]:
        """Up to ``limit`` queued submits, oldest first, skipping busy sessions."""
        taken: list[PendingSubmit] = []
        kept: deque[PendingSubmit] = deque()
        held: set[str] = set()
        while self._items and len(taken) < limit:
            item = self._items.popleft()
            session_id = item.submit.session_id
            if session_id in held or self._busy[session_id]:
                held.add(session_id)  # its later inputs stay behind it
                kept.append(item)
            else:
                taken.append(item)
        kept.extend(self._items)
        self._items = kept
        if taken:
            self._in_flight += 1
            for item in taken:
                self._busy[item.submit.session_id] += 1
        return taken

    def done(self, batch: Sequence[PendingSubmit]) -> None:
        """A batch taken by :meth:`take` is answered: its sessions may go ahead."""
        for item in batch:
            self._busy[item.submit.session_id] -= 1
            if not self._busy[item.submit.session_id]:
                del self._busy[item.submit.session_id]
        self._in_flight -= 1
        self._settle()
        self._wakeup.set()

    def clear(self) -> list[PendingSubmit]:
        """Remove and return every queued (not taken) submit."""
        items = list(self._items)
        self._items.clear()
        self._settle()
        return items

    async def wait(self) -> None:
        """Until something may have changed (an item queued, a batch done, a wake-up).

        Callers check, then wait, with no ``await`` in between, so no wake-up is lost.
        """
        self._wakeup.clear()
        await self._wakeup.wait()

    def wake(self) -> None:
        self._wakeup.set()

    async def idle(self) -> None:
        """Until nothing is queued and no batch is in flight."""
        await self._idle.wait()

    def _settle(self) -> None:
        if not self._items and not self._in_flight:
            self._idle.set()


class IngressConsumer:
    """Consumes ``{ns}.ingress`` on its own channel; publishes on a confirm channel.

    ``max_batch`` bounds how many submits one store call admits; pass the channel's
    prefetch (more can never be waiting).
    """

    def __init__(
        self,
        admission: Admission,
        topology: Topology,
        consume_channel: AbstractChannel,
        publish_channel: AbstractChannel,
        *,
        max_message_bytes: int,
        max_deliveries: int,
        retry_budget_s: float = 5.0,
        max_batch: int = 32,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._admission = admission
        self._topology = topology
        self._consume_channel = consume_channel
        self._publish = publish_channel
        self._max_bytes = max_message_bytes
        self._max_deliveries = max_deliveries
        self._retry_budget_s = retry_budget_s
        self._on_error = on_error
        self._tag: str | None = None
        self._queue: AbstractQueue | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._closed = False
        self._failures: OrderedDict[str, int] = OrderedDict()
        self._max_batch = max_batch
        self._submits = SubmitQueue()
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # The batch loops run before the first delivery can arrive.
        self._loops = [
            asyncio.create_task(self._batch_loop(), name=f"ingress-batch-{n}")
            for n in range(BATCH_LOOPS)
        ]
        # ``ensure=True``: a passive declare, which on a robust channel returns the queue
        # ``topology.declare`` registered there, so its consumer is restored after a
        # reconnect. (``ensure=False`` makes an unregistered queue object: after the
        # broker dropped the connection, the worker came back with no consumer at all.)
        self._queue = await self._consume_channel.get_queue(
            self._topology.names.ingress, ensure=True
        )
        self._tag = await self._queue.consume(self._on_message, no_ack=False)

    async def consuming(self) -> bool:
        """Whether the broker delivers to this worker's ingress consumer right now.

        Readiness asks this, not just "is the connection open": after a dropped
        connection the channel may be back without the consumer (restored only for
        queues the robust channel registered), and a worker in that state would never
        take input again while still looking healthy. It is false while the channel is
        down or being restored, and after :meth:`stop_consuming`.
        """
        if self._tag is None or self._stopping or self._consume_channel.is_closed:
            return False
        try:
            channel = await self._consume_channel.get_underlay_channel()
        except aiormq.exceptions.AMQPError:  # not opened (yet, or any more)
            return False
        return isinstance(channel, aiormq.Channel) and self._tag in channel.consumers

    async def stop_consuming(self) -> None:
        """Stop taking new messages; in-flight ones finish (see :meth:`drain`)."""
        self._stopping = True
        if self._tag is not None and self._queue is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
            self._tag = None

    async def drain(self, timeout_s: float) -> None:
        """Wait for in-flight messages and queued or in-flight batches (all are short).

        Call after :meth:`stop_consuming`. Submits still queued when ``timeout_s`` runs
        out are nacked with requeue (another worker admits them); a batch still in flight
        finishes on its own and acks only after its commit. Either way nothing is acked
        uncommitted, and whatever stays unacked returns to the queue when the channel
        closes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._submits.idle(), max(deadline - loop.time(), 0))
        self._closed = True
        self._submits.wake()  # idle loops exit; a loop with a batch finishes it first
        for pending in self._submits.clear():
            log.warning("ingress_requeue_on_shutdown", message_id=pending.message.message_id)
            with contextlib.suppress(Exception):
                await pending.message.nack(requeue=True)
        if self._loops:
            await asyncio.wait(self._loops, timeout=max(deadline - loop.time(), 0.1))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Decoding and queueing happen before the first ``await``: deliveries reach this
        # callback in order, so the submit queue holds them in delivery order.
        decoded = self._decode(message)
        if isinstance(decoded, wire.SubmitMessage) and not self._closed:
            self._submits.put(PendingSubmit(message, decoded))
            return
        if isinstance(decoded, wire.SubmitMessage):  # arrived after drain: leave it queued
            work: Awaitable[None] = message.nack(requeue=True)
        else:
            work = self._handle(message, decoded)
        task = asyncio.create_task(self._guarded(message, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _decode(self, message: AbstractIncomingMessage) -> wire.ProducerMessage | wire.BadInput:
        """The message, or why it is bad input (counted in ``lash_messages_total`` here)."""
        try:
            decoded = wire.decode_message(message.body, self._max_bytes)
            if isinstance(decoded, wire.SessionReadMessage) and not message.reply_to:
                raise wire.BadInput(
                    "missing_reply_to",
                    "session.read needs the AMQP reply_to property",
                    session_id=decoded.session_id,
                    message_type=decoded.type,
                )
        except wire.BadInput as bad:
            MESSAGES.labels(type="invalid").inc()
            return bad
        MESSAGES.labels(type=decoded.type).inc()
        return decoded

    # ------------------------------------------------------------------ one message

    async def _guarded(self, message: AbstractIncomingMessage, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as exc:  # never let one message crash the worker
            log.exception("ingress_message_failed", message_id=message.message_id)
            if self._on_error is not None:
                self._on_error(exc)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)

    async def _handle(
        self, message: AbstractIncomingMessage, decoded: wire.ProducerMessage | wire.BadInput
    ) -> None:
        if isinstance(decoded, wire.BadInput):
            await self._reject(message, decoded)
            return
        with bound_contextvars(session_id=decoded.session_id, message_type=decoded.type):
            try:
                reply = await self._retrying(
                    lambda: self._admission.handle(decoded, message.message_id)
                )
            except wire.BadInput as bad:
                await self._reject(message, bad)
                return
            except Exception as exc:
                await self._failed(message, decoded, exc)
                return
            await self._answer(message, reply)

    async def _answer(self, message: AbstractIncomingMessage, reply: wire.Reply) -> None:
        """Reply, then ack: the request's admission is committed."""
        await self._reply(message, reply)
        await message.ack()
        if self._failures:
            self._failures.pop(failure_key(message), None)

    # ------------------------------------------------------------------ batched submits

    async def _batch_loop(self) -> None:
        """Admit whatever submits are queued, a batch at a time, until drained and closed."""
        while True:
            batch = self._submits.take(self._max_batch)
            if batch:
                try:
                    await self._admit_batch(batch)
                except Exception as exc:  # a bug, not a store error: keep the loop alive
                    log.exception("ingress_batch_failed", batch_size=len(batch))
                    if self._on_error is not None:
                        self._on_error(exc)
                    for pending in batch:
                        with contextlib.suppress(Exception):
                            await pending.message.nack(requeue=True)
                finally:
                    self._submits.done(batch)
                continue
            if self._closed:
                return
            await self._submits.wait()

    async def _admit_batch(self, batch: Sequence[PendingSubmit]) -> None:
        """One store call for the batch; then each message's reply and ack, as if alone."""
        items = [(pending.submit, pending.message.message_id) for pending in batch]
        try:
            outcomes = await self._retrying(lambda: self._admission.submit_many(items))
        except RetryableStoreError as exc:  # the store, not a message: all fail alike
            await self._each(batch, [self._failed(p.message, p.submit, exc) for p in batch])
            return
        except Exception as exc:
            if len(batch) == 1:
                await self._each(batch, [self._failed(batch[0].message, batch[0].submit, exc)])
                return
            # Possibly one poison message: admit each alone (in order), so only it fails
            # and its batch-mates are not requeued towards their delivery limit with it.
            log.warning(
                "ingress_batch_isolating",
                batch_size=len(batch),
                error=f"{type(exc).__name__}: {exc}",
            )
            for pending in batch:
                await self._admit_batch([pending])
            return
        await self._each(
            batch, [self._settle(p, outcome) for p, outcome in zip(batch, outcomes, strict=True)]
        )

    async def _settle(self, pending: PendingSubmit, outcome: SubmitOutcome) -> None:
        if isinstance(outcome, wire.BadInput):
            await self._reject(pending.message, outcome)
        else:
            await self._answer(pending.message, outcome)

    async def _each(
        self, batch: Sequence[PendingSubmit], effects: Sequence[Awaitable[None]]
    ) -> None:
        """Run each message's effects (``effects[i]`` for ``batch[i]``), started in order.

        Replies are published in batch order and their broker confirms are awaited
        together, so a batch costs one confirm round trip rather than one per message.
        Each message's own effects stay in order (reply, then ack), and a failure of one
        only affects that message (it is nacked with requeue).
        """

        async def one(pending: PendingSubmit, effect: Awaitable[None]) -> None:
            submit = pending.submit
            with bound_contextvars(session_id=submit.session_id, message_type=submit.type):
                await self._guarded(pending.message, effect)

        await asyncio.gather(*(one(p, e) for p, e in zip(batch, effects, strict=True)))

    # ------------------------------------------------------------------ retries and failures

    async def _retrying(self, admit: Callable[[], Awaitable[T]]) -> T:
        """Admit, retrying transient store errors in process for a little while."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_budget_s
        delay = 0.05
        while True:
            try:
                return await admit()
            except RetryableStoreError as exc:
                if self._stopping or loop.time() + delay > deadline:
                    raise
                log.warning("admission_retry", error=str(exc), delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _failed(
        self, message: AbstractIncomingMessage, decoded: wire.ProducerMessage, exc: Exception
    ) -> None:
        # The broker's count is authoritative across workers; the local count covers
        # brokers that do not count requeues (it only ever raises the number).
        key = failure_key(message)
        local = self._failures.pop(key, 0) + 1
        attempts = max(delivery_count(message) + 1, local)
        if attempts < self._max_deliveries:
            self._failures[key] = local
            while len(self._failures) > MAX_TRACKED_FAILURES:
                self._failures.popitem(last=False)
        if attempts >= self._max_deliveries:
            code = "store_unavailable" if isinstance(exc, RetryableStoreError) else "poison_message"
            bad = wire.BadInput(
                code,
                f"failed {attempts} deliveries; last error: {type(exc).__name__}: {exc}",
                session_id=decoded.session_id,
                message_type=decoded.type,
            )
            log.error("ingress_poison_message", attempts=attempts, error=str(exc))
            await self._reject(message, bad)
            return
        log.warning("ingress_requeue", attempts=attempts, error=f"{type(exc).__name__}: {exc}")
        if self._on_error is not None:
            self._on_error(exc)
        await message.nack(requeue=True)

    # ------------------------------------------------------------------ replies and dead letters

    async def _reply(self, request: AbstractIncomingMessage, reply: wire.Reply) -> None:
        if not request.reply_to:
            return
        body = jsontext.dumpb(reply.to_wire())
        await self._publish.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type=JSON,
                type=reply.type,
                correlation_id=request.correlation_id or request.message_id,
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            ),
            routing_key=request.reply_to,
            mandatory=False,
        )

    async def _reject(self, message: AbstractIncomingMessage, bad: wire.BadInput) -> None:
        """Dead-letter with the reason, answer ``rejected``, then ack (in that order)."""
        headers: dict[str, Any] = dict(message.headers or {})
        headers[ERROR_CODE_HEADER] = bad.code
        headers[ERROR_MESSAGE_HEADER] = bad.message[:4096]
        headers[ROUTING_KEY_HEADER] = message.routing_key or ""
        headers[EXCHANGE_HEADER] = message.exchange or ""
        dead = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            type=message.type,
            timestamp=message.timestamp,
            app_id=message.app_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        dead_letter = await self._publish.get_exchange(
            self._topology.names.dead_letter, ensure=False
        )
        await dead_letter.publish(dead, routing_key=message.routing_key or "")
        DEAD_LETTERS.labels(code=bad.code).inc()
        ADMISSIONS.labels(status="rejected").inc()
        log.warning(
            "ingress_dead_lettered",
            code=bad.code,
            error=bad.message,
            message_id=message.message_id,
            routing_key=message.routing_key,
        )
        await self._reply(message, bad.receipt())
        await message.ack()
