"""Steering, cancellation, lease loss and session commands while turns run, on both stores."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from lash_core.commands import CommandDraft, RefreshToolCatalog, ResetSession
from lash_core.commit import CommitResult, RuntimeCommit
from lash_core.engine.driver import SessionDriver
from lash_core.inputs import (
    ActiveTurnIngress,
    InputState,
    NextTurnIngress,
    TextItem,
    TurnInput,
    TurnInputDraft,
)
from lash_core.leases import Acquired, LeaseOwner
from lash_core.outcomes import Stopped
from lash_core.store.base import Residency, Store
from lash_core.transcript import active_path
from tests.engine.support import agent, new_session_id, owner, wait_until
from tests.engine.test_turns import LoopingProvider, admit, committed_events, transcript


async def steer(
    store: Store, sid: str, turn_id: str, text: str, boundary: Any = "after_work"
) -> str:
    adm = await store.enqueue_input(
        TurnInputDraft(
            session_id=sid,
            ingress=ActiveTurnIngress(turn_id=turn_id, min_boundary=boundary),
            input=TurnInput(items=[TextItem(text=text)]),
        )
    )
    return adm.record.input_id


async def running_turn(driver: SessionDriver, sid: str) -> str:
    async def running() -> bool:
        return sid in driver.running()

    await wait_until(running, timeout_s=10)
    return driver.running()[sid]


async def assert_each_input_once(store: Store, sid: str) -> None:
    """Every admitted input is completed, in exactly one committed turn, with one message."""
    records = await store.list_inputs(sid)
    events = await committed_events(store, sid)
    state = await store.load_state(sid, Residency.FULL)
    for record in records:
        assert record.state is InputState.COMPLETED, record
        assert sum(record.input_id in e.input_ids for e in events) == 1
        assert sum(record.input_id in n.input_ids for n in state.nodes) == 1


async def test_steering_during_a_slow_turn_is_accepted_at_a_checkpoint(store: Store) -> None:
    sid = new_session_id()
    first = await admit(store, sid, "first")
    driver = SessionDriver(store, agent(delay_ms=400), owner("w1"))
    drain = asyncio.create_task(driver.drain(sid))
    turn_id = await running_turn(driver, sid)
    steering = await steer(store, sid, turn_id, "also this")
    report = await asyncio.wait_for(drain, 20)

    assert len(report.turns) == 1
    turn = report.turns[0]
    assert turn.input_ids == [first, steering]
    # The echo model answers the newest user text after its previous answer.
    assert turn.outcome.finish.text == "echo: also this"  # type: ignore[union-attr]
    assert await transcript(store, sid) == [
        ("user", "first"),
        ("assistant", "echo: first"),
        ("user", "also this"),
        ("assistant", "echo: also this"),
    ]
    assert "input.accepted" in [e.type for e in (await store.events_after(sid, 0)).events]
    await assert_each_input_once(store, sid)


class SteerAtCommit:
    """Delegates to a store, admitting steering input just before the first final commit
    (after the turn's last model call) and recording the commits it passes on."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.steered: list[str] = []
        self.commits: list[RuntimeCommit] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def commit(self, commit: RuntimeCommit) -> CommitResult:
        if commit.turn is not None and not self.steered:
            self.steered.append(
                await steer(self._inner, commit.session_id, commit.turn.turn_id, "late")
            )
        self.commits.append(commit)
        return await self._inner.commit(commit)


async def test_steering_before_the_final_commit_is_taken_into_the_turn(store: Store) -> None:
    """A finished turn leaves its last checkpoint to the final commit: steering admitted
    after the last model call makes that commit write nothing and the turn go on."""
    sid = new_session_id()
    first = await admit(store, sid, "first")
    proxy = SteerAtCommit(store)
    driver = SessionDriver(proxy, agent(), owner("w1"))  # type: ignore[arg-type]
    report = await driver.drain(sid)
    (late,) = proxy.steered
    assert len(report.turns) == 1
    assert report.turns[0].input_ids == [first, late]
    assert report.turns[0].deferred_input_ids == []
    assert report.turns[0].outcome.finish.text == "echo: late"  # type: ignore[union-attr]
    assert [c.steering_checkpoint for c in proxy.commits] == [
        "before_completion",
        "before_completion",
    ]
    assert await transcript(store, sid) == [
        ("user", "first"),
        ("assistant", "echo: first"),
        ("user", "late"),
        ("assistant", "echo: late"),
    ]
    events = [e.type for e in (await store.events_after(sid, 0)).events]
    assert events.count("turn.committed") == 1 and "input.accepted" in events
    await assert_each_input_once(store, sid)


async def test_steering_at_the_final_commit_of_a_stopped_turn_is_deferred(store: Store) -> None:
    """A turn that stops (here: out of model calls) has no checkpoint left: steering
    admitted before its final commit is deferred to the next turn, not lost."""
    sid = new_session_id()
    await admit(store, sid, "loop")
    proxy = SteerAtCommit(store)
    looping = agent(provider=LoopingProvider(), max_iterations=2)
    driver = SessionDriver(proxy, looping, owner("w1"))  # type: ignore[arg-type]
    report = await driver.drain(sid)
    (late,) = proxy.steered
    first = report.turns[0]
    assert isinstance(first.outcome, Stopped) and first.outcome.stop == "max_turns"
    assert first.deferred_input_ids == [late]
    assert proxy.commits[0].steering_checkpoint is None
    # The same drain looks again after its commit and runs the deferred input.
    assert len(report.turns) == 2 and report.turns[1].input_ids == [late]
    await assert_each_input_once(store, sid)


async def test_steering_stress_never_loses_or_duplicates_input(store: Store) -> None:
    sid = new_session_id()
    rng = random.Random(7)
    await admit(store, sid, '/tool sleep {"seconds": 0.05}')
    driver = SessionDriver(store, agent(delay_ms=60), owner("w1"))
    drain = asyncio.create_task(driver.drain(sid))
    sent = 0
    for i in range(12):
        current = driver.running().get(sid)
        if current is not None:
            boundary = rng.choice(["after_work", "before_completion"])
            await steer(store, sid, current, f"steer {i}", boundary)
        else:
            await admit(store, sid, f"follow {i}")
        sent += 1
        await asyncio.sleep(rng.uniform(0.0, 0.05))
    await asyncio.wait_for(drain, 30)
    await driver.drain(sid)  # whatever arrived after the first drain finished
    assert len(await store.list_inputs(sid)) == sent + 1
    await assert_each_input_once(store, sid)


async def test_cancel_ends_a_slow_turn_within_a_second(store: Store) -> None:
    sid = new_session_id()
    input_id = await admit(store, sid, "a long answer " * 20)
    driver = SessionDriver(store, agent(delay_ms=8000), owner("w1"))
    drain = asyncio.create_task(driver.drain(sid))
    turn_id = await running_turn(driver, sid)
    await asyncio.sleep(0.3)  # let some text stream
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert driver.cancel(sid, turn_id, reason="user pressed stop")
    report = await asyncio.wait_for(drain, 5)
    elapsed = loop.time() - started
    assert elapsed < 1.0, elapsed
    outcome = report.turns[0].outcome
    assert isinstance(outcome, Stopped) and outcome.stop == "cancelled"
    assert outcome.message == "user pressed stop"
    record = await store.get_input(sid, input_id)
    assert record is not None and record.state is InputState.COMPLETED
    roles = [r for r, _ in await transcript(store, sid)]
    assert roles[0] == "user"  # plus the partial answer streamed so far, if any
    assert not driver.cancel(sid)  # nothing runs any more


async def test_cancel_via_the_store_reaches_the_turn_at_renewal(store: Store) -> None:
    sid = new_session_id()
    await admit(store, sid, "slow")
    driver = SessionDriver(store, agent(delay_ms=8000), owner("w1"), lease_ttl_ms=900)
    drain = asyncio.create_task(driver.drain(sid))
    turn_id = await running_turn(driver, sid)
    assert await store.request_turn_cancel(sid, turn_id, "fleet cancel") == turn_id
    report = await asyncio.wait_for(drain, 5)
    outcome = report.turns[0].outcome
    assert isinstance(outcome, Stopped) and outcome.stop == "cancelled"


async def test_cancelling_the_drain_task_commits_the_turn_as_cancelled(store: Store) -> None:
    sid = new_session_id()
    input_id = await admit(store, sid, "slow")
    driver = SessionDriver(store, agent(delay_ms=8000), owner("w1"))
    drain = asyncio.create_task(driver.drain(sid))
    await running_turn(driver, sid)
    drain.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(drain, 5)
    events = await committed_events(store, sid)
    assert len(events) == 1 and isinstance(events[0].outcome, Stopped)
    assert events[0].outcome.stop == "cancelled" and events[0].input_ids == [input_id]
    lease = await store.read_lease(sid)
    assert lease is not None and lease.lease_token is None


async def test_a_turn_outliving_its_ttl_is_kept_alive_by_renewal(store: Store) -> None:
    sid = new_session_id()
    await admit(store, sid, "slow but alive")
    driver = SessionDriver(store, agent(delay_ms=1500), owner("w1"), lease_ttl_ms=600)
    report = await asyncio.wait_for(driver.drain(sid), 20)
    assert not report.lease_lost and len(report.turns) == 1


async def test_a_stolen_lease_commits_nothing_and_the_next_generation_completes(
    store: Store,
) -> None:
    sid = new_session_id()
    input_id = await admit(store, sid, "contested")
    victim = SessionDriver(store, agent(delay_ms=1000), owner("victim"))
    drain = asyncio.create_task(victim.drain(sid))
    await running_turn(victim, sid)
    holder = await store.read_lease(sid)
    assert holder is not None and holder.lease_token is not None
    thief: LeaseOwner = owner("thief")
    taken = await store.reclaim_lease(
        sid, thief, holder.as_lease().fence(), 30_000, lambda _h, _c: True
    )
    assert isinstance(taken, Acquired) and taken.lease.fencing_token == holder.fencing_token + 1

    report = await asyncio.wait_for(drain, 10)
    assert report.lease_lost and report.turns == []
    assert await committed_events(store, sid) == []

    successor = SessionDriver(store, agent(), thief)
    report = await successor.drain(sid)
    assert report.acquired and len(report.turns) == 1
    assert report.turns[0].input_ids == [input_id]
    assert report.turns[0].lease_generation == taken.lease.fencing_token
    await assert_each_input_once(store, sid)


async def test_a_busy_session_is_not_drained_by_another_owner(store: Store) -> None:
    sid = new_session_id()
    await admit(store, sid, "x")
    first = SessionDriver(store, agent(delay_ms=500), owner("a"))
    second = SessionDriver(store, agent(), owner("b"))
    drain = asyncio.create_task(first.drain(sid))
    await running_turn(first, sid)
    busy = await second.drain(sid)
    assert not busy.acquired and busy.turns == []
    # A second drain call in the same process is absorbed by the running one.
    assert not (await first.drain(sid)).acquired
    await admit(store, sid, "y")
    report = await asyncio.wait_for(drain, 10)
    assert sum(len(t.input_ids) for t in report.turns) == 2
    await assert_each_input_once(store, sid)


async def test_session_commands_apply_before_later_input(store: Store) -> None:
    sid = new_session_id()
    driver = SessionDriver(store, agent(), owner("w1"))
    await admit(store, sid, "before")
    await store.enqueue_command(
        CommandDraft(session_id=sid, idempotency_key="r1", command=ResetSession(reason="clear"))
    )
    await admit(store, sid, "after")
    await store.enqueue_command(
        CommandDraft(session_id=sid, idempotency_key="t1", command=RefreshToolCatalog())
    )
    report = await driver.drain(sid)
    assert report.commands_applied == 2
    assert [t.input_ids.__len__() for t in report.turns] == [1, 1]
    # The reset ran after "before" and before "after": only the later turn survives.
    assert await transcript(store, sid) == [("user", "after"), ("assistant", "echo: after")]
    state = await store.load_state(sid)
    assert state.checkpoint is not None
    assert state.checkpoint["tool_catalog_hash"] == driver.agent.tools.catalog_hash()
    types = [e.type for e in (await store.events_after(sid, 0)).events]
    applied = [i for i, t in enumerate(types) if t == "session.command_applied"]
    committed = [i for i, t in enumerate(types) if t == "turn.committed"]
    assert committed[0] < applied[0] < committed[1] < applied[1]
    assert await store.list_commands(sid, pending_only=True) == []


async def test_idle_steering_for_a_finished_turn_becomes_next_turn_input(store: Store) -> None:
    sid = new_session_id()
    driver = SessionDriver(store, agent(), owner("w1"))
    await admit(store, sid, "one")
    first = (await driver.drain(sid)).turns[0]
    adm = await store.enqueue_input(
        TurnInputDraft(
            session_id=sid,
            ingress=ActiveTurnIngress(turn_id=first.turn_id),
            input=TurnInput(items=[TextItem(text="too late")]),
        )
    )
    assert isinstance(adm.record.ingress, NextTurnIngress)
    report = await driver.drain(sid)
    assert report.turns[0].input_ids == [adm.record.input_id]
    state = await store.load_state(sid)
    assert [n.text for n in active_path(state.nodes, state.leaf_node_id)][-2:] == [
        "too late",
        "echo: too late",
    ]
