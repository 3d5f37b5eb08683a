"""Reading and requeueing ``{ns}.dead-letter`` (the CLI's ``dead-letters`` command).

Listing takes messages without acking them and closes the channel afterwards, so they
return to the queue untouched. Requeueing republishes each body with its original
properties and headers (minus the dead-letter reason and broker bookkeeping) to
``{ns}.ingress`` with its original routing key, with publisher confirms, and only then
acks it off the dead-letter queue: a crash in between duplicates, never loses (admission
is idempotent by source key / message id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aio_pika

from consumer.ingress import (
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    EXCHANGE_HEADER,
    ROUTING_KEY_HEADER,
)
from consumer.settings import Settings
from consumer.topology import Names, declare_compatible

DROPPED_ON_REQUEUE = {
    ERROR_CODE_HEADER,
    ERROR_MESSAGE_HEADER,
    ROUTING_KEY_HEADER,
    EXCHANGE_HEADER,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
}


@dataclass
class DeadLetter:
    message_id: str | None
    routing_key: str | None
    error_code: str
    error_message: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)

    def preview(self, limit: int = 160) -> str:
        text = self.body.decode("utf-8", errors="replace")
        return text if len(text) <= limit else text[:limit] + "..."

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "routing_key": self.routing_key,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "body": self.body.decode("utf-8", errors="replace"),
            "headers": {k: str(v) for k, v in self.headers.items()},
        }


def _original_routing_key(message: aio_pika.abc.AbstractIncomingMessage) -> str:
    headers = message.headers or {}
    key = headers.get(ROUTING_KEY_HEADER)
    if isinstance(key, bytes):
        key = key.decode()
    if isinstance(key, str) and key:
        return key
    return message.routing_key or ""


def _reason(message: aio_pika.abc.AbstractIncomingMessage) -> tuple[str, str]:
    headers = message.headers or {}
    code = headers.get(ERROR_CODE_HEADER)
    text = headers.get(ERROR_MESSAGE_HEADER)
    if code is None:
        # Dead-lettered by the queue's delivery limit (the backstop): no reason attached.
        return "delivery_limit", "the ingress queue's x-delivery-limit was reached"
    return str(code), str(text or "")


async def list_dead_letters(settings: Settings, limit: int) -> list[DeadLetter]:
    names = Names(settings.namespace)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    try:
        await declare_compatible(connection, settings.namespace, settings.max_deliveries)
        channel = await connection.channel()
        queue = await channel.get_queue(names.dead_letter, ensure=False)
        out: list[DeadLetter] = []
        while len(out) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            code, text = _reason(message)
            out.append(
                DeadLetter(
                    message_id=message.message_id,
                    routing_key=_original_routing_key(message),
                    error_code=code,
                    error_message=text,
                    body=message.body,
                    headers=dict(message.headers or {}),
                )
            )
        await channel.close()  # unacked: every message returns to the queue
        return out
    finally:
        await connection.close()


async def requeue_dead_letters(settings: Settings, limit: int) -> int:
    names = Names(settings.namespace)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    try:
        await declare_compatible(connection, settings.namespace, settings.max_deliveries)
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.get_queue(names.dead_letter, ensure=False)
        ingress = await channel.get_exchange(names.ingress, ensure=False)
        count = 0
        while count < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            headers = {
                k: v for k, v in (message.headers or {}).items() if k not in DROPPED_ON_REQUEUE
            }
            await ingress.publish(
                aio_pika.Message(
                    message.body,
                    headers=headers,
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    reply_to=message.reply_to,
                    type=message.type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=_original_routing_key(message),
            )
            await message.ack()
            count += 1
        await channel.close()
        return count
    finally:
        await connection.close()
