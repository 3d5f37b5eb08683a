"""The wire contract as pydantic models (CONTRACT.md): producer messages, receipts, events.

Every model reuses the domain types of :mod:`lash_core` (inputs, ingress, cancel targets,
session commands, event payloads) so there is one home per concept; this module only adds
the envelopes (``protocol_version``, ``type``) and the decoder that turns raw AMQP bodies
into typed messages or a typed :class:`BadInput`. ``schemas/`` is generated from here.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import Field, TypeAdapter, ValidationError

from lash_core._model import Frozen
from lash_core.commands import CommandState, QueuedCommand, SessionCommand
from lash_core.events import (
    PROTOCOL_VERSION,
    CommandApplied,
    DurableEvent,
    InputAccepted,
    InputAdmitted,
    InputCancelled,
    TurnActivity,
    TurnCommitted,
    TurnStarted,
)
from lash_core.inputs import (
    CancelResult,
    CancelTarget,
    Ingress,
    InputRecord,
    NextTurnIngress,
    SessionId,
    TurnInput,
)
from lash_core.transcript import TranscriptMessage

__all__ = [
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "BadInput",
    "CommandRecord",
    "ErrorInfo",
    "ObservationEvent",
    "ProducerMessage",
    "Receipt",
    "ReceiptStatus",
    "SessionCommandMessage",
    "SessionReadMessage",
    "SessionReadResult",
    "SubmitMessage",
    "TurnCancelMessage",
    "TurnInputCancelMessage",
    "TurnInputCancelSuffixMessage",
    "decode_message",
    "parse_observation",
]


# --------------------------------------------------------------------------- producer messages


class _Message(Frozen):
    """Common fields of every producer message. Unknown fields are ignored."""

    protocol_version: Literal[1] = 1
    session_id: SessionId


class SubmitMessage(_Message):
    """``turn_input.submit``: admit one input (idempotent by ``source_key``)."""

    type: Literal["turn_input.submit"] = "turn_input.submit"
    source_key: str | None = Field(default=None, min_length=1, max_length=1024)
    input_id: str | None = Field(default=None, min_length=1, max_length=256)
    ingress: Ingress = Field(default_factory=NextTurnIngress)
    input: TurnInput


class TurnInputCancelMessage(_Message):
    """``turn_input.cancel``: cancel pending inputs by id or source key, atomically."""

    type: Literal["turn_input.cancel"] = "turn_input.cancel"
    targets: list[CancelTarget] = Field(min_length=1)


class TurnInputCancelSuffixMessage(_Message):
    """``turn_input.cancel_suffix``: cancel the anchor and every later input."""

    type: Literal["turn_input.cancel_suffix"] = "turn_input.cancel_suffix"
    anchor: CancelTarget


class TurnCancelMessage(_Message):
    """``turn.cancel``: stop the named (or whichever) running turn, wherever it runs."""

    type: Literal["turn.cancel"] = "turn.cancel"
    turn_id: str | None = Field(default=None, min_length=1)
    reason: str | None = None


class SessionCommandMessage(_Message):
    """``session.command``: queued background work applied under the session's lease."""

    type: Literal["session.command"] = "session.command"
    command: SessionCommand
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=1024)


class SessionReadMessage(_Message):
    """``session.read``: answered with a ``session.read.result`` (needs ``reply_to``)."""

    type: Literal["session.read"] = "session.read"
    after_seq: int | None = Field(default=None, ge=0)


ProducerMessage = Annotated[
    SubmitMessage
    | TurnInputCancelMessage
    | TurnInputCancelSuffixMessage
    | TurnCancelMessage
    | SessionCommandMessage
    | SessionReadMessage,
    Field(discriminator="type"),
]

MESSAGE_TYPES: Final = (
    "turn_input.submit",
    "turn_input.cancel",
    "turn_input.cancel_suffix",
    "turn.cancel",
    "session.command",
    "session.read",
)

_MESSAGE_ADAPTER: TypeAdapter[ProducerMessage] = TypeAdapter(ProducerMessage)


# --------------------------------------------------------------------------- receipts


class ReceiptStatus(StrEnum):
    ADMITTED = "admitted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    REJECTED = "rejected"
    OK = "ok"
    ANCHOR_NOT_FOUND = "anchor_not_found"
    CANCEL_REQUESTED = "cancel_requested"
    NO_RUNNING_TURN = "no_running_turn"


class ErrorInfo(Frozen):
    """Why a request was rejected or conflicted. ``existing_input_id`` names the record
    a conflicting ``source_key`` is already bound to."""

    code: str
    message: str
    existing_input_id: str | None = None


class CommandRecord(Frozen):
    """The public projection of a queued session command (claim columns left out)."""

    batch_id: str
    session_id: str
    source_key: str
    state: CommandState
    enqueue_seq: int
    command: SessionCommand

    @classmethod
    def of(cls, command: QueuedCommand) -> CommandRecord:
        return cls(
            batch_id=command.batch_id,
            session_id=command.session_id,
            source_key=command.source_key,
            state=command.state,
            enqueue_seq=command.enqueue_seq,
            command=command.command,
        )


class Receipt(Frozen):
    """The answer to every producer message except ``session.read``.

    ``request_type`` echoes the request's ``type`` (when it could be decoded) so a producer
    that multiplexes one reply queue can tell receipts apart. Absent fields are omitted.
    """

    protocol_version: Literal[1] = 1
    type: Literal["receipt"] = "receipt"
    status: ReceiptStatus
    request_type: str | None = None
    session_id: str | None = None
    input: InputRecord | None = None
    results: list[CancelResult] | None = None
    turn_id: str | None = None
    command: CommandRecord | None = None
    error: ErrorInfo | None = None

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# --------------------------------------------------------------------------- observations


class _Envelope(Frozen):
    """What every observation carries around its payload (``DurableEvent.to_wire``)."""

    protocol_version: Literal[1] = 1
    session_id: str
    seq: int = Field(ge=0)
    revision: int = Field(ge=0)
    cursor: str


class InputAdmittedEvent(_Envelope, InputAdmitted):
    """``input.admitted``: a new pending input is recorded."""


class InputCancelledEvent(_Envelope, InputCancelled):
    """``input.cancelled``: inputs newly cancelled."""


class TurnStartedEvent(_Envelope, TurnStarted):
    """``turn.started``: a worker claimed input and begins a turn."""


class InputAcceptedEvent(_Envelope, InputAccepted):
    """``input.accepted``: steering input was taken into a running turn."""


class TurnCommittedEvent(_Envelope, TurnCommitted):
    """``turn.committed``: a turn's final commit."""


class CommandAppliedEvent(_Envelope, CommandApplied):
    """``session.command_applied``: a session command was applied."""


class TurnActivityEvent(_Envelope, TurnActivity):
    """``turn.activity``: live, best effort, ``durable: false``; never consumes a ``seq``."""


DurableObservation = Annotated[
    InputAdmittedEvent
    | InputCancelledEvent
    | TurnStartedEvent
    | InputAcceptedEvent
    | TurnCommittedEvent
    | CommandAppliedEvent,
    Field(discriminator="type"),
]

ObservationEvent = Annotated[
    InputAdmittedEvent
    | InputCancelledEvent
    | TurnStartedEvent
    | InputAcceptedEvent
    | TurnCommittedEvent
    | CommandAppliedEvent
    | TurnActivityEvent,
    Field(discriminator="type"),
]

_DURABLE_ADAPTER: TypeAdapter[DurableObservation] = TypeAdapter(DurableObservation)
_OBSERVATION_ADAPTER: TypeAdapter[ObservationEvent] = TypeAdapter(ObservationEvent)


def durable_observation(event: DurableEvent) -> DurableObservation:
    """The wire form of a stored durable event, as a typed model."""
    return _DURABLE_ADAPTER.validate_python(event.to_wire())


def parse_observation(body: bytes | str | dict[str, Any]) -> ObservationEvent:
    """Parse one message from ``{ns}.observations`` (for observers: CLI, tests, clients)."""
    if isinstance(body, dict):
        return _OBSERVATION_ADAPTER.validate_python(body)
    return _OBSERVATION_ADAPTER.validate_json(body)


class SessionReadResult(Frozen):
    """The answer to ``session.read``."""

    protocol_version: Literal[1] = 1
    type: Literal["session.read.result"] = "session.read.result"
    session_id: str
    head_revision: int
    last_seq: int
    running_turn_id: str | None
    messages: list[TranscriptMessage]
    pending_inputs: list[InputRecord]
    events: list[DurableObservation] | None = None
    gap: bool | None = None

    def to_wire(self) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        for optional in ("events", "gap"):
            if body[optional] is None:
                del body[optional]
        return body


Reply = Receipt | SessionReadResult


# --------------------------------------------------------------------------- decoding


class BadInput(Exception):
    """A message that must never be retried: dead-lettered and answered ``rejected``.

    ``session_id`` and ``message_type`` are filled in when the body got far enough to
    name them, so the rejection receipt can carry them.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        session_id: str | None = None,
        message_type: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.session_id = session_id
        self.message_type = message_type

    def receipt(self) -> Receipt:
        return Receipt(
            status=ReceiptStatus.REJECTED,
            request_type=self.message_type,
            session_id=self.session_id,
            error=ErrorInfo(code=self.code, message=self.message),
        )


def _summarise(exc: ValidationError, limit: int = 5) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "<body>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def decode_message(body: bytes, max_bytes: int) -> ProducerMessage:
    """Decode one ``{ns}.ingress`` body or raise :class:`BadInput`.

    The checks run cheapest first: size, UTF-8, JSON, object, ``protocol_version``,
    ``type``, then full validation. Validation is strict (``"5"`` is not a number) because
    wrong types are bad input, not something to coerce.
    """
    if len(body) > max_bytes:
        raise BadInput("too_large", f"body is {len(body)} bytes; the limit is {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput("invalid_utf8", f"body is not UTF-8: {exc.reason} at {exc.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput("invalid_json", f"body is not JSON: {exc.msg} at {exc.pos}") from None
    if not isinstance(obj, dict):
        raise BadInput("invalid_message", f"body is a JSON {type(obj).__name__}, not an object")
    session_id = obj.get("session_id") if isinstance(obj.get("session_id"), str) else None
    message_type = obj.get("type") if isinstance(obj.get("type"), str) else None
    version = obj.get("protocol_version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise BadInput(
            "unsupported_protocol_version",
            f"protocol_version must be {PROTOCOL_VERSION}, got {json.dumps(version)}",
            session_id=session_id,
            message_type=message_type,
        )
    if message_type not in MESSAGE_TYPES:
        raise BadInput(
            "unknown_type",
            f"unknown message type {json.dumps(obj.get('type'))}; "
            f"expected one of {', '.join(MESSAGE_TYPES)}",
            session_id=session_id,
        )
    try:
        return _MESSAGE_ADAPTER.validate_python(obj, strict=True)
    except ValidationError as exc:
        raise BadInput(
            "invalid_message",
            _summarise(exc),
            session_id=session_id,
            message_type=message_type,
        ) from None
