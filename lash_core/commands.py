"""Queued session commands: non-user background work applied under the lease (§4).

Only session commands are queued work in this port (no process wakes or agent frames).
Unlike lash, command admission compares content (same key, different command is a
conflict) and completed/cancelled commands stay as tombstones until vacuum, so a
redelivered command is never applied twice.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from lash_core._model import Frozen
from lash_core.inputs import RowClaim, SessionId, canonical_json


class ResetSession(Frozen):
    """Replace the transcript with an empty one (a full graph replacement)."""

    kind: Literal["reset_session"] = "reset_session"
    reason: str | None = None


class RefreshToolCatalog(Frozen):
    """Re-read the tool registry and record the new catalog in the session checkpoint."""

    kind: Literal["refresh_tool_catalog"] = "refresh_tool_catalog"
    reason: str | None = None


SessionCommand = Annotated[ResetSession | RefreshToolCatalog, Field(discriminator="kind")]


class CommandState(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class CommandDraft(Frozen):
    session_id: SessionId
    idempotency_key: str = Field(min_length=1)
    command: SessionCommand

    @property
    def source_key(self) -> str:
        return command_source_key(self.idempotency_key)


class QueuedCommand(Frozen):
    batch_id: str
    session_id: str
    enqueue_seq: int
    source_key: str
    command: SessionCommand
    state: CommandState
    enqueued_at_ms: int
    claim: RowClaim | None = None
    claim_fencing_token: int = 0


def command_source_key(idempotency_key: str) -> str:
    return f"command:{idempotency_key}"


def same_command(draft: CommandDraft, stored: QueuedCommand) -> bool:
    return canonical_json(draft.command.model_dump(mode="json")) == canonical_json(
        stored.command.model_dump(mode="json")
    )
