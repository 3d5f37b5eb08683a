"""Admission wakes a drain only when no live lease holder will see the input anyway:
one lease attempt saved per input admitted to a session that is already draining."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from consumer import wire
from consumer.admission import Admission
from lash_core.inputs import InputIdTarget, TextItem, TurnInput
from lash_core.leases import (
    LeaseOwner,
    LocalProcessLiveness,
    local_process_owner,
    read_process_start,
)
from lash_core.store.base import Store
from lash_core.store.postgres import PostgresStore

pytestmark = [pytest.mark.postgres]


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    pg = PostgresStore(db_url, pool_size=2)
    await pg.start()
    try:
        yield pg
    finally:
        await pg.close()


def submit(session_id: str, text: str) -> wire.SubmitMessage:
    return wire.SubmitMessage(
        session_id=session_id, source_key=text, input=TurnInput(items=[TextItem(text=text)])
    )


def dead_owner(name: str) -> LeaseOwner:
    me = local_process_owner(name, f"{name}-inc")
    assert isinstance(me.liveness, LocalProcessLiveness)
    start = (read_process_start(os.getpid()) or 0) + 987_654
    return LeaseOwner(
        owner_id=name,
        incarnation_id=f"{name}-dead",
        liveness=me.liveness.model_copy(update={"process_start": start}),
    )


async def test_input_wakes_a_drain_only_without_a_live_holder(store: Store) -> None:
    kicked: list[str] = []
    me = local_process_owner("me", "me-inc")
    admission = Admission(store, on_work=kicked.append, owner=me)

    await admission.handle(submit("free", "a"), None)
    assert kicked == ["free"]

    other = local_process_owner("other", "other-inc")  # this very process: alive
    assert (await store.try_claim_lease("held", other, 60_000)).lease is not None
    receipt = await admission.handle(submit("held", "b"), None)
    assert isinstance(receipt, wire.Receipt) and receipt.status is wire.ReceiptStatus.ADMITTED
    assert kicked == ["free"]  # the live holder drains it

    assert (await store.try_claim_lease("orphan", dead_owner("gone"), 60_000)).lease is not None
    await admission.handle(submit("orphan", "c"), None)
    assert kicked == ["free", "orphan"]  # a provably dead holder: take over now


async def test_without_an_owner_admission_always_wakes(store: Store) -> None:
    kicked: list[str] = []
    admission = Admission(store, on_work=kicked.append)
    other = local_process_owner("other", "other-inc")
    assert (await store.try_claim_lease("held2", other, 60_000)).lease is not None
    await admission.handle(submit("held2", "x"), None)
    assert kicked == ["held2"]


async def test_input_queued_behind_open_input_wakes_no_second_drain(store: Store) -> None:
    """With no live holder, the drain woken for a session's open input claims what is
    admitted behind it: a second wake-up would race it for the lease and find nothing."""
    kicked: list[str] = []
    admission = Admission(store, on_work=kicked.append, owner=local_process_owner("me", "i"))

    await admission.handle(submit("queue", "a"), None)
    await admission.handle(submit("queue", "b"), None)
    assert kicked == ["queue"]
    outcomes = await admission.submit_many(
        [(submit("queue", "c"), None), (submit("new", "d"), None)]
    )
    assert all(isinstance(o, wire.Receipt) for o in outcomes)
    assert kicked == ["queue", "new"]

    # Once nothing is open, the next input wakes a drain again.
    pending = await store.list_pending_inputs("queue")
    await store.cancel_inputs("queue", [InputIdTarget(value=p.input_id) for p in pending])
    await admission.handle(submit("queue", "e"), None)
    assert kicked == ["queue", "new", "queue"]


class _Publisher:
    """This process's outbox relay, as the store sees it: it publishes ``mine`` only."""

    def __init__(self, *mine: str) -> None:
        self.mine = set(mine)

    def publishes(self, session_id: str) -> bool:
        return session_id in self.mine

    def wake(self) -> None:
        pass

    def committed(self, events: object) -> None:
        pass


async def test_input_of_a_session_published_elsewhere_wakes_no_drain_here(store: Store) -> None:
    """A session's turns run where its events are published: the admitter of another
    worker's session leaves it to that worker (its notification says so), one by one and
    in a batch; its own sessions it wakes as before, and a dead holder's it still takes
    over (only it knows that holder is dead)."""
    kicked: list[str] = []
    admission = Admission(store, on_work=kicked.append, owner=local_process_owner("me", "i"))
    store.set_local_publisher(_Publisher("mine", "orphaned"))
    try:
        await admission.handle(submit("theirs", "a"), None)
        await admission.submit_many([(submit("theirs-2", "b"), None), (submit("mine", "c"), None)])
        assert kicked == ["mine"]

        assert (await store.try_claim_lease("dead", dead_owner("me"), 60_000)).lease is not None
        await admission.handle(submit("dead", "d"), None)
        assert kicked == ["mine", "dead"]
    finally:
        store.set_local_publisher(None)
