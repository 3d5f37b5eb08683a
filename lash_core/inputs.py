"""Pending turn input: the durable evidence of user input admission (lash-semantics §1).

A pending input records admission, claim, cancellation and terminal outcome of one piece of
model-visible user input. This module holds its types and the pure rules over them: the
initial state of an admission, content comparison for idempotent replay, which rows a claim
may take, and what a cancel does to one row. Stores apply these rules inside their
transactions; they never re-implement them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from lash_core._model import Frozen
from lash_core.leases import LeaseOwner, LeaseRow

SessionId = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class TextItem(Frozen):
    type: Literal["text"] = "text"
    text: str


class AttachmentItem(Frozen):
    """A reference to content held elsewhere (a URI); never inlined into the store."""

    type: Literal["attachment"] = "attachment"
    source: str
    media_type: str | None = None
    name: str | None = None


InputItem = Annotated[TextItem | AttachmentItem, Field(discriminator="type")]


class TurnInput(Frozen):
    """What the user said: ordered items plus optional per-turn options."""

    items: list[InputItem] = Field(min_length=1)
    trace_turn_id: str | None = None

    def text(self) -> str:
        """The text items joined with blank lines; attachments as ``[attachment: uri]``."""
        parts: list[str] = []
        for item in self.items:
            if isinstance(item, TextItem):
                if item.text:
                    parts.append(item.text)
            else:
                parts.append(f"[attachment: {item.source}]")
        return "\n\n".join(parts)


CheckpointKind = Literal["after_work", "before_completion"]


class NextTurnIngress(Frozen):
    """A true follow-up: runs on the next turn, claimed only by idle dispatch."""

    scope: Literal["next_turn"] = "next_turn"


class ActiveTurnIngress(Frozen):
    """Steering input for the running turn ``turn_id``, taken at an admitting checkpoint."""

    scope: Literal["active_turn"] = "active_turn"
    turn_id: str = Field(min_length=1)
    min_boundary: CheckpointKind = "after_work"


Ingress = Annotated[NextTurnIngress | ActiveTurnIngress, Field(discriminator="scope")]


class InputState(StrEnum):
    PENDING_ACTIVE = "pending_active"
    DEFERRED_NEXT_TURN = "deferred_next_turn"
    ACCEPTED = "accepted"
    CANCELLED = "cancelled"
    COMPLETED = "completed"


PENDING_STATES = frozenset({InputState.PENDING_ACTIVE, InputState.DEFERRED_NEXT_TURN})
TERMINAL_STATES = frozenset({InputState.CANCELLED, InputState.COMPLETED})
#: States that keep a session busy: a lease holder must not go idle while a row is in one.
#: ``accepted`` counts because a row no commit completed is an orphan the next turn settles.
OPEN_STATES = frozenset({*PENDING_STATES, InputState.ACCEPTED})


class TurnInputDraft(Frozen):
    """What a submitter asks to admit."""

    session_id: SessionId
    input_id: str | None = None
    source_key: str | None = None
    ingress: Ingress = Field(default_factory=NextTurnIngress)
    input: TurnInput


class InputRecord(Frozen):
    """The public projection of a stored input (what receipts and events carry)."""

    input_id: str
    session_id: str
    source_key: str | None
    ingress: Ingress
    state: InputState
    enqueue_seq: int
    input: TurnInput


class RowClaim(Frozen):
    """The claim columns of a row (pending input or queued command) while it is claimed."""

    claim_id: str
    owner: LeaseOwner
    claim_token: str
    session_lease_generation: int


class PendingTurnInput(InputRecord):
    """The full stored record.

    ``submitted_ingress`` is what the producer sent and is what idempotent replay compares
    against, so a deferral that rewrites ``ingress`` to ``next_turn`` does not turn an exact
    replay into a conflict (lash-semantics §1.7 item 4; we differ on purpose).
    ``claim_fencing_token`` survives claim clearing: every new claim bumps it.
    """

    submitted_ingress: Ingress
    enqueued_at_ms: int
    claim: RowClaim | None = None
    claim_fencing_token: int = 0

    def public(self) -> InputRecord:
        return InputRecord(
            input_id=self.input_id,
            session_id=self.session_id,
            source_key=self.source_key,
            ingress=self.ingress,
            state=self.state,
            enqueue_seq=self.enqueue_seq,
            input=self.input,
        )


# --------------------------------------------------------------------------- admission rules


def canonical_json(value: Any) -> str:
    """Order-insensitive for objects, order-sensitive for arrays: stable for comparisons."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def admitted_ingress(requested: Ingress, running_turn_id: str | None) -> Ingress:
    """The ingress an input is stored under.

    Active-turn input aimed at a turn that is not running is admitted as next-turn input
    (DESIGN.md difference 3): it can then never be stranded in ``pending_active``.
    """
    if isinstance(requested, ActiveTurnIngress) and requested.turn_id != running_turn_id:
        return NextTurnIngress()
    return requested


def initial_state(ingress: Ingress) -> InputState:
    if isinstance(ingress, ActiveTurnIngress):
        return InputState.PENDING_ACTIVE
    return InputState.DEFERRED_NEXT_TURN


def same_content(draft: TurnInputDraft, record: PendingTurnInput) -> bool:
    """Whether a replayed draft is the same submission as the stored record.

    Compares the submitted ingress structurally and the input by canonical JSON. The
    draft's ``input_id`` is ignored (a replay keeps the original id).
    """
    return canonical_json(draft.ingress.model_dump(mode="json")) == canonical_json(
        record.submitted_ingress.model_dump(mode="json")
    ) and canonical_json(draft.input.model_dump(mode="json")) == canonical_json(
        record.input.model_dump(mode="json")
    )


# --------------------------------------------------------------------------- claim rules


def claim_is_live(claim: RowClaim | None, lease: LeaseRow | None, now_ms: int) -> bool:
    """A claim is live iff its pinned generation still holds a live session lease (§3.3)."""
    if claim is None or lease is None:
        return False
    return lease.is_live(now_ms) and lease.fencing_token == claim.session_lease_generation


def claimable_by_generation(claim: RowClaim | None, generation: int) -> bool:
    """Claim path predicate (§3.2): unclaimed, or claimed by another generation.

    A live owner never re-takes its own rows, and any older generation's claim is
    superseded without a sweeper.
    """
    return claim is None or claim.session_lease_generation != generation


def boundary_admits(min_boundary: CheckpointKind, checkpoint: CheckpointKind) -> bool:
    """``after_work`` input is admitted at both checkpoints; ``before_completion`` only there."""
    return min_boundary == "after_work" or checkpoint == "before_completion"


def select_active_claim(
    rows: Iterable[PendingTurnInput],
    *,
    turn_id: str,
    checkpoint: CheckpointKind,
    generation: int,
    max_inputs: int,
) -> list[PendingTurnInput]:
    """Rows an active checkpoint claim of ``turn_id`` takes, in ``enqueue_seq`` order."""
    chosen = [
        r
        for r in sorted(rows, key=lambda r: r.enqueue_seq)
        if r.state is InputState.PENDING_ACTIVE
        and isinstance(r.ingress, ActiveTurnIngress)
        and r.ingress.turn_id == turn_id
        and boundary_admits(r.ingress.min_boundary, checkpoint)
        and claimable_by_generation(r.claim, generation)
    ]
    return chosen[:max_inputs]


def select_next_turn_claim(
    rows: Iterable[PendingTurnInput],
    *,
    generation: int,
    max_inputs: int,
    before_seq: int | None = None,
) -> list[PendingTurnInput]:
    """Rows an idle next-turn claim takes, in ``enqueue_seq`` order.

    ``before_seq`` is the ``enqueue_seq`` of the session's earliest pending command (one
    sequence orders inputs and commands): only rows admitted before it are taken, so a
    command is never applied after input that was admitted after it (lash-semantics §4.5).
    """
    chosen = [
        r
        for r in sorted(rows, key=lambda r: r.enqueue_seq)
        if r.state is InputState.DEFERRED_NEXT_TURN
        and claimable_by_generation(r.claim, generation)
        and (before_seq is None or r.enqueue_seq < before_seq)
    ]
    return chosen[:max_inputs]


def has_open_input(rows: Iterable[PendingTurnInput]) -> bool:
    """Whether any row still needs a turn (:data:`OPEN_STATES`): the session is not idle."""
    return any(r.state in OPEN_STATES for r in rows)


def merge_inputs(inputs: Sequence[PendingTurnInput]) -> TurnInput:
    """One turn's input from several claimed next-turn inputs (§1.8 materialization)."""
    items: list[TextItem | AttachmentItem] = []
    trace: str | None = None
    for rec in sorted(inputs, key=lambda r: r.enqueue_seq):
        items.extend(rec.input.items)
        if trace is None and rec.input.trace_turn_id:
            trace = rec.input.trace_turn_id
    return TurnInput(items=items, trace_turn_id=trace)


def requested_turn_id(claimed: Sequence[PendingTurnInput]) -> str | None:
    """The turn id claimed input asks for: the merged input's ``trace_turn_id`` (a store
    naming a turn falls back to a fresh id)."""
    return merge_inputs(claimed).trace_turn_id if claimed else None


# --------------------------------------------------------------------------- cancellation


class InputIdTarget(Frozen):
    kind: Literal["input_id"] = "input_id"
    value: str = Field(min_length=1)


class SourceKeyTarget(Frozen):
    kind: Literal["source_key"] = "source_key"
    value: str = Field(min_length=1)


CancelTarget = Annotated[InputIdTarget | SourceKeyTarget, Field(discriminator="kind")]


class CancelOutcomeKind(StrEnum):
    CANCELLED = "cancelled"
    ALREADY_CLAIMED = "already_claimed"
    ALREADY_COMPLETED = "already_completed"
    ALREADY_CANCELLED = "already_cancelled"
    NOT_FOUND = "not_found"


class ClaimDiagnostics(Frozen):
    state: InputState
    claim_id: str | None = None
    claim_owner_id: str | None = None
    claim_session_lease_generation: int | None = None
    claim_fencing_token: int = 0


class CancelResult(Frozen):
    """The outcome of cancelling one target, with the record as it is after the call."""

    target: CancelTarget
    outcome: CancelOutcomeKind
    input: InputRecord | None = None
    claim: ClaimDiagnostics | None = None


class SuffixCancelResult(Frozen):
    anchor: CancelTarget
    anchor_found: bool
    results: list[CancelResult] = Field(default_factory=list)


def cancel_decision(record: PendingTurnInput | None, claim_live: bool) -> CancelOutcomeKind:
    """What cancelling this row does (§1.10). ``accepted`` is always ``already_claimed``."""
    if record is None:
        return CancelOutcomeKind.NOT_FOUND
    if record.state is InputState.COMPLETED:
        return CancelOutcomeKind.ALREADY_COMPLETED
    if record.state is InputState.CANCELLED:
        return CancelOutcomeKind.ALREADY_CANCELLED
    if record.state is InputState.ACCEPTED or claim_live:
        return CancelOutcomeKind.ALREADY_CLAIMED
    return CancelOutcomeKind.CANCELLED


def claim_diagnostics(record: PendingTurnInput) -> ClaimDiagnostics | None:
    if record.claim is None and record.state is not InputState.ACCEPTED:
        return None
    return ClaimDiagnostics(
        state=record.state,
        claim_id=record.claim.claim_id if record.claim else None,
        claim_owner_id=record.claim.owner.owner_id if record.claim else None,
        claim_session_lease_generation=(
            record.claim.session_lease_generation if record.claim else None
        ),
        claim_fencing_token=record.claim_fencing_token,
    )


def target_matches(target: CancelTarget, record: PendingTurnInput) -> bool:
    if isinstance(target, InputIdTarget):
        return record.input_id == target.value
    return record.source_key == target.value
