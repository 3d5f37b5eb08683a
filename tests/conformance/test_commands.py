"""QW: queued work, which in this port is the session-command lane (conformance-cases.md §5).

Differences from lash asserted here (DESIGN.md difference 5, ``lash_core.commands``):
command admission compares content (same key with a different command is a conflict, lash
silently returns the original), and completed/cancelled commands stay as tombstones until
vacuum instead of being deleted, so a redelivered command is never applied twice.
"""

from __future__ import annotations

import pytest

from lash_core.commands import CommandState, RefreshToolCatalog
from lash_core.errors import SourceKeyConflict, Superseded
from lash_core.inputs import InputState, NextTurnIngress
from lash_core.store.base import AdmissionStatus, Store
from lash_core.transcript import GraphReplace
from tests.conformance.conftest import (
    Harness,
    command_draft,
    commit,
    draft,
    final,
    lease_for,
    race,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_QW_01_source_key_replay_returns_original_and_changed_content_conflicts(
    store: Store,
) -> None:
    """Differs from lash: a changed command under a used key is a ``SourceKeyConflict``."""
    first = await store.enqueue_command(command_draft("s", "source:first"))
    assert first.status is AdmissionStatus.ADMITTED
    assert first.command.batch_id.startswith("qwb_")
    assert first.command.source_key == "command:source:first"
    again = await store.enqueue_command(command_draft("s", "source:first"))
    assert again.status is AdmissionStatus.DUPLICATE
    assert again.command.batch_id == first.command.batch_id
    with pytest.raises(SourceKeyConflict) as err:
        await store.enqueue_command(command_draft("s", "source:first", reset=False))
    assert err.value.existing_id == first.command.batch_id
    [only] = await store.list_commands("s")
    assert only.command == first.command.command


async def test_QW_02_lists_are_per_session_in_enqueue_order(store: Store) -> None:
    q1 = await store.enqueue_command(command_draft("s", "1"))
    q2 = await store.enqueue_command(command_draft("s", "2", reset=False))
    q3 = await store.enqueue_command(command_draft("t", "3"))
    listed = await store.list_commands("s")
    assert [c.batch_id for c in listed] == [q1.command.batch_id, q2.command.batch_id]
    assert listed[0].enqueue_seq < listed[1].enqueue_seq
    assert [c.batch_id for c in await store.list_commands("t")] == [q3.command.batch_id]


async def test_QW_03_concurrent_duplicate_enqueues_resolve_to_one_command(store: Store) -> None:
    d = command_draft("s", "dup")
    results = await race(*[lambda: store.enqueue_command(d) for _ in range(4)])
    assert len({r.command.batch_id for r in results}) == 1
    assert [r.status for r in results].count(AdmissionStatus.ADMITTED) == 1
    assert len(await store.list_commands("s")) == 1


async def test_QW_05_cancel_only_unclaimed_commands(store: Store) -> None:
    """Differs from lash: a cancelled command stays listed as a ``cancelled`` tombstone."""
    c = await store.enqueue_command(command_draft("s", "c"))
    cancelled = await store.cancel_command("s", c.command.batch_id)
    assert cancelled is not None and cancelled.state is CommandState.CANCELLED
    assert await store.cancel_command("s", c.command.batch_id) is None
    d = await store.enqueue_command(command_draft("s", "d"))
    lease = await lease_for(store, "s")
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None and claim.command.batch_id == d.command.batch_id
    assert await store.cancel_command("s", d.command.batch_id) is None
    assert await store.list_commands("s", pending_only=True) == []
    await store.release_lease(lease.fence())
    assert [x.batch_id for x in await store.list_commands("s", pending_only=True)] == [
        d.command.batch_id
    ]
    assert await store.cancel_command("s", d.command.batch_id) is not None
    states = {x.batch_id: x.state for x in await store.list_commands("s")}
    assert states == {
        c.command.batch_id: CommandState.CANCELLED,
        d.command.batch_id: CommandState.CANCELLED,
    }
    assert await store.cancel_command("s", "qwb_unknown") is None


async def test_QW_07_leading_command_runs_before_later_turn_input(store: Store) -> None:
    cmd = await store.enqueue_command(command_draft("s", "c"))
    i = await store.enqueue_input(draft("s", "later"))
    lease = await lease_for(store, "s")
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None and claim.command.batch_id == cmd.command.batch_id
    assert claim.claim_id == f"qwc:{cmd.command.enqueue_seq}:1"
    assert claim.session_lease_generation == lease.fencing_token
    await store.commit(
        commit(
            "s",
            lease,
            graph=GraphReplace(),
            completed_command_claims=[claim.completion()],
            applied_command=claim.command.command,
        )
    )
    start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    assert [x.input_id for x in start.claim.inputs] == [i.record.input_id]


async def test_QW_08_later_command_cannot_jump_earlier_turn_input(store: Store) -> None:
    i = await store.enqueue_input(draft("s", "first"))
    cmd = await store.enqueue_command(command_draft("s", "c"))
    lease = await lease_for(store, "s")
    assert await store.claim_leading_command(lease.fence(), lease.owner) is None
    claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert claim is not None and [x.input_id for x in claim.inputs] == [i.record.input_id]
    await store.abandon_input_claim(claim)
    assert await store.claim_leading_command(lease.fence(), lease.owner) is None
    inputs = await store.list_inputs("s")
    commands = await store.list_commands("s")
    assert inputs[0].enqueue_seq < commands[0].enqueue_seq
    start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    await store.commit(
        commit("s", lease, turn=final("t1"), completed_input_claims=[start.claim.completion()])
    )
    later = await store.claim_leading_command(lease.fence(), lease.owner)
    assert later is not None and later.command.batch_id == cmd.command.batch_id


async def test_QW_14_completion_must_own_the_command(store: Store) -> None:
    await store.enqueue_command(command_draft("s", "c"))
    lease = await lease_for(store, "s")
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None
    tampered = claim.completion().model_copy(update={"claim_token": "tampered"})
    with pytest.raises(Superseded) as err:
        await store.commit(commit("s", lease, completed_command_claims=[tampered]))
    assert err.value.what == "command"
    [cmd] = await store.list_commands("s")
    assert cmd.state is CommandState.PENDING
    await store.commit(
        commit("s", lease, completed_command_claims=[claim.completion()], release_lease=True)
    )
    assert await store.list_commands("s", pending_only=True) == []


async def test_QW_15_command_only_drain_completes_without_a_turn(store: Store) -> None:
    await store.enqueue_command(command_draft("s", "only"))
    lease = await lease_for(store, "s")
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None
    assert await store.start_turn(lease.fence(), "t-none") is None
    result = await store.commit(
        commit(
            "s",
            lease,
            graph=GraphReplace(),
            completed_command_claims=[claim.completion()],
            applied_command=claim.command.command,
            release_lease=True,
        )
    )
    assert [e.type for e in result.events] == ["session.command_applied"]
    assert await store.list_commands("s", pending_only=True) == []
    assert [c.state for c in await store.list_commands("s")] == [CommandState.COMPLETED]


async def test_QW_17_claiming_a_command_keeps_pending_next_turn_input(store: Store) -> None:
    await store.enqueue_command(command_draft("s", "c", reset=False))
    i = await store.enqueue_input(draft("s", "x"))
    lease = await lease_for(store, "s")
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None and isinstance(claim.command.command, RefreshToolCatalog)
    [pending] = await store.list_pending_inputs("s")
    assert pending.input_id == i.record.input_id
    assert pending.state is InputState.DEFERRED_NEXT_TURN
    assert isinstance(pending.ingress, NextTurnIngress)


async def test_QW_18_commands_survive_reopen(harness: Harness) -> None:
    q = await harness.store.enqueue_command(command_draft("s", "durable"))
    async with harness.reopen() as other:
        [listed] = await other.list_commands("s")
    assert listed.batch_id == q.command.batch_id
    assert listed.command == q.command.command


async def test_QW_19_redelivered_command_is_applied_at_most_once(store: Store) -> None:
    """Differs from lash: the completed command is a tombstone, so a redelivery after
    completion is a duplicate and can never be claimed again."""
    d = command_draft("s", "once")
    await store.enqueue_command(d)
    lease = await lease_for(store, "s")
    claim = await store.claim_leading_command(lease.fence(), lease.owner)
    assert claim is not None
    await store.commit(commit("s", lease, completed_command_claims=[claim.completion()]))
    again = await store.enqueue_command(d)
    assert again.status is AdmissionStatus.DUPLICATE
    assert again.command.state is CommandState.COMPLETED
    await store.release_lease(lease.fence())
    successor = await lease_for(store, "s", "b")
    assert await store.claim_leading_command(successor.fence(), successor.owner) is None
