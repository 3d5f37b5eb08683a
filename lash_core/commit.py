"""The atomic runtime commit (lash-semantics §5) and its idempotency hash.

A commit carries everything one turn (or one session command, or a flush) changes; the
store applies all of it in one transaction or none of it. A *final* commit names its
``turn``: the store stamps ``(session_id, turn_id, hash)`` so an identical retry returns the
stored result, even without a lease, and changed content is a conflict.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import Field

from lash_core._model import Frozen
from lash_core.claims import CommandCompletion, TurnInputCompletion
from lash_core.commands import SessionCommand
from lash_core.events import DurableEvent
from lash_core.inputs import CheckpointKind, canonical_json
from lash_core.leases import LeaseFence
from lash_core.outcomes import TurnOutcome, Usage
from lash_core.transcript import GraphDelta, GraphUnchanged

VOLATILE_KEYS = frozenset(
    {"node_id", "parent_node_id", "leaf_node_id", "timestamp", "created_at_ms", "id"}
)
NOT_HASHED_FIELDS = frozenset(
    {
        "fence",
        "release_lease",
        "release_lease_if_idle",
        "expected_head_revision",
        "steering_checkpoint",
    }
)


class SessionConfig(Frozen):
    provider_id: str = "echo"
    model: str = "echo"


class FinalTurn(Frozen):
    """The final-commit part of a turn: what ``turn.committed`` reports."""

    turn_id: str = Field(min_length=1)
    outcome: TurnOutcome
    usage: Usage = Field(default_factory=Usage)


class RuntimeCommit(Frozen):
    session_id: str
    fence: LeaseFence | None = None
    release_lease: bool = False
    #: Release the lease in this commit iff, once it is applied, the session has no open
    #: input (``inputs.OPEN_STATES``) and no pending command; ``CommitResult.released`` says
    #: which happened. Lets a drain end without a separate release and re-check.
    release_lease_if_idle: bool = False
    expected_head_revision: int | None = None
    graph: GraphDelta = Field(default_factory=GraphUnchanged)
    config: SessionConfig | None = None
    checkpoint: dict[str, Any] | None = None
    usage: Usage | None = None
    turn: FinalTurn | None = None
    completed_input_claims: list[TurnInputCompletion] = Field(default_factory=list)
    completed_command_claims: list[CommandCompletion] = Field(default_factory=list)
    defer_active_inputs_of_turn: str | None = None
    applied_command: SessionCommand | None = None
    #: A final commit made at this checkpoint of its turn without probing it first: the
    #: store checks, under the lease row lock, for steering input the turn could accept
    #: there (as ``Store.has_active_input``) and, if any, writes nothing and raises
    #: :class:`~lash_core.errors.SteeringPending`; the turn claims it and goes on. That is
    #: one store call fewer per turn than probing and then committing, and leaves no gap
    #: between the two in which steering input would be deferred to the next turn.
    steering_checkpoint: CheckpointKind | None = None

    def commit_hash(self) -> str:
        return turn_commit_hash(self)


class CommitResult(Frozen):
    session_id: str
    head_revision: int
    events: list[DurableEvent] = Field(default_factory=list)
    deferred_input_ids: list[str] = Field(default_factory=list)
    replayed: bool = False
    #: The commit released the lease (``release_lease``, or ``release_lease_if_idle`` on
    #: an idle session); on a replay: this fence no longer holds the lease.
    released: bool = False
    #: Seen by a ``release_lease_if_idle`` commit: a session command is pending.
    command_pending: bool = False


def _strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def turn_commit_hash(commit: RuntimeCommit) -> str:
    """sha256 of the commit without lease/CAS fields and volatile ids and timestamps."""
    data = commit.model_dump(mode="json", exclude=set(NOT_HASHED_FIELDS))
    return hashlib.sha256(canonical_json(_strip_volatile(data)).encode()).hexdigest()
