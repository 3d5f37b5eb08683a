"""The dispatcher's wake-up costs: ``work`` notifications are checked in batches, never
one query per notification, and sessions whose lease is live elsewhere are left alone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest

from consumer.dispatch import Dispatcher
from lash_core.engine import SessionDriver
from lash_core.inputs import TextItem, TurnInput, TurnInputDraft
from lash_core.store.base import Notification
from lash_core.store.memory import InMemoryStore
from tests.engine.support import agent, owner, wait_until


class CountingStore(InMemoryStore):
    """Counts orphaned-work queries: full sweeps and notification checks separately."""

    def __init__(self) -> None:
        super().__init__()
        self.full_sweeps = 0
        self.checks: list[set[str]] = []

    async def sessions_with_orphaned_work(
        self, limit: int = 100, *, among: Collection[str] | None = None
    ) -> list[str]:
        if among is None:
            self.full_sweeps += 1
        else:
            self.checks.append(set(among))
        return await super().sessions_with_orphaned_work(limit, among=among)


@pytest.fixture
async def running() -> AsyncIterator[tuple[CountingStore, Dispatcher]]:
    store = CountingStore()
    driver = SessionDriver(store, agent(), owner("w1"))
    dispatcher = Dispatcher(
        driver, store, concurrency=8, sweep_interval_s=60.0, notify_delay_s=0.05
    )
    sweeper = asyncio.create_task(dispatcher.run_sweeper())
    try:
        await wait_until(lambda: _true(store.full_sweeps == 1))
        yield store, dispatcher
    finally:
        await dispatcher.shutdown(1.0)
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper


async def _true(value: bool) -> bool:
    return value


async def admit(store: InMemoryStore, session_id: str) -> None:
    await store.enqueue_input(
        TurnInputDraft(session_id=session_id, input=TurnInput(items=[TextItem(text="hi")]))
    )


def work(session_id: str) -> Notification:
    return Notification(kind="work", session_id=session_id)


async def test_a_burst_of_notifications_costs_a_few_batched_checks(
    running: tuple[CountingStore, Dispatcher],
) -> None:
    store, dispatcher = running
    sessions = [f"burst-{i}" for i in range(50)]
    for sid in sessions:
        await admit(store, sid)
    for _ in range(3):  # every worker hears every notification, repeatedly
        for sid in sessions:
            dispatcher.on_notification(work(sid))

    async def drained() -> bool:
        return not await InMemoryStore.sessions_with_orphaned_work(store, 1000)

    await wait_until(drained)
    await wait_until(lambda: _true(dispatcher.turns == len(sessions)))
    # 150 notifications, 50 sessions, 8 slots: a check per round of free slots, no more.
    assert len(store.checks) <= 50 // 8 + 3, store.checks
    assert set().union(*store.checks) == set(sessions)
    assert store.full_sweeps == 1  # only the start-up sweep


async def test_notified_sessions_leased_elsewhere_are_not_drained(
    running: tuple[CountingStore, Dispatcher],
) -> None:
    store, dispatcher = running
    await admit(store, "held")
    claim = await store.try_claim_lease("held", owner("other"), 60_000)
    assert claim.lease is not None
    dispatcher.on_notification(work("held"))
    await wait_until(lambda: _true(len(store.checks) == 1))
    await asyncio.sleep(0.1)
    assert dispatcher.drains == 0
    assert dispatcher.draining_sessions == set()


async def test_admission_kicks_drain_without_any_query(
    running: tuple[CountingStore, Dispatcher],
) -> None:
    store, dispatcher = running
    await admit(store, "kicked")
    dispatcher.kick("kicked")
    await wait_until(lambda: _true(dispatcher.turns == 1))
    # The worker's own notification of that admission arrives after the drain started.
    dispatcher.on_notification(work("kicked"))
    await wait_until(lambda: _true(len(store.checks) == 1))
    await asyncio.sleep(0.1)
    assert dispatcher.drains == 1 and dispatcher.turns == 1


async def second_queued_behind_first(store: CountingStore) -> Dispatcher:
    """A one-slot dispatcher draining "first", with "second" (both admitted) queued."""
    dispatcher = Dispatcher(
        SessionDriver(store, agent(), owner("w1")), store, concurrency=1, sweep_interval_s=60.0
    )
    await admit(store, "first")
    await admit(store, "second")
    dispatcher.kick("first")
    dispatcher.kick("second")
    return dispatcher


async def test_a_drain_that_waited_for_a_slot_runs_without_asking_first() -> None:
    """Kicks carry evidence of work: a queued drain does not query before it runs; one whose
    work went finds nothing in its (only-if-work) acquisition and takes no lease."""
    store = CountingStore()
    dispatcher = await second_queued_behind_first(store)
    dispatcher.kick("nothing")  # queued too, and has no work: an idle drain
    await wait_until(lambda: _true(dispatcher.draining_sessions == set()))
    assert dispatcher.turns == 2
    assert dispatcher.drains == 3
    assert dispatcher.probes == 0
    assert store.checks == []
    assert await store.read_lease("nothing") is None
    await dispatcher.shutdown(1.0)


class GatedStore(CountingStore):
    """Holds the first acquisition of ``gated`` until ``gate`` is set."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated = gated
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def acquire_and_start_turn(self, session_id: str, *args: Any, **kwargs: Any) -> Any:
        if session_id == self.gated and not self.entered.is_set():
            self.entered.set()
            await self.gate.wait()
        return await super().acquire_and_start_turn(session_id, *args, **kwargs)


async def test_kicks_while_a_drain_waits_for_its_slot_cost_no_extra_round() -> None:
    """Admission kicks after its commit, and a queued drain reads after it takes its slot,
    so more input for a session whose drain is still queued needs no further round (no
    orphaned-work probe); the drain takes all of it in one turn."""
    store = GatedStore("first")
    dispatcher = await second_queued_behind_first(store)
    await store.entered.wait()  # "first" holds the only slot; "second" waits for it
    await admit(store, "second")
    dispatcher.kick("second")
    store.gate.set()
    await wait_until(lambda: _true(dispatcher.draining_sessions == set()))
    assert dispatcher.probes == 0
    assert dispatcher.drains == 2
    assert dispatcher.turns == 2
    assert not await InMemoryStore.sessions_with_orphaned_work(store, 10)
    await dispatcher.shutdown(1.0)


async def test_work_left_for_this_publisher_is_drained_at_once_without_a_check() -> None:
    """A ``for_publisher`` notification of a session whose events this worker publishes is
    drained at once, with no check query and no delay (here a minute long); the same
    notification of a session published elsewhere, and plain ``work``, wait for the check."""
    store = CountingStore()
    dispatcher = Dispatcher(
        SessionDriver(store, agent(), owner("w1")),
        store,
        concurrency=8,
        sweep_interval_s=120.0,
        notify_delay_s=60.0,
        runs_here=lambda sid: sid.startswith("mine"),
    )
    for sid in ("mine", "theirs", "mine-plain"):
        await admit(store, sid)
    dispatcher.on_notification(Notification(kind="work", session_id="mine", for_publisher=True))
    dispatcher.on_notification(Notification(kind="work", session_id="theirs", for_publisher=True))
    dispatcher.on_notification(work("mine-plain"))
    try:
        await wait_until(lambda: _true(dispatcher.turns == 1))
        assert dispatcher.handoffs == 1
        assert store.checks == [] and store.full_sweeps == 0
        assert dispatcher.draining_sessions <= {"mine"}
        assert set(await store.sessions_with_orphaned_work(10)) == {"theirs", "mine-plain"}
    finally:
        await dispatcher.shutdown(1.0)
