"""The embedded facade (``LashCore`` / ``LashSession``) on both stores."""

from __future__ import annotations

import asyncio
import sys

import pytest

from lash_core.commands import RefreshToolCatalog, ResetSession
from lash_core.engine.reports import TurnReport
from lash_core.errors import InvalidRequest, SessionBusy
from lash_core.events import DurableEvent, TurnActivity
from lash_core.inputs import CancelOutcomeKind, InputIdTarget, SourceKeyTarget
from lash_core.leases import Acquired
from lash_core.observe import SessionObservation
from lash_core.outcomes import Finished, Stopped
from lash_core.session import LashCore, ParkedSession
from lash_core.store.base import Residency, Store
from tests.engine.support import agent, new_session_id, owner, wait_until


def texts(nodes: list) -> list[str]:  # type: ignore[type-arg]
    return [n.text for n in nodes]


async def test_run_turn_is_durable_and_exactly_once(store: Store) -> None:
    core = LashCore(store, agent())
    session = await core.open(new_session_id())
    report = await session.run_turn("hello", id="msg-1")
    assert isinstance(report.outcome, Finished) and not report.replayed
    assert texts(await session.transcript()) == ["hello", "echo: hello"]
    # The same host id again: admitted once, run once; the original turn is reported.
    again = await session.run_turn("hello", id="msg-1")
    assert again.turn_id == report.turn_id and again.replayed
    assert texts(await session.transcript()) == ["hello", "echo: hello"]
    record = (await store.list_inputs(session.session_id))[0]
    assert record.source_key == "host:msg-1"


async def test_stream_turn_yields_activity_then_the_report(store: Store) -> None:
    core = LashCore(store, agent(delay_ms=50))
    session = await core.open(new_session_id())
    items = [item async for item in session.stream_turn("stream me please")]
    assert isinstance(items[-1], TurnReport)
    deltas = [i for i in items[:-1] if isinstance(i, TurnActivity)]
    assert deltas and all(d.activity.kind == "text_delta" for d in deltas)
    assert "".join(d.activity.text for d in deltas) == "echo: stream me please"  # type: ignore[union-attr]


async def test_steering_a_streaming_turn_through_the_facade(store: Store) -> None:
    core = LashCore(store, agent(delay_ms=400))
    session = await core.open(new_session_id())
    task = asyncio.create_task(session.run_turn("first"))

    async def running() -> bool:
        return await session.running_turn_id() is not None

    await wait_until(running)
    steering = await session.steer("and also")
    report = await asyncio.wait_for(task, 20)
    assert steering.record.input_id in report.input_ids
    assert texts(await session.transcript())[-2:] == ["and also", "echo: and also"]


async def test_leaving_a_stream_early_cancels_the_turn(store: Store) -> None:
    core = LashCore(store, agent(delay_ms=5000))
    session = await core.open(new_session_id())
    stream = session.stream_turn("a b c d e f g h i j k l m n o p")
    first = await stream.__anext__()
    assert isinstance(first, TurnActivity)
    await stream.aclose()
    observed = await session.observe()
    committed = [
        e
        for e in (
            await session.events_after(observed.cursor.replace(f":{observed.last_seq}:", ":0:"))
        ).events
        if e.type == "turn.committed"
    ]
    assert len(committed) == 1
    outcome = committed[0].payload.outcome  # type: ignore[union-attr]
    assert isinstance(outcome, Stopped) and outcome.stop == "cancelled"


async def test_cancel_running_turns_counts_and_stops(store: Store) -> None:
    core = LashCore(store, agent(delay_ms=8000))
    session = await core.open(new_session_id())
    assert session.cancel_running_turns() == 0
    task = asyncio.create_task(session.run_turn("slow"))

    async def running() -> bool:
        return session.session_id in core.driver.running()

    await wait_until(running)
    assert session.cancel_running_turns("stop") == 1
    report = await asyncio.wait_for(task, 2)
    assert isinstance(report.outcome, Stopped) and report.outcome.stop == "cancelled"


@pytest.mark.parametrize("residency", [Residency.FULL, Residency.ACTIVE_PATH])
async def test_park_and_resume_round_trip_a_long_session(
    store: Store, residency: Residency
) -> None:
    core = LashCore(store, agent())
    session = await core.open(new_session_id(), residency=residency)
    for i in range(50):
        await session.run_turn(f"turn {i}")
    before = texts(await session.transcript())
    assert len(before) == 100
    parked = await session.park()
    assert isinstance(parked, ParkedSession) and parked.residency is residency
    assert sys.getsizeof(parked.model_dump_json()) < 500  # nothing of the transcript
    with pytest.raises(InvalidRequest):
        await session.transcript()
    resumed = await core.resume(parked)
    assert texts(await resumed.transcript()) == before
    await resumed.run_turn("after resume")
    assert texts(await resumed.transcript())[-2:] == ["after resume", "echo: after resume"]
    assert len(texts(await resumed.transcript())) == 102


async def test_open_fresh_replaces_the_graph_on_the_next_commit(store: Store) -> None:
    core = LashCore(store, agent())
    sid = new_session_id()
    old = await core.open(sid)
    await old.run_turn("old history")
    fresh = await core.open_fresh(sid)
    assert await fresh.transcript() == []
    await fresh.run_turn("new start")
    assert texts(await fresh.transcript()) == ["new start", "echo: new start"]
    reopened = await core.open(sid)
    assert texts(await reopened.transcript()) == ["new start", "echo: new start"]


async def test_open_with_state_checks_the_session_and_seeds_the_transcript(store: Store) -> None:
    core = LashCore(store, agent())
    donor = await core.open(new_session_id())
    await donor.run_turn("seed")
    state = await donor.state()
    with pytest.raises(InvalidRequest):
        await core.open_with_state(new_session_id(), state)
    target_id = new_session_id()
    seeded = await core.open_with_state(
        target_id, state.model_copy(update={"session_id": target_id})
    )
    assert texts(await seeded.transcript()) == ["seed", "echo: seed"]
    # Parking flushes the never-committed replacement.
    await seeded.park()
    reopened = await core.open(target_id)
    assert texts(await reopened.transcript()) == ["seed", "echo: seed"]
    await reopened.run_turn("more")
    assert texts(await reopened.transcript()) == ["seed", "echo: seed", "more", "echo: more"]


async def test_delete_takes_the_lease_and_never_removes_a_live_holder(store: Store) -> None:
    core = LashCore(store, agent())
    session = await core.open(new_session_id())
    await session.run_turn("to be deleted")
    other = owner("other")
    held = await store.try_claim_lease(session.session_id, other, 30_000)
    assert isinstance(held, Acquired)
    with pytest.raises(SessionBusy):
        await session.delete()
    lease = await store.read_lease(session.session_id)
    assert lease is not None and lease.lease_token == held.lease.lease_token
    await store.release_lease(held.lease.fence())
    await session.delete()
    state = await store.load_state(session.session_id)
    assert not state.exists and state.nodes == []


async def test_pending_input_levers(store: Store) -> None:
    core = LashCore(store, agent())
    session = await core.open(new_session_id())
    for i in range(5):
        await session.enqueue(f"q{i}", id=f"q{i}")
    assert [p.source_key for p in await session.pending_inputs()] == [
        f"host:q{i}" for i in range(5)
    ]
    single = await session.cancel_pending_input((await session.pending_inputs())[0].input_id)
    assert single.outcome is CancelOutcomeKind.CANCELLED
    bulk = await session.cancel_pending_inputs(
        [SourceKeyTarget(value="host:q1"), SourceKeyTarget(value="host:q1")]
    )
    assert [r.outcome for r in bulk] == [
        CancelOutcomeKind.CANCELLED,
        CancelOutcomeKind.ALREADY_CANCELLED,
    ]
    suffix = await session.cancel_pending_input_suffix(SourceKeyTarget(value="host:q4"))
    assert suffix.anchor_found and [r.outcome for r in suffix.results] == [
        CancelOutcomeKind.CANCELLED
    ]
    report = await session.drain()
    assert len(report.turns) == 1 and len(report.turns[0].input_ids) == 2
    assert texts(await session.transcript())[:2] == ["q2", "q3"]
    missing = await session.cancel_pending_inputs([InputIdTarget(value="nope")])
    assert missing[0].outcome is CancelOutcomeKind.NOT_FOUND


async def test_session_commands_through_the_facade(store: Store) -> None:
    core = LashCore(store, agent())
    session = await core.open(new_session_id())
    await session.run_turn("remember me")
    cmd = await session.enqueue_command(ResetSession(reason="fresh"), idempotency_key="reset-1")
    dup = await session.enqueue_command(ResetSession(reason="fresh"), idempotency_key="reset-1")
    assert dup.status.value == "duplicate" and dup.command.batch_id == cmd.command.batch_id
    refresh = await session.enqueue_command(RefreshToolCatalog(), idempotency_key="r2")
    assert [c.batch_id for c in await session.queued_work()] == [
        cmd.command.batch_id,
        refresh.command.batch_id,
    ]
    cancelled = await session.cancel_queued_work(refresh.command.batch_id)
    assert cancelled is not None
    await session.run_turn("after reset")  # applies the leading reset first
    assert texts(await session.transcript()) == ["after reset", "echo: after reset"]
    assert await session.queued_work() == []


async def test_run_turn_waits_for_another_owner_holding_the_session(store: Store) -> None:
    busy_core = LashCore(store, agent(delay_ms=600))
    waiting_core = LashCore(store, agent())
    sid = new_session_id()
    holder = await busy_core.open(sid)
    first = asyncio.create_task(holder.run_turn("first"))

    async def running() -> bool:
        return sid in busy_core.driver.running()

    await wait_until(running)
    waiter = await waiting_core.open(sid)
    report = await asyncio.wait_for(waiter.run_turn("second"), 20)
    await first
    assert isinstance(report.outcome, Finished)
    assert texts(await waiter.transcript()) == ["first", "echo: first", "second", "echo: second"]


async def test_usage_and_observation(store: Store) -> None:
    core = LashCore(store, agent())
    session = await core.open(new_session_id())
    await session.run_turn("count these words")
    usage = await session.usage()
    assert usage.output_tokens > 0
    observation = await session.observe()
    assert observation.view.head_revision >= 1 and observation.last_seq >= 3
    page = await session.events_after(observation.cursor)
    assert page.events == []
    with pytest.raises(InvalidRequest):
        await session.events_after("garbage")

    seen: list[DurableEvent | SessionObservation] = []

    async def follow() -> None:
        async for item in session.subscribe(observation.cursor, poll_interval_s=0.2):
            seen.append(item)
            if isinstance(item, DurableEvent) and item.type == "turn.committed":
                return

    follower = asyncio.create_task(follow())
    await session.run_turn("more")
    await asyncio.wait_for(follower, 10)
    types = [i.type for i in seen if isinstance(i, DurableEvent)]
    assert types[0] == "input.admitted" and types[-1] == "turn.committed"
    assert [i.seq for i in seen if isinstance(i, DurableEvent)] == list(
        range(observation.last_seq + 1, observation.last_seq + 1 + len(types))
    )


async def test_subscription_recovers_from_a_gap_with_a_fresh_observation(store: Store) -> None:
    core = LashCore(store, agent())
    session = await core.open(new_session_id())
    await session.run_turn("old")
    events = (await store.events_after(session.session_id, 0)).events
    await store.mark_published(events)
    await store.vacuum(0, session.session_id)
    subscription = session.subscribe("lashsc1:0:0:" + session.session_id, poll_interval_s=0.2)
    first = await asyncio.wait_for(subscription.__anext__(), 5)
    assert isinstance(first, SessionObservation)
    assert first.last_seq == events[-1].seq
    assert texts(first.view.messages) == ["old", "echo: old"]
    await subscription.aclose()  # type: ignore[attr-defined]


async def test_delete_while_this_core_runs_a_turn_is_busy(store: Store) -> None:
    core = LashCore(store, agent(delay_ms=600))
    session = await core.open(new_session_id())
    task = asyncio.create_task(session.run_turn("slow"))

    async def running() -> bool:
        return session.session_id in core.driver.running()

    await wait_until(running)
    with pytest.raises(SessionBusy):
        await core.delete_session(session.session_id)
    with pytest.raises(InvalidRequest):
        await session.park()
    await asyncio.wait_for(task, 10)
    await session.delete()
    assert not (await store.load_state(session.session_id)).exists
