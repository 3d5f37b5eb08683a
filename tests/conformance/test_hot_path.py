"""HP: the turn hot path's store rules, on both stores.

- A next-turn claim never takes input admitted after a pending session command: the
  command runs between the input admitted before it and the input admitted after it.
- ``start_turn(turn_id=None)`` names the turn (the claimed input's ``trace_turn_id``, else a
  fresh id) and reports a pending command.
- ``acquire_and_start_turn`` takes the lease and starts the first turn in one call.
- A final commit with ``release_lease_if_idle`` releases the lease only if nothing is left
  to do, and says so; the flag is not part of the commit hash.
"""

from __future__ import annotations

import pytest

from lash_core.inputs import InputState, TextItem, TurnInput, TurnInputDraft
from lash_core.leases import Acquired, Busy
from lash_core.store.base import Store
from lash_core.transcript import GraphReplace
from tests.conformance.conftest import (
    Harness,
    active,
    append,
    command_draft,
    commit,
    draft,
    final,
    lease_for,
    node,
    owner,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

TTL = 60_000


async def test_HP_01_claim_stops_at_a_pending_command(store: Store) -> None:
    """x, command, y: the first turn takes only x; once the command is applied, y."""
    lease = await lease_for(store, "s")
    x = await store.enqueue_input(draft("s", "x"))
    cmd = await store.enqueue_command(command_draft("s", "reset"))
    y = await store.enqueue_input(draft("s", "y"))

    first = await store.start_turn(lease.fence(), "t1")
    assert first is not None and first.claim is not None
    assert [i.input_id for i in first.claim.inputs] == [x.record.input_id]
    assert first.command_pending
    done = await store.commit(
        commit(
            "s",
            lease,
            expected_head_revision=0,
            graph=append(node("u1", "x", turn="t1")),
            turn=final("t1"),
            completed_input_claims=[first.claim.completion()],
            release_lease_if_idle=True,
        )
    )
    assert not done.released and done.command_pending
    # Nothing is claimable until the command has run.
    assert await store.start_turn(lease.fence(), "t-early") is None

    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None and claim.command.batch_id == cmd.command.batch_id
    await store.commit(
        commit(
            "s",
            lease,
            expected_head_revision=1,
            graph=GraphReplace(nodes=[], leaf_node_id=None),
            applied_command=claim.command.command,
            completed_command_claims=[claim.completion()],
        )
    )
    second = await store.start_turn(lease.fence(), "t2")
    assert second is not None and second.claim is not None
    assert [i.input_id for i in second.claim.inputs] == [y.record.input_id]
    assert not second.command_pending


async def test_HP_02_idle_claim_also_stops_at_a_pending_command(store: Store) -> None:
    lease = await lease_for(store, "s")
    x = await store.enqueue_input(draft("s", "x"))
    await store.enqueue_command(command_draft("s", "c"))
    await store.enqueue_input(draft("s", "y"))
    claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert claim is not None
    assert [i.input_id for i in claim.inputs] == [x.record.input_id]


async def test_HP_03_a_leading_command_holds_back_every_input(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.enqueue_command(command_draft("s", "c"))
    await store.enqueue_input(draft("s", "y"))
    assert await store.start_turn(lease.fence(), "t1") is None
    [row] = await store.list_inputs("s")
    assert row.state is InputState.DEFERRED_NEXT_TURN and row.claim is None


async def test_HP_04_claim_respects_max_inputs_and_admission_order(store: Store) -> None:
    lease = await lease_for(store, "s")
    ids = [(await store.enqueue_input(draft("s", f"m{i}"))).record.input_id for i in range(5)]
    first = await store.start_turn(lease.fence(), "t1", max_inputs=2)
    assert first is not None and first.claim is not None
    assert [i.input_id for i in first.claim.inputs] == ids[:2]
    await store.commit(
        commit(
            "s",
            lease,
            turn=final("t1"),
            completed_input_claims=[first.claim.completion()],
        )
    )
    second = await store.start_turn(lease.fence(), "t2", max_inputs=2)
    assert second is not None and second.claim is not None
    assert [i.input_id for i in second.claim.inputs] == ids[2:4]


async def test_HP_05_store_names_the_turn(store: Store) -> None:
    lease = await lease_for(store, "s")
    traced = TurnInputDraft(
        session_id="s", input=TurnInput(items=[TextItem(text="a")], trace_turn_id="trace-1")
    )
    await store.enqueue_input(traced)
    start = await store.start_turn(lease.fence())
    assert start is not None and start.turn_id == "trace-1"
    assert start.event.payload.turn_id == "trace-1"  # type: ignore[union-attr]
    assert (await store.read_lease("s")).running_turn_id == "trace-1"  # type: ignore[union-attr]
    assert start.claim is not None
    await store.commit(
        commit("s", lease, turn=final("trace-1"), completed_input_claims=[start.claim.completion()])
    )
    await store.enqueue_input(draft("s", "plain"))
    again = await store.start_turn(lease.fence())
    assert again is not None and again.turn_id.startswith("turn_")
    assert again.turn_id != "trace-1"


async def test_HP_06_acquire_and_start_turn(store: Store) -> None:
    x = await store.enqueue_input(draft("s", "x"))
    opened = await store.acquire_and_start_turn("s", owner("a"), TTL)
    assert isinstance(opened.lease, Acquired) and not opened.command_pending
    turn = opened.turn
    assert turn is not None and turn.claim is not None
    assert [i.input_id for i in turn.claim.inputs] == [x.record.input_id]
    assert turn.lease_generation == opened.lease.lease.fencing_token
    assert turn.event.type == "turn.started" and turn.event.revision == 0
    lease_row = await store.read_lease("s")
    assert lease_row is not None and lease_row.running_turn_id == turn.turn_id
    assert lease_row.lease_token == opened.lease.lease.lease_token
    # Another owner finds it busy and writes nothing.
    other = await store.acquire_and_start_turn("s", owner("b"), TTL)
    assert isinstance(other.lease, Busy) and other.turn is None
    assert other.lease.holder.lease_token == opened.lease.lease.lease_token


async def test_HP_07_acquire_with_a_leading_command_takes_the_lease_only(store: Store) -> None:
    await store.enqueue_command(command_draft("s", "c"))
    await store.enqueue_input(draft("s", "y"))
    opened = await store.acquire_and_start_turn("s", owner("a"), TTL)
    assert isinstance(opened.lease, Acquired)
    assert opened.turn is None and opened.command_pending
    lease = opened.lease.lease
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None


async def test_HP_07b_a_command_an_expired_tenure_claimed_holds_back_the_next_one(
    harness: Harness,
) -> None:
    """The command was claimed by the previous generation and never completed: the new
    tenure must apply it before any input admitted after it."""
    store = harness.store
    first = await lease_for(store, "s", "a", ttl=harness.short_ttl_ms)
    await store.enqueue_command(command_draft("s", "c"))
    assert await store.claim_leading_command(first.fence(), first.owner) is not None
    await store.enqueue_input(draft("s", "y"))
    await harness.expire(first)
    opened = await store.acquire_and_start_turn("s", owner("b"), TTL)
    assert isinstance(opened.lease, Acquired)
    assert opened.lease.lease.fencing_token == first.fencing_token + 1
    assert opened.turn is None and opened.command_pending
    lease = opened.lease.lease
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None and claim.session_lease_generation == lease.fencing_token


async def test_HP_08_acquire_with_nothing_to_do(store: Store) -> None:
    opened = await store.acquire_and_start_turn("s", owner("a"), TTL)
    assert isinstance(opened.lease, Acquired)
    assert opened.turn is None and not opened.command_pending
    row = await store.read_lease("s")
    assert row is not None and row.lease_token == opened.lease.lease.lease_token
    assert row.running_turn_id is None
    await store.release_lease(opened.lease.lease.fence())


async def test_HP_09_commit_releases_only_an_idle_session(store: Store) -> None:
    await store.enqueue_input(draft("s", "x"))
    opened = await store.acquire_and_start_turn("s", owner("a"), TTL)
    assert isinstance(opened.lease, Acquired) and opened.turn is not None
    lease, start = opened.lease.lease, opened.turn
    assert start.claim is not None
    # Steering input for the running turn is deferred by the commit: work is left.
    steer = await store.enqueue_input(draft("s", "steer", ingress=active(start.turn_id)))
    busy = await store.commit(
        commit(
            "s",
            lease,
            turn=final(start.turn_id),
            completed_input_claims=[start.claim.completion()],
            defer_active_inputs_of_turn=start.turn_id,
            release_lease_if_idle=True,
        )
    )
    assert not busy.released and not busy.command_pending
    assert busy.deferred_input_ids == [steer.record.input_id]
    held = await store.read_lease("s")
    assert held is not None and held.lease_token == lease.lease_token
    assert held.running_turn_id is None

    nxt = await store.start_turn(lease.fence())
    assert nxt is not None and nxt.claim is not None
    assert [i.input_id for i in nxt.claim.inputs] == [steer.record.input_id]
    idle = await store.commit(
        commit(
            "s",
            lease,
            turn=final(nxt.turn_id),
            completed_input_claims=[nxt.claim.completion()],
            defer_active_inputs_of_turn=nxt.turn_id,
            release_lease_if_idle=True,
        )
    )
    assert idle.released and not idle.command_pending
    row = await store.read_lease("s")
    assert row is not None and row.lease_token is None
    assert row.fencing_token == lease.fencing_token
    # The flag is not hashed: the same commit without it replays, and reports the release.
    replay = await store.commit(
        commit(
            "s",
            lease,
            turn=final(nxt.turn_id),
            completed_input_claims=[nxt.claim.completion()],
            defer_active_inputs_of_turn=nxt.turn_id,
        )
    )
    assert replay.replayed and replay.released and replay.head_revision == idle.head_revision


async def test_HP_10_commit_keeps_the_lease_for_input_admitted_during_the_turn(
    store: Store,
) -> None:
    await store.enqueue_input(draft("s", "x"))
    opened = await store.acquire_and_start_turn("s", owner("a"), TTL)
    assert isinstance(opened.lease, Acquired) and opened.turn is not None
    lease, start = opened.lease.lease, opened.turn
    assert start.claim is not None
    await store.enqueue_input(draft("s", "later"))
    result = await store.commit(
        commit(
            "s",
            lease,
            turn=final(start.turn_id),
            completed_input_claims=[start.claim.completion()],
            release_lease_if_idle=True,
        )
    )
    assert not result.released
    row = await store.read_lease("s")
    assert row is not None and row.lease_token == lease.lease_token


async def test_HP_11_commit_keeps_the_lease_for_a_pending_command(store: Store) -> None:
    await store.enqueue_input(draft("s", "x"))
    opened = await store.acquire_and_start_turn("s", owner("a"), TTL)
    assert isinstance(opened.lease, Acquired) and opened.turn is not None
    lease, start = opened.lease.lease, opened.turn
    assert start.claim is not None
    await store.enqueue_command(command_draft("s", "c", reset=False))
    result = await store.commit(
        commit(
            "s",
            lease,
            turn=final(start.turn_id),
            completed_input_claims=[start.claim.completion()],
            release_lease_if_idle=True,
        )
    )
    assert not result.released and result.command_pending
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None
    # Completing the last command in a commit that asks for it leaves the session idle.
    applied = await store.commit(
        commit(
            "s",
            lease,
            applied_command=claim.command.command,
            completed_command_claims=[claim.completion()],
            release_lease_if_idle=True,
        )
    )
    assert applied.released and not applied.command_pending


async def test_HP_08b_only_if_work_leaves_an_idle_session_unleased(harness: Harness) -> None:
    """``only_if_work``: nothing to run -> no lease written, no event, nothing to release;
    a pending command or claimable input -> acquired as usual; a dead generation's
    committed steering input is still settled in that transaction."""
    store = harness.store
    idle = await store.acquire_and_start_turn("s", owner("a"), TTL, only_if_work=True)
    assert idle.idle and idle.lease is None and idle.turn is None
    row = await store.read_lease("s")
    assert row is None or not row.is_live(await store.now_ms())
    assert (await store.events_after("s", 0)).last_seq == 0

    await store.enqueue_command(command_draft("s", "c"))
    with_command = await store.acquire_and_start_turn("s", owner("a"), TTL, only_if_work=True)
    assert isinstance(with_command.lease, Acquired) and with_command.command_pending
    await store.release_lease(with_command.lease.lease.fence())

    # A dead generation accepted steering input whose message it committed: settled, and
    # with nothing else to run the lease stays untaken.
    dead = await lease_for(store, "t", "dead", ttl=harness.short_ttl_ms)
    await store.start_turn(dead.fence(), "t1", require_inputs=False)
    steer = await store.enqueue_input(draft("t", "steer", ingress=active("t1")))
    claim = await store.claim_active_turn_inputs(dead.fence(), dead.owner, "t1", "after_work")
    assert claim is not None
    await store.commit(
        commit("t", dead, graph=append(node(f"m_ingress_{steer.record.input_id}", "steer")))
    )
    await harness.expire(dead)
    settled = await store.acquire_and_start_turn("t", owner("b"), TTL, only_if_work=True)
    assert settled.idle
    record = await store.get_input("t", steer.record.input_id)
    assert record is not None and record.state is InputState.COMPLETED
    assert await store.sessions_with_orphaned_work() == ["s"]  # only the pending command
