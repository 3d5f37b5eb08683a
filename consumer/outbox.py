"""Observation publishing: the durable-event outbox relay and the live activity sink.

Durable events are rows written in the same transaction as the state change they report
(DESIGN.md difference 4). The relay publishes them to ``{ns}.observations`` with publisher
confirms, in ``seq`` order per session, with ``message_id = <session_id>:<seq>`` (so a
republish after a crash is recognisable), then marks them published: at least once. The
marks ride on the relay's next scan, which writes them in the same statement, or go alone
once ``MARK_LINGER_S`` passes without one: a busy relay sends one statement per batch, not
two, and a crash in between republishes at most that much.

Sessions are split into ``LASH_OUTBOX_SHARDS`` shards. A relay publishes a shard only while
it holds a PostgreSQL advisory lock for ``(namespace, shard)`` on a dedicated connection,
so each session has exactly one publisher at a time (its order holds across the fleet) and
a dead worker's shards (its connection gone, its locks released by PostgreSQL) are taken
over by whoever tries next. The relays share the shards out: each holds at most
``ceil(shards / relays)``, counting the relays connected now (their lock connections'
``application_name``, see :func:`presence_name`), so each worker publishes the events of
about as many sessions as the next; and since a session's turns run where its events are
published (``consumer.dispatch``), each runs about as many turns.

What it costs the database, since every worker runs a relay: balancing the shards is one
or two statements on a slow, jittered timer (``retake_interval_s``), which also proves the
lock connection alive, so publishing needs no pings. A relay that releases shards (on a
graceful stop, or above its share) says so with a notification, and the others retake at
once; so does a relay that joins short of its share, once, so that holders above their
share release at once rather than on their timers. A relay scans
only when there is a reason - an ``events`` notification for a session of a shard it holds,
a handed-over event that does not follow on, or the ``poll_interval_s`` fallback - and then
with one statement covering every shard it holds. A relay that holds no shard never scans.

Events of a session whose shard this worker's relay holds are handed to it in-process once
committed, not announced by notification (``Store.set_local_publisher``), and published
from memory without a scan when each follows the last event the relay published for its
session (:meth:`OutboxRelay.committed`): with one worker no ``events`` notification is
sent and no scan is needed, and every notification that is sent wakes only the relay that
publishes it (each listening worker still receives and discards it). That notification
carries the events it announces when they fit (``Notification.events``), and the relay
takes them as it takes its own worker's: so events need a scan only after a gap (a
notification lost, or too large to carry them), a takeover or the fallback poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import psycopg
from aio_pika.abc import AbstractChannel, AbstractExchange
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

from consumer.observability.logs import get_logger
from consumer.observability.metrics import OUTBOX_BACKLOG, OUTBOX_LAG, OUTBOX_PUBLISHED
from consumer.observability.tracing import span
from lash_core import jsontext
from lash_core.events import DurableEvent, OutboxMessage, TurnActivity, session_shard
from lash_core.store.base import Notification, Store
from lash_core.store.postgres import notify

log = get_logger(__name__)

JSON = "application/json"

RELEASED_PREFIX = "~outbox-released:"
"""``session_id`` of the ``events`` notification a relay sends when it gives shards up, or
joins short of its share: every relay of the namespace then balances its shards at once."""

JITTER = 0.25
"""Retake timers vary by this fraction either way, so relays started together spread out."""

MARK_LINGER_S = 0.05
"""How long confirmed events wait to be marked published with the next scan before they
are marked on their own. Measured in ``bench --modes latency`` (W = 4, 94 inputs/s), a
relay marking every batch at once sent a mark and a scan per wake-up, 4.2 of a turn's
14.6 statements; there each of the four relays gets about 70 events a second (three per
input), so most marks ride along. The cost is the window in which a crashed relay's
successor republishes events (observers dedupe by ``message_id``)."""


REMEMBERED_SESSIONS = 4096
"""How many sessions' last published ``seq`` a relay remembers (least recently published
forgotten first), so that events handed over by its store can go out without a scan when
they follow on (see :meth:`OutboxRelay.committed`). A forgotten session costs one scan."""


def lock_keys(namespace: str, shard: int) -> tuple[int, int]:
    """The two int4 keys of ``pg_try_advisory_lock(int, int)`` for one outbox shard."""
    raw = zlib.crc32(f"lash-outbox:{namespace}".encode())
    return (raw - (1 << 32) if raw >= (1 << 31) else raw), shard


def released_marker(namespace: str) -> str:
    """The notification ``session_id`` announcing that a relay of ``namespace`` left."""
    return RELEASED_PREFIX + namespace


Outgoing = tuple[bytes, spec.Basic.Properties, str]
"""One message to publish: its body, its AMQP properties and its routing key."""

#: What :func:`publish_confirmed` uses of an aiormq channel besides ``basic_publish``.
_BATCH_INTERNALS = (
    "lock",
    "delivery_tag",
    "confirmations",
    "write_queue",
    "number",
    "create_future",
    "_split_body",
)


def properties(
    message_type: str, session_id: str, *, message_id: str | None = None, persistent: bool
) -> spec.Basic.Properties:
    """The AMQP properties of an observation event (CONTRACT.md "Observation events")."""
    return spec.Basic.Properties(
        content_type=JSON,
        delivery_mode=2 if persistent else 1,
        headers={"session_id": session_id},
        message_id=message_id,
        message_type=message_type,
    )


def event_properties(event: OutboxMessage) -> spec.Basic.Properties:
    """The properties of one durable event: persistent, ``message_id = <session>:<seq>``."""
    return properties(event.type, event.session_id, message_id=event.message_id, persistent=True)


async def _underlay(exchange: AbstractExchange) -> aiormq.Channel | None:
    owner = getattr(exchange, "channel", None)
    channel = await owner.get_underlay_channel() if isinstance(owner, AbstractChannel) else None
    return channel if isinstance(channel, aiormq.Channel) else None


async def send(exchange: AbstractExchange, message: Outgoing) -> None:
    """Publish one message (not mandatory); on a confirm channel, return once confirmed.

    Unlike ``exchange.publish``, this does not hold the channel's lock until the frame is
    on the socket (``wait=False``): that wait costs one event-loop turn per message, and
    a busy worker's loop turn is long. A broker nack still raises.
    """
    body, props, routing_key = message
    channel = await _underlay(exchange)
    if channel is None:
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type=props.content_type,
                delivery_mode=props.delivery_mode,
                headers=props.headers,
                message_id=props.message_id,
                type=props.message_type,
            ),
            routing_key=routing_key,
            mandatory=False,
        )
        return
    await channel.basic_publish(
        body,
        exchange=exchange.name,
        routing_key=routing_key,
        properties=props,
        mandatory=False,
        wait=False,
    )


async def publish_confirmed(
    exchange: AbstractExchange, messages: Sequence[Outgoing]
) -> list[BaseException | None]:
    """Publish ``messages`` in order (not mandatory) on a confirm channel and wait for the
    broker; the outcome of each: ``None`` once confirmed, else the error (a nack, a closed
    channel).

    The batch leaves as one write: under the channel lock, every message takes the next
    delivery tag and a confirmation future exactly as ``basic_publish`` registers them,
    and all their frames are queued to the connection as one payload. One
    ``basic_publish`` per message costs a timeout context, a lock round, a queue slot and a
    socket write each; measured on the development machine (batches of 30, 6,000
    messages), one write per batch took 50-56 us of worker CPU and 30-37 us of broker CPU
    per message, against 129-130 and 60-68. Where the channel lacks what this relies on,
    each message goes through :func:`send` instead.
    """
    if not messages:
        return []
    channel = await _underlay(exchange)
    if (
        channel is None
        or not channel.publisher_confirms
        or not all(hasattr(channel, name) for name in _BATCH_INTERNALS)
    ):
        outcomes = await asyncio.gather(
            *(send(exchange, message) for message in messages), return_exceptions=True
        )
        return [o if isinstance(o, BaseException) else None for o in outcomes]
    confirmations: list[asyncio.Future[Any]] = []
    async with channel.lock:
        first = channel.delivery_tag
        try:
            frames: list[Any] = []
            for body, props, routing_key in messages:
                frames.append(spec.Basic.Publish(exchange=exchange.name, routing_key=routing_key))
                frames.append(ContentHeader(properties=props, body_size=len(body)))
                frames.extend(channel._split_body(body))
            payload = ChannelFrame.marshall(frames=frames, channel_number=channel.number)
            for tag in range(first + 1, first + 1 + len(messages)):
                confirmation = channel.create_future()
                channel.confirmations[tag] = confirmation
                confirmations.append(confirmation)
            channel.delivery_tag = first + len(messages)
            await channel.write_queue.put(payload)
        except BaseException:
            # Nothing reached the broker: give the delivery tags back, as basic_publish does.
            channel.delivery_tag = first
            for tag in range(first + 1, first + 1 + len(confirmations)):
                channel.confirmations.pop(tag, None)
            for confirmation in confirmations:
                confirmation.cancel()
            raise
    outcomes = await asyncio.gather(*confirmations, return_exceptions=True)
    return [o if isinstance(o, BaseException) else None for o in outcomes]


def presence_name(namespace: str) -> str:
    """The ``application_name`` of a relay's lock connection: relays of one namespace count
    each other by it in ``pg_stat_activity`` (PostgreSQL keeps 63 bytes of it)."""
    return f"lash-outbox {namespace}"[:63]


class ShardLocks:
    """Advisory locks of outbox shards on one dedicated autocommit connection."""

    def __init__(self, database_url: str, namespace: str) -> None:
        self._url = database_url
        self._namespace = namespace
        self._presence = presence_name(namespace)
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self.held: set[int] = set()

    async def _connection(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            self.held.clear()
            self._conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, application_name=self._presence
            )
        return self._conn

    async def balance(self, shard_count: int) -> tuple[list[int], list[int], int]:
        """Hold this relay's share of the ``shard_count`` shards: at most ``ceil(shard_count
        / relays)``, counting the relays of the namespace connected to the database now.
        Shards above the share are released (the highest first); free ones are locked up
        to it. Returns the newly taken shards, the released ones and the share.

        The statements also prove the connection alive: if one fails, the locks may be gone
        (PostgreSQL drops them with the session), so every shard is dropped here and the
        error propagates.
        """
        conn = await self._connection()
        key, _ = lock_keys(self._namespace, 0)
        try:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND datname = current_database()",
                (self._presence,),
            )
            counted = await cur.fetchone()
            relays = max(1, int(counted[0]) if counted else 1)  # type: ignore[call-overload]
            share = -(-shard_count // relays)
            released = sorted(self.held)[share:]
            if released:
                await conn.execute(
                    "SELECT pg_advisory_unlock(%s::int, s) FROM unnest(%s::int[]) AS s",
                    (key, released),
                )
                self.held.difference_update(released)
            taken: list[int] = []
            if len(self.held) < share:
                free = [shard for shard in range(shard_count) if shard not in self.held]
                # The limit stops the scan, so no lock beyond the share is taken.
                cur = await conn.execute(
                    "SELECT s FROM unnest(%s::int[]) AS s"
                    " WHERE pg_try_advisory_lock(%s::int, s) LIMIT %s",
                    (free, key, share - len(self.held)),
                )
                taken = sorted(int(row[0]) for row in await cur.fetchall())  # type: ignore[call-overload]
        except psycopg.Error:
            log.warning("outbox_lock_connection_lost", shards=sorted(self.held))
            await self.close(announce=False)
            raise
        self.held.update(taken)
        return taken, released, share

    async def announce(self) -> None:
        """Tell the namespace's relays (an ``events`` notification naming
        :func:`released_marker`) to balance their shards now, not on their timers."""
        conn = await self._connection()
        await conn.execute(
            "SELECT pg_notify(%s, %s)",
            (notify.CHANNEL, notify.payload("events", released_marker(self._namespace))),
        )

    async def close(self, *, announce: bool = True) -> None:
        """Give the shards up and close the connection.

        With ``announce``, the locks are released and an ``events`` notification names
        :func:`released_marker` in the same statement, so other relays retake at once
        instead of on their timer; the connection renames itself in that statement too,
        so that they no longer count this relay when they share the shards out.
        """
        had = bool(self.held)
        self.held.clear()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if announce and had and not conn.closed:
            with contextlib.suppress(Exception):
                await conn.execute(
                    "SELECT set_config('application_name', 'lash-outbox-leaving', false),"
                    " pg_advisory_unlock_all(), pg_notify(%s, %s)",
                    (notify.CHANNEL, notify.payload("events", released_marker(self._namespace))),
                )
        with contextlib.suppress(Exception):
            await conn.close()


class OutboxRelay:
    """Publishes unpublished durable events of the shards this relay holds."""

    def __init__(
        self,
        store: Store,
        exchange: AbstractExchange,
        *,
        database_url: str,
        namespace: str,
        shards: int,
        batch: int,
        poll_interval_s: float,
        retake_interval_s: float | None = None,
        mark_linger_s: float = MARK_LINGER_S,
    ) -> None:
        self._store = store
        self._exchange = exchange
        self._locks = ShardLocks(database_url, namespace)
        self._marker = released_marker(namespace)
        self._shards = shards
        self._batch = batch
        self._poll_s = poll_interval_s
        self._retake_s = retake_interval_s if retake_interval_s is not None else poll_interval_s
        self._linger_s = mark_linger_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._retake_now = True
        self._joined = False
        self._next_retake = 0.0
        self._scan = True
        self._unmarked: list[OutboxMessage] = []
        self._unmarked_at = 0.0  # loop time of the oldest unmarked confirm
        self._handed: list[OutboxMessage] = []
        self._last_seq: OrderedDict[str, int] = OrderedDict()
        self.published = 0
        self.handed_published = 0
        self.scans = 0
        self.retakes = 0

    @property
    def held_shards(self) -> set[int]:
        return set(self._locks.held)

    @property
    def pending_marks(self) -> int:
        """Events confirmed by the broker and not yet marked published (see
        ``MARK_LINGER_S``); ``published`` counts them once marked."""
        return len(self._unmarked)

    def publishes(self, session_id: str) -> bool:
        """Whether this relay holds ``session_id``'s shard now (the store then sends no
        ``events`` wake-up for it: see ``Store.set_local_publisher``)."""
        return session_shard(session_id) % self._shards in self._locks.held

    def wake(self) -> None:
        """New events may exist (a local commit or an ``events`` notification)."""
        self._scan = True
        self._wake.set()

    def committed(self, events: Sequence[DurableEvent]) -> None:
        """Durable events of sessions this relay publishes, just committed by this
        process's store: published from memory on the next pass, without a scan, when each
        follows the last event this relay published for its session (or is its first).

        Otherwise, or when a scan is due anyway, a scan publishes them: they are committed,
        so it finds them, in order, with whatever else came before them. Events another
        worker commits arrive the same way, in their ``events`` notification (when they
        fit in one; one without them makes the relay scan). A backlog (more than a batch
        waiting) is also left to the scan rather than held in memory."""
        self._hand_over([OutboxMessage.of(event) for event in events])

    def _hand_over(self, messages: Sequence[OutboxMessage]) -> None:
        """Take committed events to publish from memory (see :meth:`committed`)."""
        if not messages or len(self._handed) + len(messages) > self._batch:
            self._handed.clear()
            self.wake()
            return
        self._handed.extend(messages)
        self._wake.set()

    def on_notification(self, note: Notification) -> None:
        """An ``events`` notification: publish the events it carries, or scan; or balance
        the shards now if a relay announced a change."""
        if note.session_id == self._marker:
            # A relay left, joined short of its share or released some: share out again.
            self._retake_now = True
            self._wake.set()
            return
        if note.session_id.startswith(RELEASED_PREFIX):
            return  # another namespace's relay
        if self.publishes(note.session_id):
            # Another relay's session is not scanned here: taking its shard over scans.
            # Events another worker committed come along when they fit: published from
            # memory as this worker's own are (notifications arrive in commit order).
            self._hand_over(note.outbox_messages())

    async def run(self) -> None:
        """Publish until :meth:`stop`; errors are logged and retried after a pause."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()
            more = False
            try:
                await self._maybe_retake(loop.time())
                more = await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox_pass_failed")
                # Check the locks (and scan again) after the pause.
                self._retake_now = True
                self._scan = True
                more = False
            if more:
                continue
            timeout = max(0.0, min(self._poll_s, self._next_retake - loop.time()))
            if self._retake_now:
                timeout = self._poll_s
            deadline = loop.time() + timeout
            if self._unmarked:
                # Counted from the first confirm, so that wake-ups without a scan (events
                # handed over) cannot put the marks off.
                due = self._unmarked_at + self._linger_s
                if due < deadline:
                    if due > loop.time() and await self._woken(due - loop.time()):
                        continue
                    # No scan came to carry the marks: write them alone, then wait on.
                    await self._mark_unmarked()
            if await self._woken(max(0.0, deadline - loop.time())):
                continue
            self._scan = True  # the fallback poll
        await self._mark_unmarked()

    async def _woken(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for :meth:`wake`; whether it came."""
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as
        # the event is set, and this loop would then outlive the worker's shutdown.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        return self._wake.is_set()

    async def _mark_unmarked(self) -> None:
        """Mark the confirmed events no scan has marked yet (kept for the next try if the
        store fails: marking twice is harmless)."""
        if not self._unmarked:
            return
        try:
            await self._store.mark_published(self._unmarked)
        except Exception:
            log.exception("outbox_mark_failed", events=len(self._unmarked))
            return
        self._marked()

    def _marked(self) -> None:
        self.published += len(self._unmarked)
        OUTBOX_PUBLISHED.inc(len(self._unmarked))
        self._unmarked = []

    async def _maybe_retake(self, now: float) -> None:
        """Balance the shards (see :meth:`ShardLocks.balance`) when due: on the timer, or
        at once when a relay announced a change. Confirmed events are marked before their
        shards go, so the next holder does not publish them again; a relay that joins
        short of its share announces it once, so that holders above theirs release now."""
        if not self._retake_now and now < self._next_retake:
            return
        self._retake_now = False
        self._next_retake = now + self._retake_s * random.uniform(1 - JITTER, 1 + JITTER)
        self.retakes += 1
        if self._unmarked:
            await self._mark_unmarked()
        taken, released, share = await self._locks.balance(self._shards)
        if released:
            log.info("outbox_shards_released", shards=released, held=sorted(self._locks.held))
            await self._locks.announce()
        if taken:
            log.info("outbox_shards_taken", shards=taken, held=sorted(self._locks.held))
            self._scan = True
        if not self._joined:
            self._joined = True
            if len(self._locks.held) < share:
                await self._locks.announce()

    async def publish_once(self) -> bool:
        """Publish the events handed over (:meth:`committed`) that follow on, then, if a
        scan is due, one scan of every held shard. True when the scan found a full batch
        (go again)."""
        if not self._locks.held:
            self._handed.clear()
            return False
        if self._handed and not self._scan:
            handed = self._following_on()
            if handed:
                await self._publish(handed)
                self.handed_published += len(handed)
        if not self._scan:
            return False  # (events handed over meanwhile wait, with a wake-up, for the next)
        self._handed.clear()  # committed before they were handed over: the scan finds them
        self._scan = False
        self.scans += 1
        try:
            events = await self._store.unpublished_messages(
                self._batch,
                shards=frozenset(self._locks.held),
                shard_count=self._shards,
                published=self._unmarked,
            )
        except BaseException:
            self._scan = True
            raise
        self._marked()
        OUTBOX_BACKLOG.set(len(events))
        if not events:
            return False
        await self._publish(events)
        full = len(events) >= self._batch
        self._scan = self._scan or full
        return full

    def _following_on(self) -> list[OutboxMessage]:
        """The handed-over events that can go out without a scan: each session's, in
        ``seq`` order, while each follows the last one published (a session's first event
        follows nothing). A gap means events of another worker not published yet: the
        session's are left to the scan, which this asks for. Events this relay published
        already (a scan found them first) are dropped; so are those of shards it lost."""
        handed, self._handed = self._handed, []
        ready: list[OutboxMessage] = []
        last: dict[str, int | None] = {}
        for event in sorted(handed, key=lambda e: (e.session_id, e.seq)):
            sid = event.session_id
            if sid not in last:
                if not self.publishes(sid):
                    last[sid] = None
                    continue
                last[sid] = self._last_seq.get(sid, 0 if event.seq == 1 else -1)
            before = last[sid]
            if before is None:
                continue
            if before >= event.seq:
                continue  # published by a scan
            if before != event.seq - 1:
                last[sid] = None
                self._scan = True
                continue
            last[sid] = event.seq
            ready.append(event)
        return ready

    def _remember(self, session_id: str, seq: int) -> None:
        seen = self._last_seq
        seen[session_id] = seq
        seen.move_to_end(session_id)
        if len(seen) > REMEMBERED_SESSIONS:
            seen.popitem(last=False)

    async def _publish(self, events: Sequence[OutboxMessage]) -> None:
        """Publish a batch as one write and await its confirms together (see
        :func:`publish_confirmed`). Messages leave in call order, so each session's events
        leave in ``seq`` order; a session's events are marked published (by the next scan)
        only up to its first unconfirmed one, and the rest go again, in order, next pass."""
        ordered = sorted(events, key=lambda e: (e.session_id, e.seq))
        with span("lash.publish", events=len(ordered)):
            results = await publish_confirmed(
                self._exchange, [(e.body, event_properties(e), e.type) for e in ordered]
            )
        done: list[OutboxMessage] = []
        failed: set[str] = set()
        now = time.time()
        for event, result in zip(ordered, results, strict=True):
            if event.session_id in failed:
                continue
            if result is not None:
                failed.add(event.session_id)
                log.warning(
                    "outbox_publish_failed",
                    session_id=event.session_id,
                    seq=event.seq,
                    error=f"{type(result).__name__}: {result}",
                )
                continue
            done.append(event)
            self._remember(event.session_id, event.seq)
            if event.created_at_ms:
                OUTBOX_LAG.observe(max(0.0, now - event.created_at_ms / 1000))
        if failed:
            self._scan = True  # what failed is retried on the next pass
        if done and not self._unmarked:
            self._unmarked_at = asyncio.get_running_loop().time()
        self._unmarked.extend(done)

    async def flush(self, timeout_s: float) -> None:
        """Publish what the held shards still have, within ``timeout_s`` (shutdown)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            self._scan = True
            try:
                more = await asyncio.wait_for(self.publish_once(), deadline - loop.time())
            except Exception:
                log.exception("outbox_flush_failed")
                break
            if not more:
                break
        await self._mark_unmarked()  # what was confirmed, even if a later pass failed

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        """Release the shards, telling the other relays to take them now."""
        await self._locks.close()


class ActivityPublisher:
    """The driver's ``on_activity`` sink: live ``turn.activity`` events, best effort.

    Published without confirms on its own channel and never retried: a lost delta costs
    an observer some streaming text, never correctness (the committed turn has it all).
    """

    def __init__(self, exchange: AbstractExchange) -> None:
        self._exchange = exchange
        self.failures = 0

    async def __call__(self, activity: TurnActivity) -> None:
        body = jsontext.dumpb(activity.to_wire())
        props = properties(activity.type, activity.session_id, persistent=False)
        try:
            await send(self._exchange, (body, props, activity.type))
        except Exception as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.warning("activity_publish_failed", error=str(exc), failures=self.failures)
