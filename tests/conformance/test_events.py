"""Our additions: the durable event log, the outbox and cross-worker wake-ups.

lash keeps observation replay in one process's memory; this port writes every durable
event in the same transaction as its state change with a gapless per-session ``seq``
(DESIGN.md difference 4), publishes it through an outbox, and wakes other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from lash_core.events import (
    DurableEvent,
    InputAccepted,
    InputAdmitted,
    InputCancelled,
    TurnCommitted,
    TurnStarted,
    parse_cursor,
    session_shard,
)
from lash_core.inputs import InputIdTarget
from lash_core.store.base import InputAdmission, Notification, Store
from tests.conformance.conftest import (
    active,
    append,
    command_draft,
    commit,
    draft,
    final,
    lease_for,
    node,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_events_seq_is_gapless_across_admission_claim_and_commit(store: Store) -> None:
    lease = await lease_for(store, "s")
    first = await store.enqueue_input(draft("s", "hello"))
    # Commands have no event. Admitted after the input, it waits for the turn that takes it
    # (a command admitted first would hold the input back until it is applied).
    cmd = await store.enqueue_command(command_draft("s", "c"))
    start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    steer = await store.enqueue_input(draft("s", "steer", ingress=active("t1")))
    dropped = await store.enqueue_input(draft("s", "drop"))
    await store.cancel_inputs("s", [InputIdTarget(value=dropped.record.input_id)])
    accepted = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "t1", "after_work")
    assert accepted is not None
    late = await store.enqueue_input(draft("s", "late", ingress=active("t1", "before_completion")))
    result = await store.commit(
        commit(
            "s",
            lease,
            graph=append(node("u", "hello"), node("a", "hi!", parent="u", role="assistant")),
            turn=final("t1", input_tokens=2),
            completed_input_claims=[start.claim.completion(), accepted.completion()],
            defer_active_inputs_of_turn="t1",
        )
    )
    page = await store.events_after("s", 0)
    assert [e.seq for e in page.events] == list(range(1, 9))
    assert page.last_seq == 8 and not page.gap
    assert [e.type for e in page.events] == [
        "input.admitted",
        "turn.started",
        "input.admitted",
        "input.admitted",
        "input.cancelled",
        "input.accepted",
        "input.admitted",
        "turn.committed",
    ]
    events = page.events
    assert isinstance(events[0].payload, InputAdmitted)
    assert events[0].payload.input.input_id == first.record.input_id
    assert isinstance(events[1].payload, TurnStarted)
    assert events[1].payload.input_ids == [first.record.input_id]
    assert events[1].payload.lease_generation == lease.fencing_token
    assert isinstance(events[4].payload, InputCancelled)
    assert events[4].payload.input_ids == [dropped.record.input_id]
    assert isinstance(events[5].payload, InputAccepted)
    assert events[5].payload.input_ids == [steer.record.input_id]
    [committed] = result.events
    assert committed.seq == 8 and committed.revision == 1
    assert isinstance(committed.payload, TurnCommitted)
    assert committed.payload.input_ids == [first.record.input_id, steer.record.input_id]
    assert committed.payload.deferred_input_ids == [late.record.input_id]
    assert [m.text for m in committed.payload.messages] == ["hello", "hi!"]
    assert all(e.revision == 0 for e in events[:7])
    assert events[7] == committed
    assert (await store.load_state("s")).last_seq == 8
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None and claim.command.batch_id == cmd.command.batch_id
    applied = await store.commit(
        commit(
            "s",
            lease,
            completed_command_claims=[claim.completion()],
            applied_command=claim.command.command,
            turn=final("t2"),
        )
    )
    assert [(e.seq, e.type, e.revision) for e in applied.events] == [
        (9, "session.command_applied", 2),
        (10, "turn.committed", 2),
    ]
    # Every event type leaves the outbox with the body ``to_wire`` gives (the PostgreSQL
    # store splices it from the stored payload text without parsing it).
    everything = (await store.events_after("s", 0)).events
    outbox = await store.unpublished_messages(shards={0}, shard_count=1)
    assert [(m.session_id, m.seq, m.type, m.message_id) for m in outbox] == [
        (e.session_id, e.seq, e.type, e.message_id) for e in everything
    ]
    assert [json.loads(m.body) for m in outbox] == [e.to_wire() for e in everything]
    assert [m.created_at_ms for m in outbox] == [e.created_at_ms for e in everything]
    await store.mark_published(outbox[:9])
    assert [m.seq for m in await store.unpublished_messages(shards=[0])] == [10]
    assert await store.unpublished_messages(shards=()) == []


async def test_events_cursor_and_wire_identity(store: Store) -> None:
    admitted = await store.enqueue_input(draft("chat:42", "x"))
    event = admitted.event
    assert event is not None
    assert event.message_id == "chat:42:1"
    assert parse_cursor(event.cursor, "chat:42") == ("chat:42", 0, 1)
    wire = event.to_wire()
    assert wire["seq"] == 1 and wire["type"] == "input.admitted"
    assert wire["input"]["input_id"] == admitted.record.input_id
    [stored] = (await store.events_after("chat:42", 0)).events
    assert stored == event


async def test_events_after_respects_limit_and_other_sessions(store: Store) -> None:
    for n in range(5):
        await store.enqueue_input(draft("s", f"{n}"))
    await store.enqueue_input(draft("t", "other"))
    page = await store.events_after("s", 1, limit=2)
    assert [e.seq for e in page.events] == [2, 3] and page.last_seq == 5 and not page.gap
    assert [e.seq for e in (await store.events_after("t", 0)).events] == [1]


async def test_start_turn_without_inputs_writes_nothing(store: Store) -> None:
    lease = await lease_for(store, "s")
    assert await store.start_turn(lease.fence(), "t1") is None
    assert (await store.events_after("s", 0)).last_seq == 0
    row = await store.read_lease("s")
    assert row is not None and row.running_turn_id is None
    view = await store.read_session("s")
    assert view.running_turn_id is None


async def test_outbox_unpublished_and_mark_published(store: Store) -> None:
    for sid in ("b", "a", "c"):
        await store.enqueue_input(draft(sid, "1"))
        await store.enqueue_input(draft(sid, "2"))
    pending = await store.unpublished_events()
    assert [(e.session_id, e.seq) for e in pending] == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("b", 2),
        ("c", 1),
        ("c", 2),
    ]
    assert len(await store.unpublished_events(limit=3)) == 3
    await store.mark_published(pending[:3])
    left = await store.unpublished_events()
    assert [(e.session_id, e.seq) for e in left] == [("b", 2), ("c", 1), ("c", 2)]
    await store.mark_published(left)
    await store.mark_published(left)  # idempotent
    assert await store.unpublished_events() == []
    # Still readable after publishing.
    assert len((await store.events_after("a", 0)).events) == 2


async def test_outbox_shards_split_sessions(store: Store) -> None:
    sessions = [f"sess-{n}" for n in range(12)]
    for sid in sessions:
        await store.enqueue_input(draft(sid, "x"))
    seen: list[str] = []
    for shard in range(3):
        events = await store.unpublished_events(shard=shard, shard_count=3)
        assert all(session_shard(e.session_id) % 3 == shard for e in events)
        seen.extend(e.session_id for e in events)
    assert sorted(seen) == sorted(sessions)


async def test_outbox_scans_several_shards_in_one_call(store: Store) -> None:
    sessions = [f"multi-{n}" for n in range(12)]
    for sid in sessions:
        await store.enqueue_input(draft(sid, "x"))
    both = await store.unpublished_events(shards={0, 2}, shard_count=3)
    assert {e.session_id for e in both} == {s for s in sessions if session_shard(s) % 3 in (0, 2)}
    assert [(e.session_id, e.seq) for e in both] == sorted((e.session_id, e.seq) for e in both)
    assert await store.unpublished_events(shards=(), shard_count=3) == []
    everything = await store.unpublished_events(shards=range(3), shard_count=3)
    assert len(everything) == len(sessions)


# --------------------------------------------------------------------------- notifications


async def _close(stream: AsyncIterator[Notification]) -> None:
    """End a notification stream (a PostgreSQL one holds a LISTEN connection)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(BaseException):
            await aclose()


async def _await_notification(
    store: Store,
    matches: Callable[[Notification], bool],
    trigger: Callable[[int], Awaitable[object]],
    timeout_s: float = 15.0,
) -> Notification:
    """Subscribe, then fire ``trigger`` until a matching wake-up arrives (a LISTEN
    connection may need a moment to be ready, so one trigger alone could be missed)."""
    stream: AsyncIterator[Notification] = store.notifications()

    async def first_match() -> Notification:
        async for note in stream:
            if matches(note):
                return note
        raise AssertionError("notification stream ended")

    waiter = asyncio.ensure_future(first_match())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    attempt = 0
    try:
        while not waiter.done():
            if loop.time() > deadline:
                raise AssertionError("no matching notification before the deadline")
            await trigger(attempt)
            attempt += 1
            await asyncio.wait({waiter}, timeout=0.2)
        return waiter.result()
    finally:
        waiter.cancel()
        with contextlib.suppress(BaseException):
            await waiter
        await _close(stream)


async def test_notifications_work_and_events_on_admission(store: Store) -> None:
    async def admit(n: int) -> object:
        return await store.enqueue_input(draft("s", f"wake {n}"))

    work = await _await_notification(
        store, lambda n: n.kind == "work" and n.session_id == "s", admit
    )
    assert work.session_id == "s"
    events = await _await_notification(
        store, lambda n: n.kind == "events" and n.session_id == "s", admit
    )
    assert events.session_id == "s"


async def test_notifications_work_on_command_and_release(store: Store) -> None:
    async def enqueue(n: int) -> object:
        return await store.enqueue_command(command_draft("c", f"k{n}"))

    await _await_notification(store, lambda n: n.kind == "work" and n.session_id == "c", enqueue)

    async def cycle(n: int) -> object:
        lease = await lease_for(store, "r", f"w{n}")
        await store.release_lease(lease.fence())
        return None

    await _await_notification(store, lambda n: n.kind == "work" and n.session_id == "r", cycle)


async def test_notifications_cancel_names_the_turn(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.start_turn(lease.fence(), "t1", require_inputs=False)

    async def cancel(n: int) -> object:
        return await store.request_turn_cancel("s", None, f"stop {n}")

    note = await _await_notification(
        store, lambda n: n.kind == "cancel" and n.session_id == "s", cancel
    )
    assert note.turn_id == "t1"


class _LocalRelay:
    """A stand-in for this process's outbox relay: publishes the sessions it is given."""

    def __init__(self, *sessions: str) -> None:
        self.sessions = set(sessions)
        self.wakes = 0
        self.handed: list[DurableEvent] = []

    def publishes(self, session_id: str) -> bool:
        return session_id in self.sessions

    def wake(self) -> None:
        self.wakes += 1

    def committed(self, events: Sequence[DurableEvent]) -> None:
        self.wakes += 1
        self.handed.extend(events)


async def test_events_published_in_this_process_wake_it_instead_of_notifying(
    store: Store,
) -> None:
    """Events of a session the local publisher holds send no ``events`` wake-up: the
    publisher is told after each commit that appended them (admission, batch admission,
    turn start, commit), woken or handed the events themselves (then all of them, as
    stored). Other wake-ups, and other sessions' events, still go out."""
    relay = _LocalRelay("quiet")
    store.set_local_publisher(relay)
    seen: list[Notification] = []
    stream: AsyncIterator[Notification] = store.notifications()

    async def collect() -> None:
        async for note in stream:
            seen.append(note)

    collector = asyncio.ensure_future(collect())

    async def until(matches: Callable[[Notification], bool], trigger: str) -> int:
        """Admit to ``trigger`` until a matching wake-up arrives; its index in ``seen``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        n = 0
        while True:
            for index, note in enumerate(seen):
                if matches(note):
                    return index
            assert loop.time() < deadline, "no matching notification before the deadline"
            n += 1
            await store.enqueue_input(draft(trigger, f"{trigger} {n}"))
            await asyncio.sleep(0.05)

    try:
        # The stream is listening once the first wake-up of another session comes through.
        await until(lambda n: n.session_id == "loud", "loud")
        ready = len(seen)

        wakes = relay.wakes
        one = await store.enqueue_input(draft("quiet", "one"))
        assert relay.wakes > wakes
        wakes = relay.wakes
        two, three = await store.enqueue_inputs([draft("quiet", "two"), draft("loud", "three")])
        assert relay.wakes > wakes
        # Turns belong where the events are published: "loud" runs elsewhere.
        assert isinstance(two, InputAdmission) and isinstance(three, InputAdmission)
        assert not one.runs_elsewhere and not two.runs_elsewhere and three.runs_elsewhere
        four = await store.enqueue_input(draft("loud", "four"))
        assert four.runs_elsewhere
        await lease_for(store, "loud-held")  # a live holder sees its input: no hand-off
        assert (await store.enqueue_input(draft("loud-held", "five"))).runs_elsewhere
        lease = await lease_for(store, "quiet")
        wakes = relay.wakes
        start = await store.start_turn(lease.fence(), "t1")
        assert start is not None and start.claim is not None
        assert relay.wakes > wakes
        wakes = relay.wakes
        done = await store.commit(
            commit(
                "quiet",
                lease,
                graph=append(node("u", "one")),
                turn=final("t1"),
                completed_input_claims=[start.claim.completion()],
                release_lease=True,
            )
        )
        assert [e.type for e in done.events] == ["turn.committed"]
        assert relay.wakes > wakes

        # Wake-ups arrive in commit order: once a later one is here, every earlier one is.
        await until(lambda n: n.session_id == "marker", "marker")
        quiet = [(n.kind, n.session_id) for n in seen[ready:] if n.session_id == "quiet"]
        assert ("work", "quiet") in quiet
        assert ("events", "quiet") not in quiet
        assert ("events", "loud") in [(n.kind, n.session_id) for n in seen[ready:]]
        # Work of a session published elsewhere is marked for its publisher; only that.
        mine = ("quiet", "loud", "loud-held")
        work = [n for n in seen[ready:] if n.kind == "work" and n.session_id in mine]
        assert {(n.session_id, n.for_publisher) for n in work} >= {
            ("quiet", False),
            ("loud", True),
            ("loud-held", False),
        }
        assert all(n.for_publisher == (n.session_id == "loud") for n in work)
        stored = (await store.events_after("quiet", 0)).events
        assert len(stored) == 4
        assert relay.handed in ([], stored)
    finally:
        store.set_local_publisher(None)
        collector.cancel()
        with contextlib.suppress(BaseException):
            await collector
        await _close(stream)


async def test_outbox_scan_marks_what_the_caller_published_and_leaves_it_out(
    store: Store,
) -> None:
    """A relay hands its confirmed events to its next scan: they are marked published and
    are not in that scan's answer (the PostgreSQL store does both in one statement, whose
    snapshot still shows them unpublished), while the limit counts only what is left."""
    sessions = [f"mark-{n}" for n in range(4)]
    for sid in sessions:
        for n in range(3):
            await store.enqueue_input(draft(sid, f"{n}"))
    first = await store.unpublished_messages(5, shards={0}, shard_count=1)
    assert [(m.session_id, m.seq) for m in first] == [
        ("mark-0", 1),
        ("mark-0", 2),
        ("mark-0", 3),
        ("mark-1", 1),
        ("mark-1", 2),
    ]
    second = await store.unpublished_messages(5, shards={0}, shard_count=1, published=first)
    assert [(m.session_id, m.seq) for m in second] == [
        ("mark-1", 3),
        ("mark-2", 1),
        ("mark-2", 2),
        ("mark-2", 3),
        ("mark-3", 1),
    ]
    left = await store.unpublished_events()
    assert [(e.session_id, e.seq) for e in left][:1] == [("mark-1", 3)] and len(left) == 7
    # Marks are written even when no shard is scanned, and marking twice changes nothing.
    assert await store.unpublished_messages(shards=(), published=[*first, *second]) == []
    assert [(e.session_id, e.seq) for e in await store.unpublished_events()] == [
        ("mark-3", 2),
        ("mark-3", 3),
    ]
    rest = await store.unpublished_messages(shards={0}, published=first)
    assert [(m.session_id, m.seq) for m in rest] == [("mark-3", 2), ("mark-3", 3)]
