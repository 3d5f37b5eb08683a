"""The AMQP half of ingress: consume ``{ns}.ingress``, reply, ack, dead-letter.

Per message: decode (bad input is dead-lettered, answered ``rejected`` and acked, never
retried); admit through :class:`~consumer.admission.Admission` (the DB commit happens
there); publish exactly one reply to ``reply_to``; then ack. A transient failure (store
unavailable) is retried in process with backoff, then nacked with requeue; once a
message has used its deliveries (the quorum queue's ``x-delivery-count``), it is
dead-lettered here with the reason attached instead of being requeued again. The queue's
own ``x-delivery-limit`` is only the backstop (its dead letters carry no reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from structlog.contextvars import bound_contextvars

from consumer import wire
from consumer.admission import Admission
from consumer.observability.logs import get_logger
from consumer.observability.metrics import ADMISSIONS, DEAD_LETTERS, MESSAGES
from consumer.topology import Topology
from lash_core.errors import RetryableStoreError

log = get_logger(__name__)

JSON = "application/json"
ERROR_CODE_HEADER = "x-lash-error-code"
ERROR_MESSAGE_HEADER = "x-lash-error-message"
ROUTING_KEY_HEADER = "x-lash-original-routing-key"
EXCHANGE_HEADER = "x-lash-original-exchange"


MAX_TRACKED_FAILURES = 10_000


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


class IngressConsumer:
    """Consumes ``{ns}.ingress`` on its own channel; publishes on a confirm channel."""

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
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._admission = admission
        self._topology = topology
        self._consume_channel = consume_channel
        self._publish = publish_channel
        self._max_bytes = max_message_bytes
        self._max_deliveries = max_deliveries
        self._retry_budget_s = retry_budget_s
        self._on_error = on_error
        self._tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._failures: OrderedDict[str, int] = OrderedDict()

    async def start(self) -> None:
        queue = await self._consume_channel.get_queue(self._topology.names.ingress, ensure=False)
        self._tag = await queue.consume(self._on_message, no_ack=False)

    async def stop_consuming(self) -> None:
        """Stop taking new messages; in-flight ones finish (see :meth:`drain`)."""
        self._stopping = True
        if self._tag is not None:
            queue = await self._consume_channel.get_queue(
                self._topology.names.ingress, ensure=False
            )
            with contextlib.suppress(Exception):
                await queue.cancel(self._tag)
            self._tag = None

    async def drain(self, timeout_s: float) -> None:
        """Wait for in-flight messages (they are short: one transaction each)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._process(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ one message

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle(message)
        except Exception as exc:  # never let one message crash the worker
            log.exception("ingress_message_failed", message_id=message.message_id)
            if self._on_error is not None:
                self._on_error(exc)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
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
            await self._reject(message, bad)
            return
        MESSAGES.labels(type=decoded.type).inc()
        with bound_contextvars(session_id=decoded.session_id, message_type=decoded.type):
            try:
                reply = await self._admit(decoded, message.message_id)
            except wire.BadInput as bad:
                await self._reject(message, bad)
                return
            except Exception as exc:
                await self._failed(message, decoded, exc)
                return
            await self._reply(message, reply)
            await message.ack()
            if self._failures:
                self._failures.pop(failure_key(message), None)

    async def _admit(self, decoded: wire.ProducerMessage, message_id: str | None) -> wire.Reply:
        """Admit, retrying transient store errors in process for a little while."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_budget_s
        delay = 0.05
        while True:
            try:
                return await self._admission.handle(decoded, message_id)
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
        body = json.dumps(reply.to_wire(), ensure_ascii=False).encode("utf-8")
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
