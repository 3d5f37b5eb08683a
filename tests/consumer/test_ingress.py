"""Every contract message type and receipt, in process, against real RabbitMQ.

The store is the in-memory reference store (admission semantics are the conformance
suite's business); these tests pin the wire behaviour: receipts, idempotency keys,
dead-lettering with reasons, and poison-message handling.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import pytest

from consumer import wire
from consumer.ingress import ERROR_CODE_HEADER, ERROR_MESSAGE_HEADER
from consumer.producer import target
from lash_core.errors import StoreUnavailable
from lash_core.inputs import TurnInputDraft
from lash_core.store.base import InputAdmission
from lash_core.store.memory import InMemoryStore
from tests import services
from tests.consumer.harness import body, get_dead_letters, ingress_rig
from tests.fault.faults import (
    FaultLog,
    close_broker_connections,
    fast_reconnect,
    have_rabbitmqctl,
)

pytestmark = [pytest.mark.rabbitmq]


async def test_submit_duplicate_conflict_and_message_id_fallback(
    amqp_url: str, namespace: str
) -> None:
    store = InMemoryStore()
    async with ingress_rig(store, amqp_url, namespace) as rig:
        p = rig.producer
        first = await p.submit("chat-1", "hello", source_key="k1")
        assert first.status == "admitted"
        assert first.type == "receipt" and first.request_type == "turn_input.submit"
        assert first.input is not None and first.input.source_key == "k1"
        assert first.input.state == "deferred_next_turn"
        assert rig.kicked == ["chat-1"]

        again = await p.submit("chat-1", "hello", source_key="k1")
        assert again.status == "duplicate"
        assert again.input is not None and again.input.input_id == first.input.input_id

        clash = await p.submit("chat-1", "something else", source_key="k1")
        assert clash.status == "conflict"
        assert clash.error is not None and clash.error.existing_input_id == first.input.input_id

        mid = uuid.uuid4().hex
        a = await p.submit("chat-1", "by message id", message_id=mid)
        b = await p.submit("chat-1", "by message id", message_id=mid)
        assert (a.status, b.status) == ("admitted", "duplicate")
        assert a.input is not None and a.input.source_key == f"amqp:{mid}"

        chosen = await p.submit("chat-1", "with id", input_id="ti_mine_1", source_key="k2")
        assert chosen.input is not None and chosen.input.input_id == "ti_mine_1"

        steer = await p.submit("chat-1", "steer", steer_turn_id="turn_not_running")
        assert steer.input is not None and steer.input.ingress.scope == "next_turn"


async def test_correlation_id_defaults_to_message_id(amqp_url: str, namespace: str) -> None:
    async with ingress_rig(InMemoryStore(), amqp_url, namespace) as rig:
        raw = body(type="turn.cancel", session_id="s")
        mid = "mid-" + uuid.uuid4().hex
        # publish_raw uses message_id as the correlation key when none is given
        reply = await rig.producer.publish_raw(raw, "turn.cancel", message_id=mid)
        assert reply is not None and reply["status"] == "no_running_turn"


async def test_cancel_and_cancel_suffix(amqp_url: str, namespace: str) -> None:
    async with ingress_rig(InMemoryStore(), amqp_url, namespace) as rig:
        p = rig.producer
        ids = []
        for n in range(4):
            r = await p.submit("s", f"m{n}", source_key=f"k{n}")
            assert r.input is not None
            ids.append(r.input.input_id)
        receipt = await p.cancel_inputs(
            "s", [target("k0", "source_key"), target(ids[1]), target("nope")]
        )
        assert receipt.status == "ok"
        assert receipt.results is not None
        assert [r.outcome for r in receipt.results] == ["cancelled", "cancelled", "not_found"]
        assert receipt.results[0].input is not None
        assert receipt.results[0].input.state == "cancelled"

        missing = await p.cancel_suffix("s", target("no-such-key", "source_key"))
        assert missing.status == "anchor_not_found"

        suffix = await p.cancel_suffix("s", target(ids[2]))
        assert suffix.status == "ok" and suffix.results is not None
        outcomes = {r.input.input_id: r.outcome for r in suffix.results if r.input}
        assert outcomes[ids[2]] == "cancelled" and outcomes[ids[3]] == "cancelled"

        read = await p.read("s", after_seq=0)
        assert read.pending_inputs == []
        assert read.events is not None
        kinds = [e.type for e in read.events]
        assert kinds.count("input.admitted") == 4 and "input.cancelled" in kinds
        assert [e.seq for e in read.events] == list(range(1, read.last_seq + 1))


async def test_turn_cancel_and_session_command(amqp_url: str, namespace: str) -> None:
    async with ingress_rig(InMemoryStore(), amqp_url, namespace) as rig:
        p = rig.producer
        none = await p.cancel_turn("s", reason="stop")
        assert none.status == "no_running_turn"
        cmd = await p.command("s", "reset_session", idempotency_key="reset-1", reason="x")
        assert cmd.status == "admitted" and cmd.command is not None
        assert cmd.command.command.kind == "reset_session"
        dup = await p.command("s", "reset_session", idempotency_key="reset-1", reason="x")
        assert dup.status == "duplicate"
        assert dup.command is not None and dup.command.batch_id == cmd.command.batch_id
        clash = await p.command("s", "refresh_tool_catalog", idempotency_key="reset-1")
        assert clash.status == "conflict"


async def test_session_read(amqp_url: str, namespace: str) -> None:
    async with ingress_rig(InMemoryStore(), amqp_url, namespace) as rig:
        p = rig.producer
        empty = await p.read("fresh")
        assert empty.type == "session.read.result"
        assert empty.last_seq == 0 and empty.running_turn_id is None and empty.events is None
        await p.submit("s", "one", source_key="a")
        read = await p.read("s", after_seq=0)
        assert read.last_seq == 1 and read.gap is False
        assert len(read.pending_inputs) == 1
        assert read.events is not None and read.events[0].type == "input.admitted"
        raw = await p.send(wire.SessionReadMessage(session_id="s"))
        assert raw is not None and "events" not in raw and raw["running_turn_id"] is None


BAD = [
    (b"\xff\xfe", "turn_input.submit", "invalid_utf8"),
    (b"{not json", "turn_input.submit", "invalid_json"),
    (b"[1, 2]", "turn_input.submit", "invalid_message"),
    (body(type="no.such.type", session_id="s"), "no.such.type", "unknown_type"),
    (
        json.dumps({"protocol_version": 2, "type": "session.read", "session_id": "s"}).encode(),
        "session.read",
        "unsupported_protocol_version",
    ),
    (body(type="turn_input.submit", session_id="s"), "turn_input.submit", "invalid_message"),
    (
        body(
            type="turn_input.submit",
            session_id="",
            input={"items": [{"type": "text", "text": "x"}]},
        ),
        "turn_input.submit",
        "invalid_message",
    ),
    (body(type="session.read", session_id="s", after_seq="3"), "session.read", "invalid_message"),
    (
        body(type="turn_input.submit", session_id="s", pad="x" * 5000),
        "turn_input.submit",
        "too_large",
    ),
]


async def test_bad_input_is_dead_lettered_with_reason_and_rejected(
    amqp_url: str, namespace: str
) -> None:
    async with ingress_rig(InMemoryStore(), amqp_url, namespace) as rig:
        for raw, key, code in BAD:
            reply = await rig.producer.publish_raw(
                raw, key, message_id=uuid.uuid4().hex, headers={"x-origin": "test"}
            )
            assert reply is not None
            assert reply["status"] == "rejected", reply
            assert reply["error"]["code"] == code, (raw[:60], reply)
        # session.read without reply_to cannot be answered: it is bad input too
        await rig.producer.publish_raw(
            body(type="session.read", session_id="s"), "session.read", reply=False
        )
        dead = await get_dead_letters(rig.connection, namespace, len(BAD) + 1)
        assert len(dead) == len(BAD) + 1
        codes = [m.headers[ERROR_CODE_HEADER] for m in dead]
        assert codes == [c for _, _, c in BAD] + ["missing_reply_to"]
        for message, (raw, _, _) in zip(dead, BAD, strict=False):
            assert message.body == raw
            assert message.headers["x-origin"] == "test"
            assert message.headers[ERROR_MESSAGE_HEADER]
        # the worker keeps serving
        ok = await rig.producer.submit("s", "still here", source_key="after-bad")
        assert ok.status == "admitted"


class FailingStore(InMemoryStore):
    """Admission always fails: with ``exc`` for submits, normally for everything else."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc
        self.calls = 0

    async def enqueue_input(self, draft: TurnInputDraft) -> InputAdmission:
        self.calls += 1
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code"),
    [(RuntimeError("boom"), "poison_message"), (StoreUnavailable("db down"), "store_unavailable")],
)
async def test_poison_message_is_dead_lettered_after_bounded_deliveries(
    amqp_url: str, namespace: str, exc: Exception, code: str
) -> None:
    store = FailingStore(exc)
    async with ingress_rig(store, amqp_url, namespace, max_deliveries=3) as rig:
        reply = await rig.producer.submit("s", "poison", source_key="p", timeout_s=30)
        assert reply.status == "rejected"
        assert reply.error is not None and reply.error.code == code
        dead = await get_dead_letters(rig.connection, namespace, 1)
        assert dead[0].headers[ERROR_CODE_HEADER] == code
        assert "boom" in str(dead[0].headers[ERROR_MESSAGE_HEADER]) or code == "store_unavailable"
        assert store.calls >= 3
        read = await rig.producer.read("s")
        assert read.last_seq == 0


async def test_consuming_reports_the_consumer_not_just_the_connection(
    amqp_url: str, namespace: str
) -> None:
    """Readiness asks :meth:`IngressConsumer.consuming`: it turns false when the channel
    has lost the consumer (the state a worker came back in after a broker drop, before
    the ingress consumed on the registered queue), though the connection stays open."""
    store = InMemoryStore()
    async with ingress_rig(store, amqp_url, namespace) as rig:
        assert await rig.ingress.consuming()
        channel = await rig.ingress._consume_channel.get_underlay_channel()
        (tag,) = channel.consumers  # type: ignore[attr-defined]
        await channel.basic_cancel(tag)
        assert not rig.connection.is_closed
        assert not await rig.ingress.consuming()
    assert not await rig.ingress.consuming()  # stopped


async def test_consuming_again_after_the_broker_drops_the_connection(
    amqp_url: str, namespace: str
) -> None:
    if not have_rabbitmqctl():
        services.missing("rabbitmqctl (to close this process's broker connection)")
    store = InMemoryStore()
    async with ingress_rig(store, fast_reconnect(amqp_url), namespace) as rig:
        assert await rig.ingress.consuming()
        assert (await rig.producer.submit("chat-1", "before")).status == "admitted"
        # aio-pika runs the reconnect callbacks once every channel is restored. Waiting
        # for them (not only for the ingress consumer, whose channel may come back
        # first) keeps teardown from closing a channel mid-restore, which fails the whole
        # restore and drops the connection again.
        restored = asyncio.Event()
        rig.connection.reconnect_callbacks.add(lambda *_: restored.set())  # type: ignore[attr-defined]
        assert await close_broker_connections([os.getpid()], FaultLog()) >= 1
        await asyncio.wait_for(restored.wait(), 30)
        assert await rig.ingress.consuming()  # the robust channel restored the consumer
        assert (await rig.producer.submit("chat-1", "after")).status == "admitted"
