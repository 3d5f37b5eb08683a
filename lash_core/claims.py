"""Generation-fenced claims on pending inputs and queued commands (lash-semantics §3).

A claim has no TTL: it is live exactly while the lease generation it was taken under still
holds the session. Completion checks ownership by ``claim_id`` and ``claim_token`` only.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import Field

from lash_core._model import Frozen
from lash_core.commands import QueuedCommand
from lash_core.inputs import CheckpointKind, PendingTurnInput
from lash_core.leases import LeaseOwner


class NextTurnMode(Frozen):
    kind: Literal["next_turn"] = "next_turn"


class ActiveTurnMode(Frozen):
    kind: Literal["active_turn"] = "active_turn"
    turn_id: str
    checkpoint: CheckpointKind


ClaimMode = Annotated[NextTurnMode | ActiveTurnMode, Field(discriminator="kind")]


class TurnInputCompletion(Frozen):
    session_id: str
    claim_id: str
    claim_token: str
    input_ids: list[str]


class TurnInputClaim(Frozen):
    session_id: str
    claim_id: str
    owner: LeaseOwner
    claim_token: str
    fencing_token: int
    session_lease_generation: int
    mode: ClaimMode
    inputs: list[PendingTurnInput]

    def completion(self) -> TurnInputCompletion:
        return TurnInputCompletion(
            session_id=self.session_id,
            claim_id=self.claim_id,
            claim_token=self.claim_token,
            input_ids=[i.input_id for i in self.inputs],
        )


class CommandCompletion(Frozen):
    session_id: str
    claim_id: str
    claim_token: str
    batch_ids: list[str]


class CommandClaim(Frozen):
    session_id: str
    claim_id: str
    owner: LeaseOwner
    claim_token: str
    fencing_token: int
    session_lease_generation: int
    command: QueuedCommand

    def completion(self) -> CommandCompletion:
        return CommandCompletion(
            session_id=self.session_id,
            claim_id=self.claim_id,
            claim_token=self.claim_token,
            batch_ids=[self.command.batch_id],
        )


def input_claim_id(head_enqueue_seq: int, fencing_token: int) -> str:
    return f"tic:{head_enqueue_seq}:{fencing_token}"


def command_claim_id(head_enqueue_seq: int, fencing_token: int) -> str:
    return f"qwc:{head_enqueue_seq}:{fencing_token}"


def claim_token(session_id: str, owner: LeaseOwner, claim_id: str, now_ms: int) -> str:
    """The opaque proof of owning a claim (sha256 of who, which claim and when)."""
    raw = f"{session_id}:{owner.owner_id}:{owner.incarnation_id}:{claim_id}:{now_ms}"
    return hashlib.sha256(raw.encode()).hexdigest()
