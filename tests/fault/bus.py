"""The test's side of the broker: publish producer messages, collect receipts, observe
events and dead letters.

Deliberately written against the wire contract (CONTRACT.md) with plain aio-pika rather
than the project's producer helper, so the fault tests check the contract a producer in
another language would rely on. The harness connection is never a target of fault
injection (faults close only the workers' connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)


@dataclass
class Observed:
    """One observation event as received from ``{ns}.observations``."""

    session_id: str
    seq: int
    type: str
    message_id: str | None
    body: dict[str, Any]
    received_at: float


@dataclass
class DeadLetter:
    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    correlation_id: str | None


@dataclass
class Receipt:
    correlation_id: str
    body: dict[str, Any]


@dataclass
class Bus:
    """One harness connection with publisher confirms and the collectors hanging off it."""

    amqp_url: str
    namespace: str
    connection: AbstractRobustConnection | None = None
    channel: AbstractChannel | None = None
    observed: list[Observed] = field(default_factory=list)
    receipts: dict[str, list[Receipt]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: list[DeadLetter] = field(default_factory=list)
    reply_queue: str = ""
    published: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ingress(self) -> str:
        return f"{self.namespace}.ingress"

    async def start(self) -> None:
        self.connection = await aio_pika.connect_robust(
            self.amqp_url, client_properties={"connection_name": f"fault-harness-{self.namespace}"}
        )
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=500)
        obs_ex = await self.channel.declare_exchange(
            f"{self.namespace}.observations", aio_pika.ExchangeType.FANOUT, durable=True
        )
        obs_q = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await obs_q.bind(obs_ex)
        await obs_q.consume(self._on_event, no_ack=True)
        reply_q = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        self.reply_queue = reply_q.name
        await reply_q.consume(self._on_receipt, no_ack=True)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def delete_topology(self) -> None:
        """Remove this namespace's queues and exchanges from the shared broker."""
        assert self.connection is not None
        ch = await self.connection.channel()
        ns = self.namespace
        for queue in (f"{ns}.ingress", f"{ns}.dead-letter"):
            try:
                await ch.queue_delete(queue)
            except Exception:
                ch = await self.connection.channel()
        for exchange in (f"{ns}.ingress", f"{ns}.dead-letter", f"{ns}.observations"):
            try:
                await ch.exchange_delete(exchange)
            except Exception:
                ch = await self.connection.channel()
        await ch.close()

    # ------------------------------------------------------------------ collectors

    async def _on_event(self, msg: AbstractIncomingMessage) -> None:
        try:
            body = json.loads(msg.body)
        except ValueError:
            return
        if not isinstance(body, dict) or body.get("durable") is False:
            return
        if body.get("type") == "turn.activity":
            return
        self.observed.append(
            Observed(
                session_id=str(body.get("session_id")),
                seq=int(body.get("seq", -1)),
                type=str(body.get("type")),
                message_id=msg.message_id,
                body=body,
                received_at=time.time(),
            )
        )
        self._changed.set()

    async def _on_receipt(self, msg: AbstractIncomingMessage) -> None:
        try:
            body = json.loads(msg.body)
        except ValueError:
            body = {"_undecodable": msg.body.decode("utf-8", "replace")}
        corr = msg.correlation_id or ""
        self.receipts[corr].append(Receipt(corr, body))
        self._changed.set()

    async def _on_dead_letter(self, msg: AbstractIncomingMessage) -> None:
        self.dead_letters.append(
            DeadLetter(
                body=msg.body,
                headers=dict(msg.headers or {}),
                message_id=msg.message_id,
                correlation_id=msg.correlation_id,
            )
        )
        self._changed.set()

    async def watch_dead_letters(self) -> AbstractQueue:
        """Consume ``{ns}.dead-letter`` (declared by the workers; passive here)."""
        assert self.connection is not None
        ch = await self.connection.channel()
        await ch.set_qos(prefetch_count=500)
        queue = await ch.get_queue(f"{self.namespace}.dead-letter", ensure=True)
        await queue.consume(self._on_dead_letter, no_ack=True)
        return queue

    async def ingress_consumers(self) -> int:
        """Consumers on ``{ns}.ingress`` (0 if it does not exist yet)."""
        assert self.connection is not None
        ch = await self.connection.channel()
        try:
            q = await ch.declare_queue(f"{self.namespace}.ingress", passive=True)
            result = q.declaration_result
            return int(result.consumer_count or 0)
        except Exception:
            return 0
        finally:
            if not ch.is_closed:
                await ch.close()

    async def wait_consumers(self, at_least: int, timeout_s: float) -> int:
        """Poll the ingress consumer count until it reaches ``at_least`` (or the deadline)."""
        deadline = time.monotonic() + timeout_s
        count = await self.ingress_consumers()
        while count < at_least and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            count = await self.ingress_consumers()
        return count

    async def wait_for(self, predicate: Any, timeout_s: float, what: str) -> None:
        """Wait until ``predicate()`` is true, woken by every received message."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))

    # ------------------------------------------------------------------ publishing

    async def publish_raw(
        self,
        body: bytes,
        routing_key: str,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply: bool = False,
        headers: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> None:
        assert self.channel is not None
        ex = await self.channel.get_exchange(self.ingress, ensure=False)
        await ex.publish(
            aio_pika.Message(
                body,
                content_type=content_type,
                message_id=message_id,
                correlation_id=correlation_id,
                reply_to=self.reply_queue if reply else None,
                headers=headers or {},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
        )
        self.published += 1

    async def submit(
        self,
        session_id: str,
        text: str,
        *,
        source_key: str | None,
        message_id: str | None = None,
        reply: bool = False,
        correlation_id: str | None = None,
    ) -> str:
        """Publish a ``turn_input.submit``; returns the correlation id used for its receipt."""
        body: dict[str, Any] = {
            "protocol_version": 1,
            "type": "turn_input.submit",
            "session_id": session_id,
            "input": {"items": [{"type": "text", "text": text}]},
        }
        if source_key is not None:
            body["source_key"] = source_key
        corr = correlation_id or uuid.uuid4().hex
        await self.publish_raw(
            json.dumps(body).encode(),
            "turn_input.submit",
            message_id=message_id or uuid.uuid4().hex,
            correlation_id=corr,
            reply=reply,
        )
        return corr

    async def session_read(
        self, session_id: str, after_seq: int | None = 0, timeout_s: float = 15.0
    ) -> dict[str, Any]:
        """``session.read`` over the wire (the recovery path an observer with a hole uses)."""
        body: dict[str, Any] = {
            "protocol_version": 1,
            "type": "session.read",
            "session_id": session_id,
        }
        if after_seq is not None:
            body["after_seq"] = after_seq
        corr = uuid.uuid4().hex
        await self.publish_raw(
            json.dumps(body).encode(), "session.read", correlation_id=corr, reply=True
        )
        await self.wait_for(lambda: bool(self.receipts.get(corr)), timeout_s, "session.read")
        return self.receipts[corr][0].body

    # ------------------------------------------------------------------ views

    def events_by_session(self) -> dict[str, list[Observed]]:
        out: dict[str, list[Observed]] = defaultdict(list)
        for ev in self.observed:
            out[ev.session_id].append(ev)
        return out
