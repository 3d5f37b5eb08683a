"""Conversions between table rows and the domain types of lash_core."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter

from lash_core import jsontext
from lash_core.commands import QueuedCommand
from lash_core.events import DurableEvent, EventPayload
from lash_core.inputs import Ingress, PendingTurnInput, RowClaim
from lash_core.leases import LeaseOwner, LeaseRow
from lash_core.transcript import MessageNode

_PAYLOAD: TypeAdapter[EventPayload] = TypeAdapter(EventPayload)
_INGRESS: TypeAdapter[Ingress] = TypeAdapter(Ingress)

#: Every column of the input and command tables the store reads back.
CLAIM_COLUMNS = (
    "claim_id, claim_owner_id, claim_owner_incarnation_id, claim_owner_liveness, claim_token, "
    "claim_fencing_token, claim_session_lease_generation"
)
INPUT_COLUMNS = (
    "input_id, session_id, enqueue_seq, source_key, ingress, submitted_ingress, state, input, "
    "enqueued_at_ms, " + CLAIM_COLUMNS
)
COMMAND_COLUMNS = (
    "batch_id, session_id, enqueue_seq, source_key, command, state, enqueued_at_ms, "
    + CLAIM_COLUMNS
)


#: Compact JSON text of a ``jsonb`` parameter.
dumps = jsontext.dumps


def _claim(row: Mapping[Any, Any]) -> RowClaim | None:
    if row["claim_token"] is None:
        return None
    return RowClaim(
        claim_id=row["claim_id"],
        owner=LeaseOwner(
            owner_id=row["claim_owner_id"],
            incarnation_id=row["claim_owner_incarnation_id"],
            liveness=row["claim_owner_liveness"] or {"kind": "opaque"},
        ),
        claim_token=row["claim_token"],
        session_lease_generation=row["claim_session_lease_generation"],
    )


def input_from_row(row: Mapping[Any, Any]) -> PendingTurnInput:
    return PendingTurnInput(
        input_id=row["input_id"],
        session_id=row["session_id"],
        source_key=row["source_key"],
        ingress=_INGRESS.validate_python(row["ingress"]),
        submitted_ingress=_INGRESS.validate_python(row["submitted_ingress"]),
        state=row["state"],
        enqueue_seq=row["enqueue_seq"],
        input=row["input"],
        enqueued_at_ms=row["enqueued_at_ms"],
        claim=_claim(row),
        claim_fencing_token=row["claim_fencing_token"],
    )


def command_from_row(row: Mapping[Any, Any]) -> QueuedCommand:
    return QueuedCommand(
        batch_id=row["batch_id"],
        session_id=row["session_id"],
        enqueue_seq=row["enqueue_seq"],
        source_key=row["source_key"],
        command=row["command"],
        state=row["state"],
        enqueued_at_ms=row["enqueued_at_ms"],
        claim=_claim(row),
        claim_fencing_token=row["claim_fencing_token"],
    )


def claim_params(claim: RowClaim | None) -> dict[str, Any]:
    """The claim columns of a row as bind parameters (cleared claims reset generation)."""
    if claim is None:
        return {
            "claim_id": None,
            "claim_owner_id": None,
            "claim_owner_incarnation_id": None,
            "claim_owner_liveness": None,
            "claim_token": None,
            "claim_session_lease_generation": 0,
        }
    return {
        "claim_id": claim.claim_id,
        "claim_owner_id": claim.owner.owner_id,
        "claim_owner_incarnation_id": claim.owner.incarnation_id,
        "claim_owner_liveness": dumps(claim.owner.liveness.model_dump(mode="json")),
        "claim_token": claim.claim_token,
        "claim_session_lease_generation": claim.session_lease_generation,
    }


def lease_from_json(data: Mapping[Any, Any] | None) -> LeaseRow | None:
    """A lease row from ``row_to_json(lash_leases)``."""
    if data is None:
        return None
    owner = None
    if data["owner_id"] is not None:
        owner = LeaseOwner(
            owner_id=data["owner_id"],
            incarnation_id=data["incarnation_id"],
            liveness=data["liveness"] or {"kind": "opaque"},
        )
    return LeaseRow(
        session_id=data["session_id"],
        owner=owner,
        lease_token=data["lease_token"],
        fencing_token=data["fencing_token"],
        claimed_at_ms=data["claimed_at_ms"],
        expires_at_ms=data["expires_at_ms"],
        running_turn_id=data["running_turn_id"],
        cancel_requested=data["cancel_requested"],
        cancel_reason=data["cancel_reason"],
    )


def lease_params(row: LeaseRow) -> dict[str, Any]:
    return {
        "s": row.session_id,
        "owner_id": row.owner.owner_id if row.owner else None,
        "incarnation_id": row.owner.incarnation_id if row.owner else None,
        "liveness": dumps(row.owner.liveness.model_dump(mode="json")) if row.owner else None,
        "lease_token": row.lease_token,
        "fencing_token": row.fencing_token,
        "claimed_at_ms": row.claimed_at_ms,
        "expires_at_ms": row.expires_at_ms,
        "running_turn_id": row.running_turn_id,
        "cancel_requested": row.cancel_requested,
        "cancel_reason": row.cancel_reason,
    }


def event_from_row(row: Mapping[Any, Any]) -> DurableEvent:
    return DurableEvent(
        session_id=row["session_id"],
        seq=row["seq"],
        revision=row["revision"],
        payload=_PAYLOAD.validate_python(row["payload"]),
        created_at_ms=row["created_at_ms"],
    )


def node_from_json(data: Mapping[Any, Any]) -> MessageNode:
    return MessageNode.model_validate(data)
