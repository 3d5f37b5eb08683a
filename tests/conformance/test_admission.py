"""PTI: pending turn input admission and idempotency (conformance-cases.md §1)."""

from __future__ import annotations

import pytest

from lash_core.errors import SourceKeyConflict
from lash_core.events import InputAdmitted
from lash_core.inputs import (
    ActiveTurnIngress,
    AttachmentItem,
    InputIdTarget,
    InputState,
    NextTurnIngress,
    PendingTurnInput,
    TextItem,
    TurnInput,
    TurnInputDraft,
    merge_inputs,
)
from lash_core.store.base import AdmissionStatus, InputAdmission, Store
from tests.conformance.conftest import (
    Harness,
    active,
    commit,
    draft,
    final,
    lease_for,
    race,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_PTI_01_enqueue_assigns_identity_order_and_initial_state(store: Store) -> None:
    """An active-turn input for a turn that is running stays ``pending_active`` (it carries
    its turn id). Our port admits it as such only when that turn runs (see PTI-10)."""
    lease = await lease_for(store, "s")
    start = await store.start_turn(lease.fence(), "t1", require_inputs=False)
    assert start is not None
    a = await store.enqueue_input(draft("s", "one"))
    b = await store.enqueue_input(draft("s", "two"))
    t = await store.enqueue_input(draft("t", "other"))
    c = await store.enqueue_input(draft("s", "steer", ingress=active("t1")))
    ids = [x.record.input_id for x in (a, b, t, c)]
    assert len(set(ids)) == 4
    assert all(x.status is AdmissionStatus.ADMITTED for x in (a, b, t, c))
    pending = await store.list_pending_inputs("s")
    assert [p.input_id for p in pending] == [
        a.record.input_id,
        b.record.input_id,
        c.record.input_id,
    ]
    seqs = [p.enqueue_seq for p in pending]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert pending[0].state is InputState.DEFERRED_NEXT_TURN
    assert pending[1].state is InputState.DEFERRED_NEXT_TURN
    assert pending[2].state is InputState.PENDING_ACTIVE
    assert isinstance(pending[2].ingress, ActiveTurnIngress)
    assert pending[2].ingress.turn_id == "t1"
    assert [p.input_id for p in await store.list_pending_inputs("t")] == [t.record.input_id]


async def test_PTI_02_exact_source_key_replay_returns_original(store: Store) -> None:
    first = await store.enqueue_input(draft("s", "payload", source_key="k"))
    again = await store.enqueue_input(draft("s", "payload", source_key="k", input_id="ignored"))
    assert again.status is AdmissionStatus.DUPLICATE
    assert again.record.input_id == first.record.input_id
    assert again.record.input == first.record.input
    assert again.event is None
    assert len(await store.list_pending_inputs("s")) == 1


async def test_PTI_03_changed_content_is_a_conflict(store: Store) -> None:
    first = await store.enqueue_input(draft("s", "P", source_key="k"))
    with pytest.raises(SourceKeyConflict) as err:
        await store.enqueue_input(draft("s", "P-prime", source_key="k"))
    assert err.value.session_id == "s"
    assert err.value.source_key == "k"
    assert err.value.existing_id == first.record.input_id
    # Same payload, different ingress: also a conflict.
    with pytest.raises(SourceKeyConflict):
        await store.enqueue_input(draft("s", "P", source_key="k", ingress=active("t9")))
    assert len(await store.list_inputs("s")) == 1
    lease = await lease_for(store, "s")
    claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert claim is not None
    assert [i.input_id for i in claim.inputs] == [first.record.input_id]
    assert claim.inputs[0].input.text() == "P"
    await store.commit(
        commit("s", lease, turn=final("t1"), completed_input_claims=[claim.completion()])
    )
    assert await store.list_pending_inputs("s") == []


async def test_PTI_04_replay_after_cancel_returns_tombstone(store: Store) -> None:
    first = await store.enqueue_input(draft("s", "x", source_key="k"))
    from lash_core.inputs import SourceKeyTarget

    await store.cancel_inputs("s", [SourceKeyTarget(value="k")])
    again = await store.enqueue_input(draft("s", "x", source_key="k"))
    assert again.status is AdmissionStatus.DUPLICATE
    assert again.record.input_id == first.record.input_id
    assert again.record.state is InputState.CANCELLED
    assert await store.list_pending_inputs("s") == []


async def test_PTI_05_replay_after_completion_returns_tombstone(store: Store) -> None:
    turn_input = TurnInput(
        items=[
            TextItem(text="look"),
            AttachmentItem(source="s3://bucket/img.png", media_type="image/png"),
        ]
    )
    d = TurnInputDraft(session_id="s", source_key="k", input=turn_input)
    first = await store.enqueue_input(d)
    lease = await lease_for(store, "s")
    claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert claim is not None
    await store.commit(
        commit(
            "s",
            lease,
            turn=final("t1"),
            completed_input_claims=[claim.completion()],
            release_lease=True,
        )
    )
    again = await store.enqueue_input(d)
    assert again.status is AdmissionStatus.DUPLICATE
    assert again.record.input_id == first.record.input_id
    assert again.record.state is InputState.COMPLETED
    successor = await lease_for(store, "s", "b")
    assert await store.claim_next_turn_inputs(successor.fence(), successor.owner) is None


async def test_PTI_06_admission_is_isolated_per_session(store: Store) -> None:
    s1 = await store.enqueue_input(draft("s", "one"))
    s2 = await store.enqueue_input(draft("s", "two"))
    t1 = await store.enqueue_input(draft("t", "other"))
    lease = await lease_for(store, "s")
    claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner, 10)
    assert claim is not None
    assert [i.input_id for i in claim.inputs] == [s1.record.input_id, s2.record.input_id]
    await store.commit(
        commit("s", lease, turn=final("t1"), completed_input_claims=[claim.completion()])
    )
    assert await store.list_pending_inputs("s") == []
    assert [p.input_id for p in await store.list_pending_inputs("t")] == [t1.record.input_id]


async def test_PTI_07_source_key_is_scoped_to_the_session(store: Store) -> None:
    s = await store.enqueue_input(draft("s", "payload", source_key="k"))
    t = await store.enqueue_input(draft("t", "different", source_key="k"))
    assert t.status is AdmissionStatus.ADMITTED
    assert t.record.input_id != s.record.input_id
    assert t.record.session_id == "t"


async def test_PTI_08_concurrent_duplicate_enqueues_resolve_to_one_row(store: Store) -> None:
    d = draft("s", "same", source_key="dup")
    results = await race(*[lambda: store.enqueue_input(d) for _ in range(4)])
    assert len({r.record.input_id for r in results}) == 1
    assert sorted(r.status for r in results).count(AdmissionStatus.ADMITTED) == 1
    assert len(await store.list_inputs("s")) == 1
    page = await store.events_after("s", 0)
    assert [e.type for e in page.events] == ["input.admitted"]


async def test_PTI_09_payload_round_trips_through_claims(store: Store) -> None:
    items = [TextItem(text="see"), AttachmentItem(source="file:///a.png", media_type="image/png")]
    await store.enqueue_input(TurnInputDraft(session_id="s", input=TurnInput(items=items)))
    lease = await lease_for(store, "s")
    start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    assert merge_inputs(start.claim.inputs).items == items
    steer = [TextItem(text="also"), AttachmentItem(source="file:///b.png", name="b")]
    await store.enqueue_input(
        TurnInputDraft(session_id="s", ingress=active("t1"), input=TurnInput(items=steer))
    )
    claim = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "t1", "after_work")
    assert claim is not None
    assert claim.inputs[0].input.items == steer
    assert claim.inputs[0].input.items[-1] == steer[-1]


async def test_PTI_10_active_input_for_a_turn_not_running_becomes_next_turn(
    harness: Harness,
) -> None:
    """Differs from lash on purpose (DESIGN.md difference 3): active-turn input aimed at a
    turn that is not running (here: already committed) is admitted directly as next-turn
    input, so it is never stranded; lash would store it ``pending_active`` and rely on the
    turn's final commit to defer it. ``submitted_ingress`` keeps what was sent, so an exact
    replay is still a duplicate."""
    store = harness.store
    lease = await lease_for(store, "s")
    first = await store.enqueue_input(draft("s", "first"))
    start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    await store.commit(
        commit(
            "s",
            lease,
            turn=final("t1"),
            completed_input_claims=[start.claim.completion()],
            defer_active_inputs_of_turn="t1",
            release_lease=True,
        )
    )
    late = await store.enqueue_input(draft("s", "late", source_key="late", ingress=active("t1")))
    assert late.record.state is InputState.DEFERRED_NEXT_TURN
    assert isinstance(late.record.ingress, NextTurnIngress)
    assert late.record.submitted_ingress == active("t1")
    replay = await store.enqueue_input(draft("s", "late", source_key="late", ingress=active("t1")))
    assert replay.status is AdmissionStatus.DUPLICATE
    lease2 = await lease_for(store, "s", "b")
    start2 = await store.start_turn(lease2.fence(), "t2")
    assert start2 is not None and start2.claim is not None
    assert [i.input_id for i in start2.claim.inputs] == [late.record.input_id]
    assert first.record.input_id not in [i.input_id for i in start2.claim.inputs]


async def test_PTI_10b_active_input_deferred_by_the_final_commit_replays_as_duplicate(
    store: Store,
) -> None:
    """Differs from lash (§1.7 item 4): after the final commit rewrote a ``pending_active``
    row to next-turn, an exact replay of the original active-turn draft is a duplicate
    (we compare against ``submitted_ingress``), not a conflict."""
    lease = await lease_for(store, "s")
    start = await store.start_turn(lease.fence(), "t1", require_inputs=False)
    assert start is not None
    d = draft("s", "steer", source_key="k", ingress=active("t1"))
    admitted = await store.enqueue_input(d)
    assert admitted.record.state is InputState.PENDING_ACTIVE
    result = await store.commit(
        commit("s", lease, turn=final("t1"), defer_active_inputs_of_turn="t1")
    )
    assert result.deferred_input_ids == [admitted.record.input_id]
    replay = await store.enqueue_input(d)
    assert replay.status is AdmissionStatus.DUPLICATE
    assert replay.record.state is InputState.DEFERRED_NEXT_TURN
    assert isinstance(replay.record.ingress, NextTurnIngress)


async def test_PTI_caller_input_id_is_kept_and_idempotent(store: Store) -> None:
    first = await store.enqueue_input(draft("s", "x", input_id="ti_mine"))
    assert first.record.input_id == "ti_mine"
    again = await store.enqueue_input(draft("s", "x", input_id="ti_mine"))
    assert again.status is AdmissionStatus.DUPLICATE
    with pytest.raises(SourceKeyConflict) as err:
        await store.enqueue_input(draft("s", "changed", input_id="ti_mine"))
    assert err.value.existing_id == "ti_mine"
    with pytest.raises(SourceKeyConflict):
        await store.enqueue_input(draft("other", "x", input_id="ti_mine"))
    assert len(await store.list_inputs("s")) == 1
    assert await store.list_inputs("other") == []


# --------------------------------------------------------------------------- batches


def admission(outcome: object) -> InputAdmission:
    assert isinstance(outcome, InputAdmission), outcome
    return outcome


def kind(outcome: object) -> str:
    return outcome.status.value if isinstance(outcome, InputAdmission) else type(outcome).__name__


def first_text(record: PendingTurnInput) -> str:
    item = record.input.items[0]
    assert isinstance(item, TextItem)
    return item.text


async def test_batch_admission_matches_one_by_one_admission(store: Store) -> None:
    """``enqueue_inputs``: per draft the outcome ``enqueue_input`` would give, in order;
    a session's inputs keep the batch's order; events are gapless per session."""
    lease = await lease_for(store, "s")
    start = await store.start_turn(lease.fence(), "t1", require_inputs=False)
    assert start is not None
    await store.enqueue_input(draft("s", "before", source_key="kb"))
    outcomes = await store.enqueue_inputs(
        [
            draft("t", "t-one", source_key="k1"),
            draft("s", "s-one", source_key="k2"),
            draft("t", "t-two", source_key="k3"),
            draft("s", "before", source_key="kb"),  # exact replay: duplicate
            draft("s", "other", source_key="kb"),  # same key, other content: conflict
            draft("s", "steer", source_key="k4", ingress=active("t1")),
            draft("u", "u-one", source_key="k1"),  # same key, other session: independent
            draft("t", "t-one", source_key="k1"),  # replay inside the batch: duplicate
        ]
    )
    assert [kind(o) for o in outcomes] == [
        "admitted",
        "admitted",
        "admitted",
        "duplicate",
        "SourceKeyConflict",
        "admitted",
        "admitted",
        "duplicate",
    ]
    assert admission(outcomes[7]).record.input_id == admission(outcomes[0]).record.input_id
    # Steering aimed at the running turn stays active-turn input, as one by one.
    assert admission(outcomes[5]).record.state is InputState.PENDING_ACTIVE
    for session_id, texts in (("s", ["before", "s-one", "steer"]), ("t", ["t-one", "t-two"])):
        pending = await store.list_pending_inputs(session_id)
        assert [first_text(p) for p in pending] == texts
        seqs = [p.enqueue_seq for p in pending]
        assert seqs == sorted(seqs)
        events = (await store.events_after(session_id, 0)).events
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        admitted_ids = [
            e.payload.input.input_id for e in events if isinstance(e.payload, InputAdmitted)
        ]
        assert admitted_ids == [p.input_id for p in pending]
    for outcome in outcomes:
        if isinstance(outcome, InputAdmission) and outcome.status is AdmissionStatus.ADMITTED:
            event = outcome.event
            assert event is not None
            stored = await store.events_after(outcome.record.session_id, event.seq - 1, limit=1)
            assert stored.events == [event]


async def test_batch_admission_of_replays_only_writes_nothing(store: Store) -> None:
    first = await store.enqueue_inputs([draft("s", "a", source_key="k"), draft("t", "b")])
    last_seq = (await store.events_after("s", 0)).last_seq
    again = await store.enqueue_inputs(
        [draft("s", "a", source_key="k"), draft("s", "a", source_key="k")]
    )
    assert [kind(o) for o in again] == ["duplicate", "duplicate"]
    assert {admission(o).record.input_id for o in again} == {admission(first[0]).record.input_id}
    assert (await store.events_after("s", 0)).last_seq == last_seq


async def test_admission_reports_input_queued_behind_open_input(store: Store) -> None:
    """``behind_open_input``: the session had open input when this input was admitted,
    one by one and in a batch; a replay reports ``False``, and so does the first input
    after the rest was settled. (Rows admitted earlier in the same batch may count or not:
    PostgreSQL admits a batch in one statement, the memory store one by one.)"""
    first = await store.enqueue_input(draft("s", "one", source_key="k1"))
    assert first.behind_open_input is False
    assert first.runs_elsewhere is False  # no local publisher: no other place to run
    second = await store.enqueue_input(draft("s", "two", source_key="k2"))
    assert second.behind_open_input is True
    replay = await store.enqueue_input(draft("s", "two", source_key="k2"))
    assert replay.status is AdmissionStatus.DUPLICATE and replay.behind_open_input is False
    batch = await store.enqueue_inputs(
        [draft("s", "three", source_key="k3"), draft("t", "t-one"), draft("t", "t-two")]
    )
    assert [admission(o).behind_open_input for o in batch[:2]] == [True, False]
    ids = [InputIdTarget(value=p.input_id) for p in await store.list_pending_inputs("s")]
    await store.cancel_inputs("s", ids)
    after = await store.enqueue_input(draft("s", "four", source_key="k4"))
    assert after.behind_open_input is False
