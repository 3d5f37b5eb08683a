"""Batched admission of ``turn_input.submit``: fewer store calls, same per-message effects.

The first half drives :class:`~consumer.ingress.IngressConsumer` with fake deliveries and
channels over a store that counts ``enqueue_inputs`` calls (no services needed), so the
batching itself, the per-session order across the two batch loops, retries, poison
isolation and shutdown are pinned exactly. The second half runs a real worker against
PostgreSQL and RabbitMQ with bursts published before it starts, so its first deliveries
arrive together and are admitted in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aio_pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.admission import Admission
from consumer.ingress import ERROR_CODE_HEADER, IngressConsumer
from consumer.producer import Producer
from consumer.topology import Names
from lash_core.errors import InvalidRequest, SourceKeyConflict, StoreUnavailable
from lash_core.inputs import TurnInputDraft
from lash_core.store.base import InputAdmission
from lash_core.store.memory import InMemoryStore
from tests.consumer.checks import committed_inputs, read_all_events
from tests.consumer.fleet import fleet
from tests.consumer.harness import body, get_dead_letters

# ---------------------------------------------------------------------------- fakes


@dataclass
class Effects:
    """Everything the consumer did to deliveries and the broker, in order."""

    log: list[tuple[str, str]] = field(default_factory=list)
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    dead: list[tuple[str, str]] = field(default_factory=list)

    def of(self, kind: str) -> list[str]:
        return [mid for k, mid in self.log if k == kind]


class FakeDelivery:
    """Just enough of an ``AbstractIncomingMessage`` for the ingress consumer."""

    def __init__(self, effects: Effects, raw: bytes, message_id: str, delivery_count: int = 0):
        self.effects = effects
        self.body = raw
        self.message_id = message_id
        self.correlation_id = message_id
        self.reply_to = "replies"
        self.headers: dict[str, Any] = {"x-delivery-count": delivery_count}
        self.routing_key = "turn_input.submit"
        self.exchange = "t.ingress"
        self.content_type = "application/json"
        self.content_encoding = None
        self.type = None
        self.timestamp = None
        self.app_id = None

    async def ack(self) -> None:
        self.effects.log.append(("ack", self.message_id))

    async def nack(self, requeue: bool = True) -> None:
        self.effects.log.append(("requeue" if requeue else "drop", self.message_id))


class FakeExchange:
    def __init__(self, effects: Effects, dead_letter: bool) -> None:
        self.effects = effects
        self.dead_letter = dead_letter

    async def publish(self, message: aio_pika.Message, routing_key: str, **_: Any) -> None:
        await asyncio.sleep(0)  # a confirm round trip
        if self.dead_letter:
            code = message.headers[ERROR_CODE_HEADER]
            self.effects.dead.append((str(message.message_id), str(code)))
        else:
            cid = str(message.correlation_id)
            self.effects.replies[cid] = json.loads(message.body)
            self.effects.log.append(("reply", cid))


class FakeChannel:
    def __init__(self, effects: Effects) -> None:
        self.default_exchange = FakeExchange(effects, dead_letter=False)
        self._dead = FakeExchange(effects, dead_letter=True)

    async def get_exchange(self, name: str, ensure: bool = False) -> FakeExchange:
        return self._dead

    async def get_queue(self, name: str, ensure: bool = False) -> FakeChannel:
        return self

    async def consume(self, callback: Any, no_ack: bool = False) -> str:
        return "tag"

    async def cancel(self, tag: str) -> None:
        return None


class CountingStore(InMemoryStore):
    """The in-memory store, counting ``enqueue_inputs`` calls and optionally misbehaving.

    ``gate`` (when set) holds a call until opened; ``failures`` are raised by the next
    calls, one each; a draft whose text is ``poison`` fails its whole call (before
    anything is admitted, as a one-transaction store would); a draft whose text is
    ``invalid`` is refused as malformed.
    """

    def __init__(self, *, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.batches: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.failures: list[Exception] = []

    async def enqueue_inputs(
        self, drafts: Sequence[TurnInputDraft]
    ) -> list[InputAdmission | SourceKeyConflict | InvalidRequest]:
        self.batches.append([d.source_key or "" for d in drafts])
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.failures:
            raise self.failures.pop(0)
        if any(_text(d) == "poison" for d in drafts):
            raise RuntimeError("poison")
        outcomes: list[InputAdmission | SourceKeyConflict | InvalidRequest] = []
        for draft in drafts:
            if _text(draft) == "invalid":
                outcomes.append(InvalidRequest("malformed input"))
            else:
                outcomes.extend(await super().enqueue_inputs([draft]))
        return outcomes

    def order(self, session_id: str) -> list[str]:
        """Source keys of a session's admitted inputs, in admission order."""
        records = sorted(self._read(session_id).inputs.values(), key=lambda r: r.enqueue_seq)
        return [r.source_key or "" for r in records]


def _text(draft: TurnInputDraft) -> str:
    item = draft.input.items[0]
    return str(getattr(item, "text", ""))


def submit_body(session_id: str, text: str, source_key: str) -> bytes:
    return body(
        type="turn_input.submit",
        session_id=session_id,
        source_key=source_key,
        input={"items": [{"type": "text", "text": text}]},
    )


@dataclass
class Rig:
    store: CountingStore
    ingress: IngressConsumer
    effects: Effects

    async def feed(
        self, session_id: str, text: str, key: str, *, delivery_count: int = 0
    ) -> FakeDelivery:
        delivery = FakeDelivery(
            self.effects, submit_body(session_id, text, key), key, delivery_count
        )
        await self.ingress._on_message(delivery)  # type: ignore[arg-type]
        return delivery

    async def until(self, done: Callable[[], bool], timeout_s: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done():
            assert loop.time() < deadline, f"timed out; effects: {self.effects.log}"
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def rig(
    store: CountingStore, *, max_batch: int = 8, max_deliveries: int = 5
) -> AsyncIterator[Rig]:
    effects = Effects()
    channel = FakeChannel(effects)
    ingress = IngressConsumer(
        Admission(store),
        SimpleNamespace(names=Names("t")),  # type: ignore[arg-type]
        channel,  # type: ignore[arg-type]
        channel,  # type: ignore[arg-type]
        max_message_bytes=65536,
        max_deliveries=max_deliveries,
        retry_budget_s=1.0,
        max_batch=max_batch,
    )
    await ingress.start()
    try:
        yield Rig(store, ingress, effects)
    finally:
        await ingress.stop_consuming()
        await ingress.drain(5)


# ---------------------------------------------------------------------------- unit level


async def test_a_burst_is_admitted_in_fewer_store_calls_than_messages() -> None:
    store = CountingStore(delay_s=0.01)
    async with rig(store, max_batch=8) as r:
        keys = [f"k{n}" for n in range(40)]
        for n, key in enumerate(keys):
            await r.feed(f"s{n % 10}", f"m{n}", key)  # no await yields: all queued at once
        await r.until(lambda: len(r.effects.of("ack")) == 40)
    assert sorted(r.effects.of("ack")) == sorted(keys)  # each acked exactly once
    assert r.effects.of("requeue") == []
    assert {reply["status"] for reply in r.effects.replies.values()} == {"admitted"}
    assert len(store.batches) < len(keys) / 2, store.batches
    assert max(len(b) for b in store.batches) <= 8
    for key in keys:
        assert r.effects.log.index(("reply", key)) < r.effects.log.index(("ack", key))
    for s in range(10):
        assert store.order(f"s{s}") == [f"k{n}" for n in range(s, 40, 10)]


async def test_at_low_load_a_batch_is_one_message() -> None:
    store = CountingStore()
    async with rig(store) as r:
        for n in range(3):
            await r.feed("s", f"m{n}", f"k{n}")
            await r.until(lambda n=n: len(r.effects.of("ack")) == n + 1)
    assert store.batches == [["k0"], ["k1"], ["k2"]]


async def test_a_slow_batch_neither_stalls_other_sessions_nor_reorders_its_own() -> None:
    store = CountingStore()
    gate = asyncio.Event()
    store.gate = gate
    async with rig(store) as r:
        await r.feed("slow", "a", "slow-a")
        await r.until(lambda: len(store.batches) == 1)  # one loop waits (a lock wait)
        store.gate = None  # later calls run freely; the first still waits on ``gate``
        await r.feed("slow", "b", "slow-b")
        await r.feed("fast", "x", "fast-x")
        # the other loop admits the other session; the slow session's next input waits
        await r.until(lambda: r.effects.of("ack") == ["fast-x"])
        await asyncio.sleep(0.05)
        assert store.batches == [["slow-a"], ["fast-x"]]
        gate.set()
        await r.until(lambda: len(r.effects.of("ack")) == 3)
    assert store.batches == [["slow-a"], ["fast-x"], ["slow-b"]]
    assert r.effects.of("ack") == ["fast-x", "slow-a", "slow-b"]
    assert store.order("slow") == ["slow-a", "slow-b"]


async def test_duplicates_conflicts_and_invalid_items_inside_one_batch() -> None:
    store = CountingStore()
    async with rig(store) as r:
        deliveries = [
            FakeDelivery(r.effects, submit_body("s", "one", "k1"), "m1"),
            FakeDelivery(r.effects, submit_body("s", "one", "k1"), "m2"),  # duplicate
            FakeDelivery(r.effects, submit_body("s", "other", "k1"), "m3"),  # conflict
            FakeDelivery(r.effects, submit_body("s", "invalid", "k4"), "m4"),  # store refuses
            FakeDelivery(r.effects, b"{not json", "m5"),  # never reaches the store
            FakeDelivery(r.effects, submit_body("t", "two", "k6"), "m6"),
        ]
        for delivery in deliveries:
            await r.ingress._on_message(delivery)  # type: ignore[arg-type]
        await r.until(lambda: len(r.effects.of("ack")) == 6)
    assert store.batches == [["k1", "k1", "k1", "k4", "k6"]]
    status = {mid: reply["status"] for mid, reply in r.effects.replies.items()}
    assert status == {
        "m1": "admitted",
        "m2": "duplicate",
        "m3": "conflict",
        "m4": "rejected",
        "m5": "rejected",
        "m6": "admitted",
    }
    first = r.effects.replies["m1"]["input"]["input_id"]
    assert r.effects.replies["m2"]["input"]["input_id"] == first
    assert r.effects.replies["m3"]["error"]["existing_input_id"] == first
    assert r.effects.replies["m3"]["input"]["input_id"] == first
    assert sorted(r.effects.dead) == [("m4", "invalid_request"), ("m5", "invalid_json")]


async def test_a_transient_store_error_retries_the_whole_batch() -> None:
    store = CountingStore()
    store.failures = [StoreUnavailable("db blip")]
    store.gate = asyncio.Event()
    async with rig(store) as r:
        await r.feed("s", "a", "k1")
        await r.until(lambda: len(store.batches) == 1)
        await r.feed("t", "b", "k2")
        await r.feed("s", "c", "k3")
        await r.until(lambda: len(store.batches) == 2)  # loop 2 took k2 (s is busy)
        store.gate.set()
        await r.until(lambda: len(r.effects.of("ack")) == 3)
    # the failed call was repeated with the same drafts; k3 waited for k1
    calls = Counter(tuple(b) for b in store.batches)
    assert calls in (
        Counter({("k1",): 2, ("k2",): 1, ("k3",): 1}),
        Counter({("k1",): 1, ("k2",): 2, ("k3",): 1}),
    )
    assert store.order("s") == ["k1", "k3"]
    assert r.effects.of("requeue") == []
    assert {reply["status"] for reply in r.effects.replies.values()} == {"admitted"}


async def test_an_exhausted_retry_budget_requeues_or_dead_letters_each_message() -> None:
    store = CountingStore()
    store.failures = [StoreUnavailable("db down")] * 1000
    async with rig(store, max_deliveries=5) as r:
        r.ingress._retry_budget_s = 0.15
        store.gate = asyncio.Event()
        await r.feed("s", "a", "fresh")
        await r.until(lambda: len(store.batches) == 1)
        await r.feed("s", "b", "last-try", delivery_count=4)
        await r.feed("t", "c", "other")
        store.gate.set()
        await r.until(lambda: len(r.effects.of("requeue")) + len(r.effects.of("ack")) == 3)
    assert sorted(r.effects.of("requeue")) == ["fresh", "other"]
    assert r.effects.of("ack") == ["last-try"]  # dead-lettered, answered, acked
    assert r.effects.dead == [("last-try", "store_unavailable")]
    assert r.effects.replies["last-try"]["status"] == "rejected"


async def test_a_poison_message_fails_alone() -> None:
    store = CountingStore(delay_s=0.01)
    async with rig(store) as r:
        for key, text in (("k1", "fine"), ("k2", "poison"), ("k3", "fine too")):
            await r.feed("s", text, key)
        await r.until(lambda: len(r.effects.log) >= 5)
    assert store.batches[0] == ["k1", "k2", "k3"]
    assert r.effects.of("ack") == ["k1", "k3"]
    assert r.effects.of("requeue") == ["k2"]
    assert r.effects.replies["k1"]["status"] == "admitted"
    assert r.effects.replies["k3"]["status"] == "admitted"
    assert store.order("s") == ["k1", "k3"]


async def test_drain_admits_queued_batches_before_returning() -> None:
    store = CountingStore(delay_s=0.01)
    async with rig(store, max_batch=4) as r:
        for n in range(20):
            await r.feed(f"s{n % 3}", f"m{n}", f"k{n}")
        await r.ingress.stop_consuming()
        await r.ingress.drain(5)
        assert len(r.effects.of("ack")) == 20
        assert r.effects.of("requeue") == []


async def test_drain_timeout_requeues_queued_submits_and_never_acks_uncommitted() -> None:
    store = CountingStore()
    store.gate = asyncio.Event()
    async with rig(store) as r:
        await r.feed("s", "a", "in-flight")
        await r.until(lambda: len(store.batches) == 1)
        await r.feed("s", "b", "queued")  # its session is busy: it stays queued
        await r.ingress.stop_consuming()
        await r.ingress.drain(0.1)
        assert r.effects.of("requeue") == ["queued"]
        assert r.effects.of("ack") == []  # the in-flight batch has not committed
        late = await r.feed("u", "c", "late")  # delivered after drain: back to the queue
        await r.until(lambda: r.effects.of("requeue") == ["queued", "late"])
        assert late.message_id == "late"
        store.gate.set()
        await r.until(lambda: r.effects.of("ack") == ["in-flight"])
    assert store.order("s") == ["in-flight"]


# ---------------------------------------------------------------------------- real services


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def batch_size_metric(port: int) -> tuple[float, float]:
    """``(count, sum)`` of ``lash_admission_batch_size`` on a worker's ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "lash_admission_batch_size":
            samples = {s.name: s.value for s in family.samples}
            return samples["lash_admission_batch_size_count"], samples[
                "lash_admission_batch_size_sum"
            ]
    raise AssertionError("lash_admission_batch_size is not exposed")


class Burst:
    """Publishes raw requests to ``{ns}.ingress`` with its own reply queue, then collects."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, namespace: str) -> None:
        self.channel = channel
        self.names = Names(namespace)
        self.replies: dict[str, dict[str, Any]] = {}
        self.reply_queue: aio_pika.abc.AbstractQueue | None = None

    async def open(self) -> None:
        self.reply_queue = await self.channel.declare_queue("", exclusive=True, auto_delete=True)
        await self.reply_queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.replies[str(message.correlation_id)] = json.loads(message.body)

    async def publish(self, raw: bytes, routing_key: str, message_id: str) -> None:
        assert self.reply_queue is not None
        exchange = await self.channel.get_exchange(self.names.ingress, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
                correlation_id=message_id,
                reply_to=self.reply_queue.name,
            ),
            routing_key=routing_key,
        )

    async def wait(self, count: int, timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.replies) < count:
            assert loop.time() < deadline, f"{len(self.replies)} of {count} replies"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a second reply to any request would show up now
        return dict(self.replies)


@contextlib.asynccontextmanager
async def burst(amqp_url: str, namespace: str) -> AsyncIterator[tuple[Burst, Producer]]:
    """A producer (which declares the topology) and a burst publisher on one connection."""
    async with await Producer.connect(amqp_url, namespace) as producer:
        channel = await producer.connection.channel(publisher_confirms=True)
        publisher = Burst(channel, namespace)
        await publisher.open()
        yield publisher, producer


async def wait_committed(
    producer: Producer, sessions: Sequence[str], per_session: dict[str, int], timeout_s: float
) -> dict[str, list[dict[str, Any]]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        events = {s: await read_all_events(producer, s) for s in sessions}
        done = all(len(committed_inputs(events[s]).get(s, [])) >= per_session[s] for s in sessions)
        if done:
            return events
        assert loop.time() < deadline, "not every input was committed in time"
        await asyncio.sleep(0.3)


@pytest.mark.rabbitmq
@pytest.mark.postgres
@pytest.mark.timeout(240)
async def test_a_burst_over_many_sessions_is_admitted_once_in_publish_order(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    sessions = [f"b-{n}-{uuid.uuid4().hex[:6]}" for n in range(20)]
    port = free_port()
    async with burst(amqp_url, clean_namespace) as (publisher, producer):
        published: dict[str, list[str]] = defaultdict(list)  # session -> message ids
        for n in range(200):
            session = sessions[n % 20]
            mid = f"{session}:{n}"
            text = f"{session} #{n}"
            await publisher.publish(submit_body(session, text, f"k{n}"), "turn_input.submit", mid)
            published[session].append(mid)
        # The worker starts with the whole burst waiting: its first deliveries come at once.
        async with fleet(db_url, amqp_url, clean_namespace, tmp_path, http_port=port) as f:
            await f.start()
            replies = await publisher.wait(200)
            assert len(replies) == 200
            assert {r["status"] for r in replies.values()} == {"admitted"}
            input_ids = {mid: r["input"]["input_id"] for mid, r in replies.items()}
            assert len(set(input_ids.values())) == 200

            count, total = batch_size_metric(port)
            assert total == 200  # every submit went through one batch, once
            assert count < 200, "no two submits were ever admitted together"

            events = await wait_committed(
                producer, sessions, {s: 10 for s in sessions}, timeout_s=120
            )
            for session in sessions:
                expected = [input_ids[mid] for mid in published[session]]
                assert committed_inputs(events[session])[session] == expected
                admitted = [e for e in events[session] if e["type"] == "input.admitted"]
                assert len(admitted) == 10
                read = await producer.read(session)
                users = [m.text for m in read.messages if m.role == "user"]
                assert users == [
                    f"{session} #{mid.rsplit(':', 1)[1]}" for mid in published[session]
                ]


@pytest.mark.rabbitmq
@pytest.mark.postgres
@pytest.mark.timeout(240)
async def test_a_burst_with_duplicates_a_conflict_and_bad_input(
    db_url: str, amqp_url: str, clean_namespace: str, tmp_path: Path
) -> None:
    sessions = [f"d-{n}-{uuid.uuid4().hex[:6]}" for n in range(4)]
    async with burst(amqp_url, clean_namespace) as (publisher, producer):
        expected: dict[str, str] = {}
        originals: dict[str, str] = {}  # duplicate / conflict message id -> original's
        for n in range(16):
            session = sessions[n % 4]
            mid = f"orig-{n}"
            await publisher.publish(
                submit_body(session, f"text {n}", f"k{n}"), "turn_input.submit", mid
            )
            expected[mid] = "admitted"
            if n % 4 == 1:  # a redelivered copy: same source key, same content
                dup = f"dup-{n}"
                await publisher.publish(
                    submit_body(session, f"text {n}", f"k{n}"), "turn_input.submit", dup
                )
                expected[dup], originals[dup] = "duplicate", mid
            if n == 6:  # same source key, other content
                await publisher.publish(
                    submit_body(session, "something else", f"k{n}"), "turn_input.submit", "clash"
                )
                expected["clash"], originals["clash"] = "conflict", mid
            if n == 9:
                await publisher.publish(b"{not json", "turn_input.submit", "bad")
                expected["bad"] = "rejected"
        async with fleet(db_url, amqp_url, clean_namespace, tmp_path) as f:
            await f.start()
            replies = await publisher.wait(len(expected))
            assert {mid: r["status"] for mid, r in replies.items()} == expected
            for mid, original in originals.items():
                first = replies[original]["input"]["input_id"]
                if expected[mid] == "duplicate":
                    assert replies[mid]["input"]["input_id"] == first
                else:
                    assert replies[mid]["error"]["existing_input_id"] == first
            assert replies["bad"]["error"]["code"] == "invalid_json"
            dead = await get_dead_letters(producer.connection, clean_namespace, 1)
            assert [m.headers[ERROR_CODE_HEADER] for m in dead] == ["invalid_json"]
            assert dead[0].body == b"{not json"

            events = await wait_committed(producer, sessions, {s: 4 for s in sessions}, 120)
            for n, session in enumerate(sessions):
                admitted = [e for e in events[session] if e["type"] == "input.admitted"]
                assert len(admitted) == 4  # duplicates and the conflict admitted nothing
                ids = [replies[f"orig-{m}"]["input"]["input_id"] for m in range(n, 16, 4)]
                assert committed_inputs(events[session])[session] == ids
