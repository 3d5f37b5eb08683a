"""Admission: turn decoded producer messages into durable state and replies.

This is the broker-independent half of ingress (``consumer.ingress`` is the AMQP half):
each message type maps to one store call, whose commit happens before this returns, so
the caller may ack afterwards. Submits can also be admitted several at a time
(:meth:`Admission.submit_many`, one ``Store.enqueue_inputs`` call) because under load
the per-transaction overhead, not the work, bounds how fast input is admitted. Store
failures that may pass (``RetryableStoreError``) propagate for the caller to retry;
requests the store refuses as malformed become :class:`~consumer.wire.BadInput`.
Admission never touches the session lease: a busy session's input is durable and its
lease holder picks it up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from consumer import wire
from consumer.observability.metrics import ADMISSION_BATCH_SIZE, ADMISSIONS
from consumer.observability.tracing import span
from lash_core.commands import CommandDraft
from lash_core.errors import InvalidRequest, SourceKeyConflict
from lash_core.inputs import PENDING_STATES, TurnInputDraft
from lash_core.leases import LeaseOwner, holder_is_definitely_dead
from lash_core.store.base import AdmissionStatus, InputAdmission, Store
from lash_core.transcript import to_transcript

WorkHook = Callable[[str], None]

MAX_READ_EVENTS = 10_000
"""At most this many events in one ``session.read.result``; a reader asks again after the
last one it got (the reply stays well inside usual AMQP frame and memory limits)."""
CancelHook = Callable[[str, str, str | None], bool]

SubmitOutcome = wire.Receipt | wire.BadInput
"""What one submit of a batch came to: its receipt, or the bad input to dead-letter."""


def amqp_source_key(message_id: str | None) -> str | None:
    """The fallback idempotency key of a message without its own (CONTRACT.md)."""
    return f"amqp:{message_id}" if message_id else None


class Admission:
    """Handles every producer message type against one store.

    ``on_work(session_id)`` is called after a commit that may have created work for the
    session (so this worker drains it without waiting for a notification round trip);
    ``cancel_local(session_id, turn_id, reason)`` signals a turn running in this process.
    With ``owner`` (this worker's lease identity), input admitted while a live lease holder
    exists does not call ``on_work``: the holder drains it (see
    :attr:`~lash_core.store.base.InputAdmission.held_by`); nor does input queued behind
    open input that no live holder runs: a drain was woken for that input (see
    :attr:`~lash_core.store.base.InputAdmission.behind_open_input`).
    """

    def __init__(
        self,
        store: Store,
        *,
        on_work: WorkHook | None = None,
        cancel_local: CancelHook | None = None,
        owner: LeaseOwner | None = None,
    ) -> None:
        self._store = store
        self._owner = owner
        self._on_work = on_work
        self._cancel_local = cancel_local

    async def handle(self, message: wire.ProducerMessage, message_id: str | None) -> wire.Reply:
        with span("lash.admission", message_type=message.type, session_id=message.session_id):
            try:
                return await self._dispatch(message, message_id)
            except InvalidRequest as exc:
                raise wire.BadInput(
                    exc.code,
                    str(exc),
                    session_id=message.session_id,
                    message_type=message.type,
                ) from exc

    async def submit_many(
        self, items: Sequence[tuple[wire.SubmitMessage, str | None]]
    ) -> list[SubmitOutcome]:
        """Admit several submits (``(message, amqp message_id)``) in one store call.

        One outcome per item, in order: a receipt, or a :class:`~consumer.wire.BadInput`
        for a submit the store refused as malformed (returned, not raised, so it does not
        fail the others). Inputs of one session are admitted in the order given. Errors
        that concern the whole call (``RetryableStoreError`` and anything unexpected)
        propagate: nothing may then be acked, and submitting the same items again is safe
        (admission is idempotent by source key).
        """
        if not items:
            return []
        sessions = {message.session_id for message, _ in items}
        attributes: dict[str, str | int] = {
            "message_type": "turn_input.submit",
            "batch_size": len(items),
        }
        if len(sessions) == 1:
            attributes["session_id"] = next(iter(sessions))
        with span("lash.admission", **attributes):
            ADMISSION_BATCH_SIZE.observe(len(items))
            return await self._admit_submits(items)

    async def _dispatch(self, message: wire.ProducerMessage, message_id: str | None) -> wire.Reply:
        if isinstance(message, wire.SubmitMessage):
            return await self._submit(message, message_id)
        if isinstance(message, wire.TurnInputCancelMessage):
            results = await self._store.cancel_inputs(message.session_id, message.targets)
            return self._receipt(message, wire.ReceiptStatus.OK, results=results)
        if isinstance(message, wire.TurnInputCancelSuffixMessage):
            suffix = await self._store.cancel_input_suffix(message.session_id, message.anchor)
            if not suffix.anchor_found:
                return self._receipt(message, wire.ReceiptStatus.ANCHOR_NOT_FOUND, results=[])
            return self._receipt(message, wire.ReceiptStatus.OK, results=suffix.results)
        if isinstance(message, wire.TurnCancelMessage):
            return await self._turn_cancel(message)
        if isinstance(message, wire.SessionCommandMessage):
            return await self._command(message, message_id)
        return await self.read(message.session_id, message.after_seq)

    def _receipt(
        self, message: wire.ProducerMessage, status: wire.ReceiptStatus, **fields: object
    ) -> wire.Receipt:
        return wire.Receipt.model_validate(
            {
                "status": status,
                "request_type": message.type,
                "session_id": message.session_id,
                **fields,
            }
        )

    def _needs_wake(self, admission: InputAdmission) -> bool:
        """Whether admitted input needs a drain woken: not when a live lease holder (this
        worker or another) will see it anyway, which saves a lease attempt per input, nor
        when a drain was already woken for the session's earlier open input (it claims
        this one too; another would race it for the lease and find nothing left), nor when
        the session runs where its events are published, another worker, which the
        admission's notification woke (a dead holder's lease is still this worker's to take
        over: only it knows that holder is dead)."""
        if admission.held_by is not None and self._owner is not None:
            return holder_is_definitely_dead(admission.held_by, self._owner)
        return not (admission.behind_open_input or admission.runs_elsewhere)

    def _work(self, session_id: str) -> None:
        if self._on_work is not None:
            self._on_work(session_id)

    async def _submit(self, message: wire.SubmitMessage, message_id: str | None) -> wire.Receipt:
        (outcome,) = await self._admit_submits([(message, message_id)])
        if isinstance(outcome, wire.BadInput):
            raise outcome
        return outcome

    async def _admit_submits(
        self, items: Sequence[tuple[wire.SubmitMessage, str | None]]
    ) -> list[SubmitOutcome]:
        """The one home of submit admission, for a single message or a batch."""
        drafts = [
            TurnInputDraft(
                session_id=message.session_id,
                input_id=message.input_id,
                source_key=message.source_key or amqp_source_key(message_id),
                ingress=message.ingress,
                input=message.input,
            )
            for message, message_id in items
        ]
        outcomes = await self._store.enqueue_inputs(drafts)
        if len(outcomes) != len(drafts):
            raise RuntimeError(f"store answered {len(outcomes)} outcomes for {len(drafts)} drafts")
        results: list[SubmitOutcome] = []
        for (message, _), outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, SourceKeyConflict):
                results.append(await self._conflict(message, outcome))
            elif isinstance(outcome, InvalidRequest):
                results.append(
                    wire.BadInput(
                        outcome.code,
                        str(outcome),
                        session_id=message.session_id,
                        message_type=message.type,
                    )
                )
            else:
                results.append(self._admitted(message, outcome))
        return results

    async def _conflict(self, message: wire.SubmitMessage, exc: SourceKeyConflict) -> wire.Receipt:
        ADMISSIONS.labels(status="conflict").inc()
        existing = await self._store.get_input(message.session_id, exc.existing_id)
        return self._receipt(
            message,
            wire.ReceiptStatus.CONFLICT,
            input=existing.public() if existing else None,
            error=wire.ErrorInfo(
                code=exc.code, message=str(exc), existing_input_id=exc.existing_id
            ),
        )

    def _admitted(self, message: wire.SubmitMessage, admission: InputAdmission) -> wire.Receipt:
        ADMISSIONS.labels(status=admission.status.value).inc()
        record = admission.record
        if record.state in PENDING_STATES and self._needs_wake(admission):
            self._work(message.session_id)
        status = (
            wire.ReceiptStatus.ADMITTED
            if admission.status is AdmissionStatus.ADMITTED
            else wire.ReceiptStatus.DUPLICATE
        )
        return self._receipt(message, status, input=record.public())

    async def _turn_cancel(self, message: wire.TurnCancelMessage) -> wire.Receipt:
        turn_id = await self._store.request_turn_cancel(
            message.session_id, message.turn_id, message.reason
        )
        if turn_id is None:
            return self._receipt(message, wire.ReceiptStatus.NO_RUNNING_TURN)
        # The store notifies every worker; signalling a local turn directly saves the trip.
        if self._cancel_local is not None:
            self._cancel_local(message.session_id, turn_id, message.reason)
        return self._receipt(message, wire.ReceiptStatus.CANCEL_REQUESTED, turn_id=turn_id)

    async def _command(
        self, message: wire.SessionCommandMessage, message_id: str | None
    ) -> wire.Receipt:
        key = message.idempotency_key or amqp_source_key(message_id)
        if key is None:
            raise wire.BadInput(
                "invalid_message",
                "session.command needs an idempotency_key (or an AMQP message_id)",
                session_id=message.session_id,
                message_type=message.type,
            )
        draft = CommandDraft(
            session_id=message.session_id, idempotency_key=key, command=message.command
        )
        try:
            admission = await self._store.enqueue_command(draft)
        except SourceKeyConflict as exc:
            return self._receipt(
                message,
                wire.ReceiptStatus.CONFLICT,
                error=wire.ErrorInfo(code=exc.code, message=str(exc)),
            )
        if admission.status is AdmissionStatus.ADMITTED:
            self._work(message.session_id)
            status = wire.ReceiptStatus.ADMITTED
        else:
            status = wire.ReceiptStatus.DUPLICATE
        return self._receipt(message, status, command=wire.CommandRecord.of(admission.command))

    async def read(self, session_id: str, after_seq: int | None = None) -> wire.SessionReadResult:
        """``session.read``: committed transcript, pending inputs, running turn, events."""
        view = await self._store.read_session(session_id, after_seq)
        events = None
        gap = None
        if view.events is not None:
            page = view.events
            stored = list(page.events)
            gap = page.gap
            # The store pages its answer; follow the pages up to the head the view saw.
            while stored and stored[-1].seq < view.last_seq and len(stored) < MAX_READ_EVENTS:
                more = await self._store.events_after(session_id, stored[-1].seq)
                if not more.events:
                    break
                stored.extend(more.events)
            events = [wire.durable_observation(e) for e in stored]
        return wire.SessionReadResult(
            session_id=session_id,
            head_revision=view.head_revision,
            last_seq=view.last_seq,
            running_turn_id=view.running_turn_id,
            messages=[to_transcript(n) for n in view.messages],
            pending_inputs=[p.public() for p in view.pending_inputs],
            events=events,
            gap=gap,
        )
