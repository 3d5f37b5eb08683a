"""What a drain hands back: one report per committed turn, one per drain."""

from __future__ import annotations

from pydantic import Field

from lash_core._model import Frozen
from lash_core.events import DurableEvent
from lash_core.outcomes import TurnOutcome


class TurnReport(Frozen):
    """One committed turn. ``replayed``: the store already had this exact commit (a retry),
    or the report was rebuilt from the event log rather than from a turn run here."""

    session_id: str
    turn_id: str
    lease_generation: int
    outcome: TurnOutcome
    input_ids: list[str]
    deferred_input_ids: list[str]
    events: list[DurableEvent]
    duration_s: float
    replayed: bool = False


class DrainReport(Frozen):
    """What one ``SessionDriver.drain`` did.

    ``acquired`` is false both when another live owner held the lease (busy) and when
    there was nothing to run (``idle``: the lease was free but not taken)."""

    session_id: str
    acquired: bool
    idle: bool = False
    took_over: bool = False
    lease_lost: bool = False
    commands_applied: int = 0
    turns: list[TurnReport] = Field(default_factory=list)
