"""The pure pending-input rules (lash_core.inputs) and claim identities (lash_core.claims)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lash_core.claims import claim_token, command_claim_id, input_claim_id
from lash_core.inputs import (
    ActiveTurnIngress,
    AttachmentItem,
    CancelOutcomeKind,
    InputIdTarget,
    InputState,
    NextTurnIngress,
    PendingTurnInput,
    RowClaim,
    SourceKeyTarget,
    TextItem,
    TurnInput,
    TurnInputDraft,
    admitted_ingress,
    boundary_admits,
    cancel_decision,
    claim_diagnostics,
    claim_is_live,
    claimable_by_generation,
    has_open_input,
    initial_state,
    merge_inputs,
    requested_turn_id,
    same_content,
    select_active_claim,
    select_next_turn_claim,
    target_matches,
)
from lash_core.leases import LeaseOwner, LeaseRow

OWNER = LeaseOwner(owner_id="w", incarnation_id="w1")


def _row(
    seq: int,
    state: InputState = InputState.DEFERRED_NEXT_TURN,
    *,
    ingress: NextTurnIngress | ActiveTurnIngress | None = None,
    claim_gen: int | None = None,
    source_key: str | None = None,
) -> PendingTurnInput:
    ing = ingress or NextTurnIngress()
    claim = (
        RowClaim(
            claim_id=f"c{seq}", owner=OWNER, claim_token="tok", session_lease_generation=claim_gen
        )
        if claim_gen is not None
        else None
    )
    return PendingTurnInput(
        input_id=f"i{seq}",
        session_id="s",
        source_key=source_key,
        ingress=ing,
        state=state,
        enqueue_seq=seq,
        input=TurnInput(items=[TextItem(text=f"m{seq}")]),
        submitted_ingress=ing,
        enqueued_at_ms=0,
        claim=claim,
    )


def _lease(gen: int, expires: int = 100, token: str | None = "t") -> LeaseRow:
    return LeaseRow(
        session_id="s", owner=OWNER, lease_token=token, fencing_token=gen, expires_at_ms=expires
    )


def test_admitted_ingress_rolls_orphaned_active_input_to_next_turn() -> None:
    steer = ActiveTurnIngress(turn_id="t1")
    assert admitted_ingress(steer, "t1") == steer
    assert admitted_ingress(steer, "t2") == NextTurnIngress()
    assert admitted_ingress(steer, None) == NextTurnIngress()
    assert admitted_ingress(NextTurnIngress(), "t1") == NextTurnIngress()
    assert initial_state(steer) is InputState.PENDING_ACTIVE
    assert initial_state(NextTurnIngress()) is InputState.DEFERRED_NEXT_TURN


def test_same_content_compares_submitted_ingress_and_canonical_input() -> None:
    record = _row(1, ingress=ActiveTurnIngress(turn_id="t1"))
    record = record.model_copy(update={"ingress": NextTurnIngress()})  # deferred later
    d = TurnInputDraft(
        session_id="s",
        input_id="ignored",
        ingress=ActiveTurnIngress(turn_id="t1"),
        input=TurnInput(items=[TextItem(text="m1")]),
    )
    assert same_content(d, record)
    assert not same_content(d.model_copy(update={"ingress": NextTurnIngress()}), record)
    assert not same_content(
        d.model_copy(
            update={"ingress": ActiveTurnIngress(turn_id="t1", min_boundary="before_completion")}
        ),
        record,
    )
    two = TurnInput(items=[TextItem(text="a"), TextItem(text="b")])
    swapped = TurnInput(items=[TextItem(text="b"), TextItem(text="a")])
    rec2 = record.model_copy(update={"input": two, "submitted_ingress": NextTurnIngress()})
    assert same_content(TurnInputDraft(session_id="s", input=two), rec2)
    assert not same_content(TurnInputDraft(session_id="s", input=swapped), rec2)


def test_claim_liveness_needs_a_live_lease_of_the_same_generation() -> None:
    claim = _row(1, claim_gen=3).claim
    assert claim_is_live(claim, _lease(3), 50)
    assert not claim_is_live(claim, _lease(3), 100)  # expired
    assert not claim_is_live(claim, _lease(3, token=None), 50)  # released
    assert not claim_is_live(claim, _lease(4), 50)  # taken over
    assert not claim_is_live(claim, None, 50)
    assert not claim_is_live(None, _lease(3), 50)
    assert claimable_by_generation(None, 3)
    assert claimable_by_generation(claim, 4)
    assert not claimable_by_generation(claim, 3)


def test_boundaries() -> None:
    assert boundary_admits("after_work", "after_work")
    assert boundary_admits("after_work", "before_completion")
    assert boundary_admits("before_completion", "before_completion")
    assert not boundary_admits("before_completion", "after_work")


def test_select_next_turn_claim_orders_skips_and_caps() -> None:
    rows = [
        _row(5),
        _row(2, claim_gen=7),  # own generation: skipped
        _row(3, claim_gen=6),  # older generation: superseded, claimable
        _row(1, InputState.CANCELLED),
        _row(4, InputState.PENDING_ACTIVE, ingress=ActiveTurnIngress(turn_id="t")),
        _row(6),
    ]
    chosen = select_next_turn_claim(rows, generation=7, max_inputs=2)
    assert [r.enqueue_seq for r in chosen] == [3, 5]


def test_select_next_turn_claim_stops_before_a_pending_command() -> None:
    rows = [_row(1), _row(3), _row(4), _row(6)]
    assert [r.enqueue_seq for r in select_next_turn_claim(rows, generation=1, max_inputs=9)] == [
        1,
        3,
        4,
        6,
    ]
    before = select_next_turn_claim(rows, generation=1, max_inputs=9, before_seq=4)
    assert [r.enqueue_seq for r in before] == [1, 3]
    assert select_next_turn_claim(rows, generation=1, max_inputs=9, before_seq=1) == []
    capped = select_next_turn_claim(rows, generation=1, max_inputs=1, before_seq=5)
    assert [r.enqueue_seq for r in capped] == [1]


def test_open_input_and_requested_turn_id() -> None:
    assert not has_open_input([_row(1, InputState.COMPLETED), _row(2, InputState.CANCELLED)])
    for state in (InputState.DEFERRED_NEXT_TURN, InputState.PENDING_ACTIVE, InputState.ACCEPTED):
        assert has_open_input([_row(1, InputState.COMPLETED), _row(2, state)])
    assert requested_turn_id([]) is None
    assert requested_turn_id([_row(1)]) is None
    traced = _row(2).model_copy(
        update={"input": TurnInput(items=[TextItem(text="b")], trace_turn_id="trace-b")}
    )
    assert requested_turn_id([_row(1), traced]) == "trace-b"


def test_select_active_claim_filters_turn_state_and_boundary() -> None:
    t = ActiveTurnIngress(turn_id="t")
    late = ActiveTurnIngress(turn_id="t", min_boundary="before_completion")
    rows = [
        _row(1, InputState.PENDING_ACTIVE, ingress=t),
        _row(2, InputState.PENDING_ACTIVE, ingress=late),
        _row(3, InputState.PENDING_ACTIVE, ingress=ActiveTurnIngress(turn_id="other")),
        _row(4, InputState.ACCEPTED, ingress=t, claim_gen=1),
        _row(5, InputState.DEFERRED_NEXT_TURN),
    ]
    pick = select_active_claim(
        rows, turn_id="t", checkpoint="after_work", generation=2, max_inputs=9
    )
    assert [r.enqueue_seq for r in pick] == [1]
    pick = select_active_claim(
        rows, turn_id="t", checkpoint="before_completion", generation=2, max_inputs=9
    )
    assert [r.enqueue_seq for r in pick] == [1, 2]


def test_cancel_decision_table() -> None:
    assert cancel_decision(None, False) is CancelOutcomeKind.NOT_FOUND
    assert (
        cancel_decision(_row(1, InputState.COMPLETED), False) is CancelOutcomeKind.ALREADY_COMPLETED
    )
    assert (
        cancel_decision(_row(1, InputState.CANCELLED), True) is CancelOutcomeKind.ALREADY_CANCELLED
    )
    accepted = _row(1, InputState.ACCEPTED, claim_gen=1)
    assert cancel_decision(accepted, False) is CancelOutcomeKind.ALREADY_CLAIMED
    assert cancel_decision(_row(1, claim_gen=1), True) is CancelOutcomeKind.ALREADY_CLAIMED
    assert cancel_decision(_row(1, claim_gen=1), False) is CancelOutcomeKind.CANCELLED
    assert cancel_decision(_row(1, InputState.PENDING_ACTIVE), False) is CancelOutcomeKind.CANCELLED


def test_claim_diagnostics_and_targets() -> None:
    assert claim_diagnostics(_row(1)) is None
    diag = claim_diagnostics(_row(1, claim_gen=4))
    assert diag is not None
    assert (diag.claim_id, diag.claim_owner_id, diag.claim_session_lease_generation) == (
        "c1",
        "w",
        4,
    )
    bare_accepted = _row(2, InputState.ACCEPTED)
    diag = claim_diagnostics(bare_accepted)
    assert diag is not None and diag.claim_id is None and diag.state is InputState.ACCEPTED
    keyed = _row(3, source_key="k")
    assert target_matches(InputIdTarget(value="i3"), keyed)
    assert target_matches(SourceKeyTarget(value="k"), keyed)
    assert not target_matches(SourceKeyTarget(value="i3"), keyed)
    with pytest.raises(ValidationError):
        InputIdTarget(value="")


def test_merge_inputs_concatenates_in_admission_order() -> None:
    first = _row(2).model_copy(
        update={"input": TurnInput(items=[TextItem(text="b")], trace_turn_id="trace-b")}
    )
    second = _row(1).model_copy(
        update={"input": TurnInput(items=[AttachmentItem(source="file:///x")])}
    )
    merged = merge_inputs([first, second])
    assert merged.items == [AttachmentItem(source="file:///x"), TextItem(text="b")]
    assert merged.trace_turn_id == "trace-b"
    assert merged.text() == "[attachment: file:///x]\n\nb"


def test_session_id_and_items_are_validated() -> None:
    with pytest.raises(ValidationError):
        TurnInputDraft(session_id="bad\nid", input=TurnInput(items=[TextItem(text="x")]))
    with pytest.raises(ValidationError):
        TurnInputDraft(session_id="x" * 257, input=TurnInput(items=[TextItem(text="x")]))
    with pytest.raises(ValidationError):
        TurnInput(items=[])


def test_claim_identities() -> None:
    assert input_claim_id(17, 3) == "tic:17:3"
    assert command_claim_id(17, 3) == "qwc:17:3"
    token = claim_token("s", OWNER, "tic:17:3", 5)
    assert token == claim_token("s", OWNER, "tic:17:3", 5)
    assert len(token) == 64
    assert token != claim_token("s", OWNER, "tic:17:4", 5)
    assert token != claim_token("s", OWNER, "tic:17:3", 6)
