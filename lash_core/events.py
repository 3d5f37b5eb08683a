"""Observation events (CONTRACT.md "Observation events"; DESIGN.md difference 4).

Durable events are written by the store in the same transaction as the state change they
report, with a gapless per-session ``seq`` starting at 1. Live ``turn.activity`` events are
best effort and never consume a ``seq``. The cursor is opaque to observers; it encodes the
revision and ``seq`` so a reader can resume with ``after_seq``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field

from lash_core import jsontext
from lash_core._model import Frozen
from lash_core.commands import SessionCommand
from lash_core.inputs import InputRecord
from lash_core.outcomes import TurnOutcome, Usage
from lash_core.transcript import TranscriptMessage

PROTOCOL_VERSION = 1
CURSOR_PREFIX = "lashsc1"


class InputAdmitted(Frozen):
    type: Literal["input.admitted"] = "input.admitted"
    input: InputRecord


class InputCancelled(Frozen):
    type: Literal["input.cancelled"] = "input.cancelled"
    input_ids: list[str]


class TurnStarted(Frozen):
    type: Literal["turn.started"] = "turn.started"
    turn_id: str
    input_ids: list[str]
    lease_generation: int


class InputAccepted(Frozen):
    type: Literal["input.accepted"] = "input.accepted"
    turn_id: str
    input_ids: list[str]


class TurnCommitted(Frozen):
    type: Literal["turn.committed"] = "turn.committed"
    turn_id: str
    outcome: TurnOutcome
    messages: list[TranscriptMessage]
    usage: Usage
    input_ids: list[str]
    deferred_input_ids: list[str] = Field(default_factory=list)


class CommandApplied(Frozen):
    type: Literal["session.command_applied"] = "session.command_applied"
    command: SessionCommand


EventPayload = Annotated[
    InputAdmitted | InputCancelled | TurnStarted | InputAccepted | TurnCommitted | CommandApplied,
    Field(discriminator="type"),
]

DURABLE_EVENT_TYPES = (
    "input.admitted",
    "input.cancelled",
    "turn.started",
    "input.accepted",
    "turn.committed",
    "session.command_applied",
)


def session_shard(session_id: str) -> int:
    """A stable non-negative shard number of a session (crc32), for splitting outbox relays."""
    return zlib.crc32(session_id.encode("utf-8"))


def event_message_id(session_id: str, seq: int) -> str:
    """The AMQP ``message_id`` of a durable event: stable, so a republish is recognisable."""
    return f"{session_id}:{seq}"


def make_cursor(session_id: str, revision: int, seq: int) -> str:
    return f"{CURSOR_PREFIX}:{revision}:{seq}:{session_id}"


class CursorError(ValueError):
    """A cursor is malformed or names another session."""


def parse_cursor(cursor: str, session_id: str | None = None) -> tuple[str, int, int]:
    """``(session_id, revision, seq)`` of a cursor; the session id may contain colons."""
    parts = cursor.split(":", 3)
    if len(parts) != 4 or parts[0] != CURSOR_PREFIX or not parts[3]:
        raise CursorError(f"malformed cursor {cursor!r}")
    try:
        revision, seq = int(parts[1]), int(parts[2])
    except ValueError as exc:
        raise CursorError(f"malformed cursor {cursor!r}") from exc
    if session_id is not None and parts[3] != session_id:
        raise CursorError(f"cursor belongs to session {parts[3]!r}, not {session_id!r}")
    return parts[3], revision, seq


class DurableEvent(Frozen):
    """One row of a session's event log."""

    session_id: str
    seq: int
    revision: int
    payload: EventPayload
    created_at_ms: int = 0

    @property
    def type(self) -> str:
        return self.payload.type

    @property
    def message_id(self) -> str:
        return event_message_id(self.session_id, self.seq)

    @property
    def cursor(self) -> str:
        return make_cursor(self.session_id, self.revision, self.seq)

    def to_wire(self) -> dict[str, Any]:
        body = wire_envelope(self.session_id, self.seq, self.revision)
        body.update(self.payload.model_dump(mode="json"))
        return body


def wire_envelope(session_id: str, seq: int, revision: int) -> dict[str, Any]:
    """The fields every durable event carries on the wire before its payload's."""
    return {
        "protocol_version": PROTOCOL_VERSION,
        "session_id": session_id,
        "seq": seq,
        "revision": revision,
        "cursor": make_cursor(session_id, revision, seq),
    }


def wire_body(session_id: str, seq: int, revision: int, payload_json: str) -> bytes:
    """The wire body of a stored event from its payload as JSON object text, unparsed.

    The same JSON value as ``DurableEvent.to_wire()`` (envelope fields, then the payload's),
    spliced as text: the outbox relay publishes every event, and parsing each payload into
    its model only to dump it again was about a fifth of the relay's CPU.
    """
    head = jsontext.dumpb(wire_envelope(session_id, seq, revision))
    payload = payload_json.strip()
    if not (payload.startswith("{") and payload.endswith("}")):
        raise ValueError(f"event payload is not a JSON object: {payload[:40]!r}")
    inner = payload[1:-1].strip()
    if not inner:
        return head
    return head[:-1] + b"," + inner.encode() + b"}"


class EventKey(Protocol):
    """What names one durable event: its session and ``seq``."""

    @property
    def session_id(self) -> str: ...

    @property
    def seq(self) -> int: ...


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """An unpublished durable event as the outbox relay sends it: the AMQP properties it
    needs and the finished wire body."""

    session_id: str
    seq: int
    type: str
    created_at_ms: int
    body: bytes

    @property
    def message_id(self) -> str:
        return event_message_id(self.session_id, self.seq)

    @classmethod
    def of(cls, event: DurableEvent) -> OutboxMessage:
        return cls(
            event.session_id,
            event.seq,
            event.type,
            event.created_at_ms,
            jsontext.dumpb(event.to_wire()),
        )


class TextDelta(Frozen):
    kind: Literal["text_delta"] = "text_delta"
    text: str


class ToolCallStarted(Frozen):
    kind: Literal["tool_call"] = "tool_call"
    call_id: str
    tool_name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCallFinished(Frozen):
    kind: Literal["tool_result"] = "tool_result"
    call_id: str
    tool_name: str
    ok: bool
    output: str


class CheckpointReached(Frozen):
    kind: Literal["checkpoint"] = "checkpoint"
    checkpoint: Literal["after_work", "before_completion"]
    accepted_input_ids: list[str] = Field(default_factory=list)


Activity = Annotated[
    TextDelta | ToolCallStarted | ToolCallFinished | CheckpointReached, Field(discriminator="kind")
]


class TurnActivity(Frozen):
    """A live, non-durable event: carries the ``seq`` of the last durable event."""

    type: Literal["turn.activity"] = "turn.activity"
    durable: Literal[False] = False
    session_id: str
    seq: int
    revision: int
    turn_id: str
    activity: Activity

    def to_wire(self) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        body["protocol_version"] = PROTOCOL_VERSION
        body["cursor"] = make_cursor(self.session_id, self.revision, self.seq)
        return body
