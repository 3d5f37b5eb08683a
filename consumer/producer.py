"""The producer helper: publish contract messages and await their receipts.

For Python producers, the CLI and the tests::

    async with await Producer.connect("amqp://guest:guest@127.0.0.1:5672/", "lash") as p:
        receipt = await p.submit("chat-42", "Summarise the thread", source_key="host:msg-7")
        assert receipt.status in {"admitted", "duplicate"}
        async with p.observe("chat-42") as events:
            event = await events.next(timeout_s=30)

:meth:`Producer.connect` declares the topology first (unless it exists), so a message
published before any worker has started waits in ``{ns}.ingress``. Every publish uses
publisher confirms and is persistent; every request carries ``reply_to`` (an exclusive
reply queue of this producer) and a ``correlation_id``, and awaits exactly one reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from consumer import broker, wire
from consumer.topology import Names, declare_compatible
from lash_core.commands import RefreshToolCatalog, ResetSession, SessionCommand
from lash_core.inputs import (
    ActiveTurnIngress,
    CancelTarget,
    Ingress,
    InputIdTarget,
    NextTurnIngress,
    SourceKeyTarget,
    TextItem,
    TurnInput,
)

JSON = "application/json"


class ReplyTimeout(TimeoutError):
    """No receipt arrived in time (no worker running, or the broker lost the reply)."""


def target(value: str, kind: str = "input_id") -> CancelTarget:
    """A cancel target by ``input_id`` (default) or ``source_key``."""
    if kind == "source_key":
        return SourceKeyTarget(value=value)
    if kind == "input_id":
        return InputIdTarget(value=value)
    raise ValueError(f"unknown target kind {kind!r}; expected input_id or source_key")


class Observer:
    """Observation events from ``{ns}.observations`` on an exclusive queue of this observer.

    Optionally filtered by session. Events arrive as parsed wire bodies (``dict``); use
    :func:`consumer.wire.parse_observation` for typed access.
    """

    def __init__(self, queue: AbstractQueue, session_id: str | None) -> None:
        self._queue = queue
        self._session_id = session_id
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tag: str | None = None
        self.envelopes: list[dict[str, Any]] = []
        """AMQP properties of every message received (``message_id``, ``type``, headers)."""

    async def _start(self) -> None:
        self._tag = await self._queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            body = json.loads(message.body)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if self._session_id is not None and body.get("session_id") != self._session_id:
            return
        self.envelopes.append(
            {
                "message_id": message.message_id,
                "type": message.type,
                "headers": dict(message.headers or {}),
                "body": body,
            }
        )
        self._inbox.put_nowait(body)

    async def next(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The next event; raises :class:`TimeoutError` after ``timeout_s`` seconds."""
        return await asyncio.wait_for(self._inbox.get(), timeout_s)

    def pending(self) -> list[dict[str, Any]]:
        """Every event received and not yet taken, without waiting."""
        out = []
        while not self._inbox.empty():
            out.append(self._inbox.get_nowait())
        return out

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self._inbox.get()

    async def _stop(self) -> None:
        if self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)


class Producer:
    """A connection to the broker that publishes to ``{ns}.ingress`` and collects replies."""

    def __init__(self, connection: AbstractConnection, namespace: str, *, owns: bool) -> None:
        self.names = Names(namespace)
        self._connection = connection
        self._owns = owns
        self._channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}

    @classmethod
    async def connect(
        cls, amqp_url: str, namespace: str = "lash", *, max_deliveries: int = 5
    ) -> Producer:
        """Connect, declare the topology if it is missing, and open a reply queue."""
        connection = await broker.connect(amqp_url)
        producer = cls(connection, namespace, owns=True)
        try:
            await producer._open(max_deliveries)
        except BaseException:
            await connection.close()
            raise
        return producer

    @classmethod
    async def on_connection(
        cls, connection: AbstractConnection, namespace: str, *, max_deliveries: int = 5
    ) -> Producer:
        """A producer sharing an existing connection (closing it leaves the connection)."""
        producer = cls(connection, namespace, owns=False)
        await producer._open(max_deliveries)
        return producer

    async def _open(self, max_deliveries: int) -> None:
        await declare_compatible(self._connection, self.names.namespace, max_deliveries)
        self._channel = await broker.open_channel(self._connection)
        self._reply_queue = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
        await self._reply_queue.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting.clear()
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()
        if self._owns:
            await self._connection.close()

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connection(self) -> AbstractConnection:
        return self._connection

    @property
    def channel(self) -> AbstractChannel:
        if self._channel is None:
            raise RuntimeError("producer is not connected")
        return self._channel

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._waiting.pop(message.correlation_id or "", None)
        if fut is None or fut.done():
            return
        try:
            body = json.loads(message.body)
        except ValueError as exc:
            fut.set_exception(exc)
            return
        fut.set_result(body)

    # ------------------------------------------------------------------ publishing

    async def publish_raw(
        self,
        body: bytes,
        routing_key: str,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
        reply: bool = True,
        timeout_s: float = 30.0,
    ) -> dict[str, Any] | None:
        """Publish any bytes to ``{ns}.ingress`` (also malformed ones, for tests and tools).

        With ``reply``, waits for the one reply and returns its parsed body.
        """
        assert self._reply_queue is not None
        correlation = correlation_id or message_id or uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] | None = None
        if reply:
            fut = asyncio.get_running_loop().create_future()
            self._waiting[correlation] = fut
        message = aio_pika.Message(
            body,
            content_type=JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=correlation if reply else correlation_id,
            reply_to=self._reply_queue.name if reply else None,
            headers=dict(headers or {}),
        )
        exchange = await self.channel.get_exchange(self.names.ingress, ensure=False)
        try:
            await exchange.publish(message, routing_key=routing_key)
        except BaseException:
            self._waiting.pop(correlation, None)
            raise
        if fut is None:
            return None
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise ReplyTimeout(
                f"no reply to {routing_key} {correlation} within {timeout_s}s"
            ) from None
        finally:
            self._waiting.pop(correlation, None)

    async def send(
        self,
        message: wire.ProducerMessage,
        *,
        message_id: str | None = None,
        reply: bool = True,
        timeout_s: float = 30.0,
    ) -> dict[str, Any] | None:
        """Publish a typed message (routing key = its ``type``); return the raw reply."""
        body = json.dumps(message.model_dump(mode="json", exclude_none=True)).encode()
        return await self.publish_raw(
            body,
            message.type,
            message_id=message_id or uuid.uuid4().hex,
            reply=reply,
            timeout_s=timeout_s,
        )

    async def request(
        self,
        message: wire.ProducerMessage,
        *,
        message_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> wire.Receipt:
        reply = await self.send(message, message_id=message_id, timeout_s=timeout_s)
        assert reply is not None
        return wire.Receipt.model_validate(reply)

    # ------------------------------------------------------------------ conveniences

    async def submit(
        self,
        session_id: str,
        content: str | TurnInput,
        *,
        source_key: str | None = None,
        input_id: str | None = None,
        ingress: Ingress | None = None,
        steer_turn_id: str | None = None,
        message_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> wire.Receipt:
        """Submit one input. ``steer_turn_id`` is shorthand for active-turn ingress."""
        turn_input = (
            content if isinstance(content, TurnInput) else TurnInput(items=[TextItem(text=content)])
        )
        if ingress is None:
            ingress = (
                ActiveTurnIngress(turn_id=steer_turn_id) if steer_turn_id else NextTurnIngress()
            )
        message = wire.SubmitMessage(
            session_id=session_id,
            source_key=source_key,
            input_id=input_id,
            ingress=ingress,
            input=turn_input,
        )
        return await self.request(message, message_id=message_id, timeout_s=timeout_s)

    async def cancel_inputs(
        self, session_id: str, targets: Sequence[CancelTarget], *, timeout_s: float = 30.0
    ) -> wire.Receipt:
        message = wire.TurnInputCancelMessage(session_id=session_id, targets=list(targets))
        return await self.request(message, timeout_s=timeout_s)

    async def cancel_suffix(
        self, session_id: str, anchor: CancelTarget, *, timeout_s: float = 30.0
    ) -> wire.Receipt:
        message = wire.TurnInputCancelSuffixMessage(session_id=session_id, anchor=anchor)
        return await self.request(message, timeout_s=timeout_s)

    async def cancel_turn(
        self,
        session_id: str,
        turn_id: str | None = None,
        reason: str | None = None,
        *,
        timeout_s: float = 30.0,
    ) -> wire.Receipt:
        message = wire.TurnCancelMessage(session_id=session_id, turn_id=turn_id, reason=reason)
        return await self.request(message, timeout_s=timeout_s)

    async def command(
        self,
        session_id: str,
        command: SessionCommand | str,
        *,
        idempotency_key: str | None = None,
        reason: str | None = None,
        timeout_s: float = 30.0,
    ) -> wire.Receipt:
        """Queue ``reset_session`` or ``refresh_tool_catalog`` (name or model)."""
        if isinstance(command, str):
            if command == "reset_session":
                command = ResetSession(reason=reason)
            elif command == "refresh_tool_catalog":
                command = RefreshToolCatalog(reason=reason)
            else:
                raise ValueError(f"unknown session command {command!r}")
        message = wire.SessionCommandMessage(
            session_id=session_id, command=command, idempotency_key=idempotency_key
        )
        return await self.request(message, timeout_s=timeout_s)

    async def read(
        self, session_id: str, after_seq: int | None = None, *, timeout_s: float = 30.0
    ) -> wire.SessionReadResult:
        message = wire.SessionReadMessage(session_id=session_id, after_seq=after_seq)
        reply = await self.send(message, timeout_s=timeout_s)
        assert reply is not None
        if reply.get("type") != "session.read.result":
            raise RuntimeError(f"session.read was answered with {reply}")
        return wire.SessionReadResult.model_validate(reply)

    # ------------------------------------------------------------------ observing

    @contextlib.asynccontextmanager
    async def observe(self, session_id: str | None = None) -> AsyncIterator[Observer]:
        """Bind an exclusive queue to ``{ns}.observations`` for the duration of the block.

        Only events published after the queue is bound arrive; recover earlier ones with
        :meth:`read` (``after_seq``).
        """
        channel = await broker.open_channel(self._connection)
        try:
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await queue.bind(self.names.observations)
            observer = Observer(queue, session_id)
            await observer._start()
            try:
                yield observer
            finally:
                await observer._stop()
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
