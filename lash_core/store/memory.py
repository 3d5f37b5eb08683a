"""The in-memory store: the reference double of :class:`~lash_core.store.base.Store`.

It is the embedded default for library use (no database) and the executable reading of the
store semantics that the conformance suite also runs against PostgreSQL. Every operation
runs under one :class:`asyncio.Lock`, works on a copy of the session it touches and swaps
the copy in only when the whole operation succeeded, so a raising operation changes
nothing (the in-memory equivalent of a rolled-back transaction). Decisions are made by the
pure rules in ``lash_core.inputs`` / ``leases`` / ``claims`` / ``commands`` / ``commit``;
this module only keeps rows and applies them. Time is the injected :class:`Clock`.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lash_core import claims as claim_rules
from lash_core import leases as lease_rules
from lash_core.claims import (
    ActiveTurnMode,
    ClaimMode,
    CommandClaim,
    NextTurnMode,
    TurnInputClaim,
)
from lash_core.clock import Clock, IdFactory, SystemClock, UuidIds
from lash_core.commands import CommandDraft, CommandState, QueuedCommand, same_command
from lash_core.commit import CommitResult, RuntimeCommit, SessionConfig
from lash_core.errors import (
    HeadRevisionConflict,
    LeaseLost,
    SessionMismatch,
    SourceKeyConflict,
    SteeringPending,
    Superseded,
    TurnCommitConflict,
)
from lash_core.events import (
    CommandApplied,
    DurableEvent,
    EventKey,
    EventPayload,
    InputAccepted,
    InputAdmitted,
    InputCancelled,
    TurnCommitted,
    TurnStarted,
    session_shard,
)
from lash_core.inputs import (
    OPEN_STATES,
    PENDING_STATES,
    TERMINAL_STATES,
    ActiveTurnIngress,
    CancelOutcomeKind,
    CancelResult,
    CancelTarget,
    CheckpointKind,
    InputIdTarget,
    InputState,
    NextTurnIngress,
    PendingTurnInput,
    RowClaim,
    SuffixCancelResult,
    TurnInputDraft,
    admitted_ingress,
    boundary_admits,
    cancel_decision,
    claim_diagnostics,
    claim_is_live,
    claimable_by_generation,
    has_open_input,
    initial_state,
    requested_turn_id,
    same_content,
    select_active_claim,
    select_next_turn_claim,
    target_matches,
)
from lash_core.leases import (
    Acquired,
    DeadCheck,
    LeaseClaimResult,
    LeaseFence,
    LeaseOwner,
    LeaseRow,
    holder_is_definitely_dead,
)
from lash_core.outcomes import Usage
from lash_core.store.base import (
    MAX_CLAIM_INPUTS,
    AdmissionStatus,
    CommandAdmission,
    EventPage,
    InputAdmission,
    Notification,
    Residency,
    SessionState,
    SessionView,
    Store,
    TenureStart,
    TurnStart,
    VacuumReport,
)
from lash_core.transcript import (
    GraphAppend,
    GraphReplace,
    MessageNode,
    active_path,
    ingress_message_id,
    to_transcript,
)

_Kind = Literal["work", "cancel", "events"]


@dataclass
class _Session:
    """Every row of one session. ``exists`` is the session row; a lease row alone is not."""

    session_id: str
    exists: bool = False
    head_revision: int = 0
    leaf_node_id: str | None = None
    nodes: dict[str, MessageNode] = field(default_factory=dict)
    config: SessionConfig | None = None
    checkpoint: dict[str, Any] | None = None
    usage: Usage = field(default_factory=Usage)
    last_seq: int = 0
    lease: LeaseRow | None = None
    inputs: dict[str, PendingTurnInput] = field(default_factory=dict)
    commands: dict[str, QueuedCommand] = field(default_factory=dict)
    # Terminal time of cancelled/completed inputs and commands (what vacuum ages by).
    terminal_at_ms: dict[str, int] = field(default_factory=dict)
    events: dict[int, DurableEvent] = field(default_factory=dict)
    published: set[int] = field(default_factory=set)
    stamps: dict[str, tuple[str, CommitResult]] = field(default_factory=dict)

    def clone(self) -> _Session:
        """A copy whose containers can be mutated without touching this one (rows are frozen)."""
        return _Session(
            session_id=self.session_id,
            exists=self.exists,
            head_revision=self.head_revision,
            leaf_node_id=self.leaf_node_id,
            nodes=dict(self.nodes),
            config=self.config,
            checkpoint=self.checkpoint,
            usage=self.usage,
            last_seq=self.last_seq,
            lease=self.lease,
            inputs=dict(self.inputs),
            commands=dict(self.commands),
            terminal_at_ms=dict(self.terminal_at_ms),
            events=dict(self.events),
            published=set(self.published),
            stamps=dict(self.stamps),
        )

    def sorted_inputs(self) -> list[PendingTurnInput]:
        return sorted(self.inputs.values(), key=lambda r: r.enqueue_seq)

    def sorted_commands(self) -> list[QueuedCommand]:
        return sorted(self.commands.values(), key=lambda c: c.enqueue_seq)

    def input_by_source_key(self, source_key: str) -> PendingTurnInput | None:
        for record in self.inputs.values():
            if record.source_key == source_key:
                return record
        return None

    def append_event(self, payload: EventPayload, now_ms: int) -> DurableEvent:
        """Append the next gapless ``seq``; the revision is the head after the write."""
        self.last_seq += 1
        event = DurableEvent(
            session_id=self.session_id,
            seq=self.last_seq,
            revision=self.head_revision,
            payload=payload,
            created_at_ms=now_ms,
        )
        self.events[event.seq] = event
        return event

    def first_pending_command_seq(self, generation: int | None = None) -> int | None:
        """``enqueue_seq`` of the earliest pending command (claimable by ``generation``, if
        given: one this generation claimed is being applied): next-turn claims stop there."""
        return min(
            (
                c.enqueue_seq
                for c in self.commands.values()
                if c.state is CommandState.PENDING
                and (generation is None or claimable_by_generation(c.claim, generation))
            ),
            default=None,
        )

    def live_lease(self, now_ms: int) -> LeaseRow | None:
        return self.lease if self.lease is not None and self.lease.is_live(now_ms) else None

    def claim_live(self, claim: RowClaim | None, now_ms: int) -> bool:
        return claim_is_live(claim, self.lease, now_ms)


class _Subscription:
    """One ``notifications()`` stream: registered at creation so no wake-up is missed."""

    def __init__(self, registry: weakref.WeakSet[_Subscription]) -> None:
        self._queue: asyncio.Queue[Notification] = asyncio.Queue()
        self._registry = registry
        registry.add(self)

    def push(self, notification: Notification) -> None:
        self._queue.put_nowait(notification)

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> Notification:
        return await self._queue.get()

    async def aclose(self) -> None:
        self._registry.discard(self)


class InMemoryStore(Store):
    """All state in process memory; one lock serialises every operation."""

    def __init__(self, clock: Clock | None = None, ids: IdFactory | None = None) -> None:
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._ids: IdFactory = ids if ids is not None else UuidIds()
        self._lock = asyncio.Lock()
        self._sessions: dict[str, _Session] = {}
        self._input_sessions: dict[str, str] = {}
        self._enqueue_seq = 0
        self._subscribers: weakref.WeakSet[_Subscription] = weakref.WeakSet()

    # ------------------------------------------------------------------ helpers

    def _now(self) -> int:
        return self._clock.now_ms()

    def _copy(self, session_id: str) -> _Session:
        current = self._sessions.get(session_id)
        return current.clone() if current is not None else _Session(session_id=session_id)

    def _read(self, session_id: str) -> _Session:
        return self._sessions.get(session_id) or _Session(session_id=session_id)

    def _swap(self, session: _Session) -> None:
        self._sessions[session.session_id] = session

    def _next_seq(self) -> int:
        self._enqueue_seq += 1
        return self._enqueue_seq

    def _notify(
        self,
        kind: _Kind,
        session_id: str,
        turn_id: str | None = None,
        *,
        for_publisher: bool = False,
    ) -> None:
        if kind == "events" and (local := self._quiet_events(session_id)) is not None:
            # Changes here are visible at once: there is no commit to wait for.
            local.wake()
            return
        notification = Notification(
            kind=kind, session_id=session_id, turn_id=turn_id, for_publisher=for_publisher
        )
        for subscriber in list(self._subscribers):
            subscriber.push(notification)

    async def reset(self) -> None:
        """Forget every row (tests only). Subscribers stay subscribed."""
        async with self._lock:
            self._sessions.clear()
            self._input_sessions.clear()
            self._enqueue_seq = 0

    # ------------------------------------------------------------------ clock

    async def now_ms(self) -> int:
        return self._now()

    # ------------------------------------------------------------------ admission

    async def enqueue_input(self, draft: TurnInputDraft) -> InputAdmission:
        async with self._lock:
            now = self._now()
            s = self._copy(draft.session_id)
            existing = s.input_by_source_key(draft.source_key) if draft.source_key else None
            if existing is None and draft.input_id is not None:
                owner_session = self._input_sessions.get(draft.input_id)
                if owner_session is not None:
                    existing = self._read(owner_session).inputs.get(draft.input_id)
            if existing is not None:
                key = draft.source_key or draft.input_id or existing.input_id
                if (
                    existing.session_id == draft.session_id
                    and (draft.source_key is None or existing.source_key == draft.source_key)
                    and same_content(draft, existing)
                ):
                    return InputAdmission(status=AdmissionStatus.DUPLICATE, record=existing)
                raise SourceKeyConflict(draft.session_id, key, existing.input_id)

            lease = s.live_lease(now)
            behind = any(r.state in OPEN_STATES for r in s.inputs.values())
            ingress = admitted_ingress(draft.ingress, lease.running_turn_id if lease else None)
            record = PendingTurnInput(
                input_id=draft.input_id or self._ids.new_id("ti_"),
                session_id=draft.session_id,
                source_key=draft.source_key,
                ingress=ingress,
                state=initial_state(ingress),
                enqueue_seq=self._next_seq(),
                input=draft.input,
                submitted_ingress=draft.ingress,
                enqueued_at_ms=now,
            )
            s.exists = True
            s.inputs[record.input_id] = record
            event = s.append_event(InputAdmitted(input=record.public()), now)
            self._swap(s)
            self._input_sessions[record.input_id] = s.session_id
            elsewhere = self._runs_elsewhere(s.session_id)
            # A live holder sees the input anyway: the publisher need not drain it.
            self._notify("work", s.session_id, for_publisher=elsewhere and lease is None)
            self._notify("events", s.session_id)
            return InputAdmission(
                status=AdmissionStatus.ADMITTED,
                record=record,
                event=event,
                held_by=lease.owner if lease else None,
                behind_open_input=behind,
                runs_elsewhere=elsewhere,
            )

    async def get_input(self, session_id: str, input_id: str) -> PendingTurnInput | None:
        async with self._lock:
            return self._read(session_id).inputs.get(input_id)

    async def list_inputs(self, session_id: str) -> list[PendingTurnInput]:
        async with self._lock:
            return self._read(session_id).sorted_inputs()

    def _pending_inputs(self, s: _Session, now: int) -> list[PendingTurnInput]:
        return [
            r
            for r in s.sorted_inputs()
            if r.state in PENDING_STATES and not s.claim_live(r.claim, now)
        ]

    async def list_pending_inputs(self, session_id: str) -> list[PendingTurnInput]:
        async with self._lock:
            return self._pending_inputs(self._read(session_id), self._now())

    def _cancel_one(
        self, s: _Session, target: CancelTarget, record: PendingTurnInput | None, now: int
    ) -> CancelResult:
        """Apply the pure cancel decision to one row of ``s`` (mutating the copy)."""
        outcome = cancel_decision(record, s.claim_live(record.claim if record else None, now))
        if record is None:
            return CancelResult(target=target, outcome=outcome)
        if outcome is CancelOutcomeKind.CANCELLED:
            record = record.model_copy(update={"state": InputState.CANCELLED, "claim": None})
            s.inputs[record.input_id] = record
            s.terminal_at_ms[record.input_id] = now
        diagnostics = (
            claim_diagnostics(record) if outcome is CancelOutcomeKind.ALREADY_CLAIMED else None
        )
        return CancelResult(
            target=target, outcome=outcome, input=record.public(), claim=diagnostics
        )

    def _finish_cancel(self, s: _Session, results: Sequence[CancelResult], now: int) -> None:
        cancelled = [
            r.input.input_id
            for r in results
            if r.outcome is CancelOutcomeKind.CANCELLED and r.input is not None
        ]
        if cancelled:
            s.append_event(InputCancelled(input_ids=cancelled), now)
        self._swap(s)
        if cancelled:
            self._notify("events", s.session_id)

    async def cancel_inputs(
        self, session_id: str, targets: Sequence[CancelTarget]
    ) -> list[CancelResult]:
        async with self._lock:
            now = self._now()
            s = self._copy(session_id)
            results: list[CancelResult] = []
            for target in targets:
                record = next((r for r in s.sorted_inputs() if target_matches(target, r)), None)
                results.append(self._cancel_one(s, target, record, now))
            self._finish_cancel(s, results, now)
            return results

    async def cancel_input_suffix(
        self, session_id: str, anchor: CancelTarget
    ) -> SuffixCancelResult:
        async with self._lock:
            now = self._now()
            s = self._copy(session_id)
            rows = s.sorted_inputs()
            found = next((r for r in rows if target_matches(anchor, r)), None)
            if found is None:
                return SuffixCancelResult(anchor=anchor, anchor_found=False)
            results = [
                self._cancel_one(s, InputIdTarget(value=r.input_id), r, now)
                for r in rows
                if r.enqueue_seq >= found.enqueue_seq
            ]
            self._finish_cancel(s, results, now)
            return SuffixCancelResult(anchor=anchor, anchor_found=True, results=results)

    async def abandon_input_claim(self, claim: TurnInputClaim) -> None:
        async with self._lock:
            s = self._copy(claim.session_id)
            changed = False
            for record in s.sorted_inputs():
                rc = record.claim
                if rc is None or rc.claim_id != claim.claim_id:
                    continue
                if rc.claim_token != claim.claim_token:
                    continue
                state = (
                    InputState.PENDING_ACTIVE
                    if record.state is InputState.ACCEPTED
                    else record.state
                )
                s.inputs[record.input_id] = record.model_copy(
                    update={"state": state, "claim": None}
                )
                changed = True
            if changed:
                self._swap(s)
                self._notify("work", s.session_id)

    # ------------------------------------------------------------------ leases

    def _apply_lease(self, s: _Session, decision: lease_rules.LeaseDecision) -> LeaseClaimResult:
        if decision.write is not None:
            s.lease = decision.write
            self._swap(s)
        return decision.result

    async def try_claim_lease(
        self, session_id: str, owner: LeaseOwner, ttl_ms: int
    ) -> LeaseClaimResult:
        async with self._lock:
            s = self._copy(session_id)
            decision = lease_rules.decide_try_claim(s.lease, session_id, owner, self._now(), ttl_ms)
            return self._apply_lease(s, decision)

    async def reclaim_lease(
        self,
        session_id: str,
        owner: LeaseOwner,
        observed_holder: LeaseFence,
        ttl_ms: int,
        holder_is_dead: DeadCheck | None = None,
    ) -> LeaseClaimResult:
        async with self._lock:
            s = self._copy(session_id)
            decision = lease_rules.decide_reclaim(
                s.lease,
                session_id,
                owner,
                observed_holder,
                self._now(),
                ttl_ms,
                holder_is_dead or holder_is_definitely_dead,
            )
            return self._apply_lease(s, decision)

    async def renew_lease(self, fence: LeaseFence, ttl_ms: int) -> LeaseRow:
        async with self._lock:
            s = self._copy(fence.session_id)
            row = lease_rules.decide_renew(s.lease, fence, self._now(), ttl_ms)
            s.lease = row
            self._swap(s)
            return row

    async def release_lease(self, fence: LeaseFence) -> None:
        async with self._lock:
            s = self._copy(fence.session_id)
            row = lease_rules.decide_release(s.lease, fence)
            if row is None:
                return
            s.lease = row
            self._swap(s)
            self._notify("work", s.session_id)

    async def read_lease(self, session_id: str) -> LeaseRow | None:
        async with self._lock:
            return self._read(session_id).lease

    # ------------------------------------------------------------------ claims

    def _validated(self, fence: LeaseFence, now: int) -> _Session:
        s = self._copy(fence.session_id)
        lease_rules.validate_fence(s.lease, fence, fence.session_id, now)
        return s

    def _claim_inputs(
        self,
        s: _Session,
        rows: Sequence[PendingTurnInput],
        fence: LeaseFence,
        owner: LeaseOwner,
        mode: ClaimMode,
        state: InputState,
        now: int,
    ) -> TurnInputClaim:
        """Write claim columns on ``rows`` (head first) and describe the claim (§3.4)."""
        head = rows[0]
        fencing_token = head.claim_fencing_token + 1
        claim_id = claim_rules.input_claim_id(head.enqueue_seq, fencing_token)
        token = claim_rules.claim_token(s.session_id, owner, claim_id, now)
        row_claim = RowClaim(
            claim_id=claim_id,
            owner=owner,
            claim_token=token,
            session_lease_generation=fence.fencing_token,
        )
        claimed = [
            r.model_copy(
                update={
                    "state": state,
                    "claim": row_claim,
                    "claim_fencing_token": r.claim_fencing_token + 1,
                }
            )
            for r in rows
        ]
        for r in claimed:
            s.inputs[r.input_id] = r
        return TurnInputClaim(
            session_id=s.session_id,
            claim_id=claim_id,
            owner=owner,
            claim_token=token,
            fencing_token=fencing_token,
            session_lease_generation=fence.fencing_token,
            mode=mode,
            inputs=claimed,
        )

    def _claim_next_turn(
        self, s: _Session, fence: LeaseFence, owner: LeaseOwner, max_inputs: int, now: int
    ) -> TurnInputClaim | None:
        rows = select_next_turn_claim(
            s.inputs.values(),
            generation=fence.fencing_token,
            max_inputs=max_inputs,
            before_seq=s.first_pending_command_seq(fence.fencing_token),
        )
        if not rows:
            return None
        return self._claim_inputs(
            s, rows, fence, owner, NextTurnMode(), InputState.DEFERRED_NEXT_TURN, now
        )

    @staticmethod
    def _resolve_orphans(s: _Session, generation: int, now: int) -> list[str]:
        """Settle input a dead generation left behind (DESIGN.md difference 3)."""
        resolved: list[str] = []
        for record in s.sorted_inputs():
            orphan_accepted = record.state is InputState.ACCEPTED and (
                record.claim is None or record.claim.session_lease_generation != generation
            )
            if not orphan_accepted and record.state is not InputState.PENDING_ACTIVE:
                continue
            if orphan_accepted and ingress_message_id(record.input_id) in s.nodes:
                s.inputs[record.input_id] = record.model_copy(
                    update={"state": InputState.COMPLETED, "claim": None}
                )
                s.terminal_at_ms[record.input_id] = now
            else:
                s.inputs[record.input_id] = record.model_copy(
                    update={
                        "state": InputState.DEFERRED_NEXT_TURN,
                        "ingress": NextTurnIngress(),
                        "claim": None,
                    }
                )
            resolved.append(record.input_id)
        return resolved

    async def start_turn(
        self,
        fence: LeaseFence,
        turn_id: str | None = None,
        *,
        claim_next_turn_inputs: bool = True,
        require_inputs: bool = True,
        max_inputs: int = MAX_CLAIM_INPUTS,
    ) -> TurnStart | None:
        async with self._lock:
            now = self._now()
            s = self._validated(fence, now)
            return self._start_turn(
                s, fence, turn_id, claim_next_turn_inputs, require_inputs, max_inputs, now
            )

    def _start_turn(
        self,
        s: _Session,
        fence: LeaseFence,
        turn_id: str | None,
        claim_next_turn_inputs: bool,
        require_inputs: bool,
        max_inputs: int,
        now: int,
    ) -> TurnStart | None:
        """``start_turn`` on the working copy ``s`` (validated); swaps it in on success."""
        resolved = self._resolve_orphans(s, fence.fencing_token, now)
        claim = (
            self._claim_next_turn(s, fence, fence.owner, max_inputs, now)
            if claim_next_turn_inputs
            else None
        )
        if require_inputs and claim is None:
            # No turn starts, but input a dead generation left behind is still settled now:
            # otherwise the recovery sweep would keep waking a session with nothing to run.
            if resolved:
                self._swap(s)
            return None
        assert s.lease is not None
        turn_id = (
            turn_id or requested_turn_id(claim.inputs if claim else []) or self._ids.new_id("turn_")
        )
        s.exists = True
        s.lease = s.lease.model_copy(
            update={
                "running_turn_id": turn_id,
                "cancel_requested": False,
                "cancel_reason": None,
            }
        )
        input_ids = [r.input_id for r in claim.inputs] if claim else []
        event = s.append_event(
            TurnStarted(turn_id=turn_id, input_ids=input_ids, lease_generation=fence.fencing_token),
            now,
        )
        self._swap(s)
        self._notify("events", s.session_id)
        return TurnStart(
            session_id=s.session_id,
            turn_id=turn_id,
            lease_generation=fence.fencing_token,
            claim=claim,
            resolved_input_ids=resolved,
            event=event,
            leaf_node_id=s.leaf_node_id,
            command_pending=s.first_pending_command_seq(fence.fencing_token) is not None,
        )

    async def acquire_and_start_turn(
        self,
        session_id: str,
        owner: LeaseOwner,
        ttl_ms: int,
        *,
        max_inputs: int = MAX_CLAIM_INPUTS,
        only_if_work: bool = False,
    ) -> TenureStart:
        async with self._lock:
            now = self._now()
            s = self._copy(session_id)
            previous = s.lease
            decision = lease_rules.decide_try_claim(s.lease, session_id, owner, now, ttl_ms)
            result = self._apply_lease(s, decision)
            if not isinstance(result, Acquired):
                return TenureStart(lease=result)
            s = self._copy(session_id)
            turn = self._start_turn(s, result.lease.fence(), None, True, True, max_inputs, now)
            command_pending = (
                self._read(session_id).first_pending_command_seq(result.lease.fencing_token)
                is not None
            )
            if only_if_work and turn is None and not command_pending:
                # Leave the lease as it was (orphan resolution, if any, stays written).
                self._read(session_id).lease = previous
                return TenureStart(lease=None)
            return TenureStart(lease=result, turn=turn, command_pending=command_pending)

    async def claim_next_turn_inputs(
        self, fence: LeaseFence, owner: LeaseOwner, max_inputs: int = MAX_CLAIM_INPUTS
    ) -> TurnInputClaim | None:
        async with self._lock:
            now = self._now()
            s = self._validated(fence, now)
            claim = self._claim_next_turn(s, fence, owner, max_inputs, now)
            if claim is not None:
                self._swap(s)
            return claim

    async def claim_active_turn_inputs(
        self,
        fence: LeaseFence,
        owner: LeaseOwner,
        turn_id: str,
        checkpoint: CheckpointKind,
        max_inputs: int = MAX_CLAIM_INPUTS,
    ) -> TurnInputClaim | None:
        async with self._lock:
            now = self._now()
            s = self._validated(fence, now)
            rows = select_active_claim(
                s.inputs.values(),
                turn_id=turn_id,
                checkpoint=checkpoint,
                generation=fence.fencing_token,
                max_inputs=max_inputs,
            )
            if not rows:
                return None
            mode = ActiveTurnMode(turn_id=turn_id, checkpoint=checkpoint)
            claim = self._claim_inputs(s, rows, fence, owner, mode, InputState.ACCEPTED, now)
            s.append_event(
                InputAccepted(turn_id=turn_id, input_ids=[r.input_id for r in claim.inputs]), now
            )
            self._swap(s)
            self._notify("events", s.session_id)
            return claim

    async def has_active_input(
        self, session_id: str, turn_id: str, checkpoint: CheckpointKind
    ) -> bool:
        async with self._lock:
            return self._steering_pending(self._read(session_id), turn_id, checkpoint)

    def _steering_pending(self, s: _Session, turn_id: str, checkpoint: CheckpointKind) -> bool:
        """Whether ``turn_id`` could accept steering input of ``s`` at ``checkpoint``."""
        now = self._now()
        return any(
            r.state is InputState.PENDING_ACTIVE
            and isinstance(r.ingress, ActiveTurnIngress)
            and r.ingress.turn_id == turn_id
            and boundary_admits(r.ingress.min_boundary, checkpoint)
            and not s.claim_live(r.claim, now)
            for r in s.inputs.values()
        )

    # ------------------------------------------------------------------ queued commands

    async def enqueue_command(self, draft: CommandDraft) -> CommandAdmission:
        async with self._lock:
            now = self._now()
            s = self._copy(draft.session_id)
            key = draft.source_key
            existing = next((c for c in s.commands.values() if c.source_key == key), None)
            if existing is not None:
                if same_command(draft, existing):
                    return CommandAdmission(status=AdmissionStatus.DUPLICATE, command=existing)
                raise SourceKeyConflict(draft.session_id, key, existing.batch_id)
            command = QueuedCommand(
                batch_id=self._ids.new_id("qwb_"),
                session_id=draft.session_id,
                enqueue_seq=self._next_seq(),
                source_key=key,
                command=draft.command,
                state=CommandState.PENDING,
                enqueued_at_ms=now,
            )
            s.exists = True
            s.commands[command.batch_id] = command
            self._swap(s)
            self._notify("work", s.session_id)
            return CommandAdmission(status=AdmissionStatus.ADMITTED, command=command)

    async def list_commands(
        self, session_id: str, *, pending_only: bool = False
    ) -> list[QueuedCommand]:
        async with self._lock:
            now = self._now()
            s = self._read(session_id)
            commands = s.sorted_commands()
            if not pending_only:
                return commands
            return [
                c
                for c in commands
                if c.state is CommandState.PENDING and not s.claim_live(c.claim, now)
            ]

    async def cancel_command(self, session_id: str, batch_id: str) -> QueuedCommand | None:
        async with self._lock:
            now = self._now()
            s = self._copy(session_id)
            command = s.commands.get(batch_id)
            if (
                command is None
                or command.state is not CommandState.PENDING
                or s.claim_live(command.claim, now)
            ):
                return None
            command = command.model_copy(update={"state": CommandState.CANCELLED, "claim": None})
            s.commands[batch_id] = command
            s.terminal_at_ms[batch_id] = now
            self._swap(s)
            return command

    async def claim_leading_command(
        self, fence: LeaseFence, owner: LeaseOwner
    ) -> CommandClaim | None:
        async with self._lock:
            now = self._now()
            s = self._validated(fence, now)
            generation = fence.fencing_token
            command = next(
                (
                    c
                    for c in s.sorted_commands()
                    if c.state is CommandState.PENDING
                    and claimable_by_generation(c.claim, generation)
                ),
                None,
            )
            if command is None:
                return None
            first_input = next(
                (
                    r
                    for r in s.sorted_inputs()
                    if r.state is InputState.DEFERRED_NEXT_TURN
                    and claimable_by_generation(r.claim, generation)
                ),
                None,
            )
            if first_input is not None and first_input.enqueue_seq < command.enqueue_seq:
                return None
            fencing_token = command.claim_fencing_token + 1
            claim_id = claim_rules.command_claim_id(command.enqueue_seq, fencing_token)
            token = claim_rules.claim_token(s.session_id, owner, claim_id, now)
            command = command.model_copy(
                update={
                    "claim": RowClaim(
                        claim_id=claim_id,
                        owner=owner,
                        claim_token=token,
                        session_lease_generation=generation,
                    ),
                    "claim_fencing_token": fencing_token,
                }
            )
            s.commands[command.batch_id] = command
            self._swap(s)
            return CommandClaim(
                session_id=s.session_id,
                claim_id=claim_id,
                owner=owner,
                claim_token=token,
                fencing_token=fencing_token,
                session_lease_generation=generation,
                command=command,
            )

    # ------------------------------------------------------------------ commit

    @staticmethod
    def _check_binding(commit: RuntimeCommit) -> None:
        sid = commit.session_id
        if commit.fence is not None and commit.fence.session_id != sid:
            raise SessionMismatch(f"fence for {commit.fence.session_id!r} used on session {sid!r}")
        for ic in commit.completed_input_claims:
            if ic.session_id != sid:
                raise Superseded(sid, ic.claim_id, "turn_input")
        for cc in commit.completed_command_claims:
            if cc.session_id != sid:
                raise Superseded(sid, cc.claim_id, "command")

    @staticmethod
    def _complete_claims(s: _Session, commit: RuntimeCommit, now: int) -> None:
        """Validate every completion, then settle the rows (§3.5); raises ``Superseded``."""
        for ic in commit.completed_input_claims:
            for input_id in ic.input_ids:
                record = s.inputs.get(input_id)
                rc = record.claim if record else None
                if rc is None or rc.claim_id != ic.claim_id or rc.claim_token != ic.claim_token:
                    raise Superseded(s.session_id, ic.claim_id, "turn_input")
        for cc in commit.completed_command_claims:
            for batch_id in cc.batch_ids:
                command = s.commands.get(batch_id)
                rc = command.claim if command else None
                if rc is None or rc.claim_id != cc.claim_id or rc.claim_token != cc.claim_token:
                    raise Superseded(s.session_id, cc.claim_id, "command")
        for ic in commit.completed_input_claims:
            for input_id in ic.input_ids:
                s.inputs[input_id] = s.inputs[input_id].model_copy(
                    update={"state": InputState.COMPLETED, "claim": None}
                )
                s.terminal_at_ms[input_id] = now
        for cc in commit.completed_command_claims:
            for batch_id in cc.batch_ids:
                s.commands[batch_id] = s.commands[batch_id].model_copy(
                    update={"state": CommandState.COMPLETED, "claim": None}
                )
                s.terminal_at_ms[batch_id] = now

    @staticmethod
    def _defer_active(s: _Session, turn_id: str) -> list[str]:
        deferred: list[str] = []
        for record in s.sorted_inputs():
            if (
                record.state is InputState.PENDING_ACTIVE
                and isinstance(record.ingress, ActiveTurnIngress)
                and record.ingress.turn_id == turn_id
            ):
                s.inputs[record.input_id] = record.model_copy(
                    update={
                        "state": InputState.DEFERRED_NEXT_TURN,
                        "ingress": NextTurnIngress(),
                        "claim": None,
                    }
                )
                deferred.append(record.input_id)
        return deferred

    async def commit(self, commit: RuntimeCommit) -> CommitResult:
        async with self._lock:
            now = self._now()
            self._check_binding(commit)
            s = self._copy(commit.session_id)
            if commit.turn is not None:
                stamp = s.stamps.get(commit.turn.turn_id)
                if stamp is not None:
                    if stamp[0] != commit.commit_hash():
                        raise TurnCommitConflict(s.session_id, commit.turn.turn_id)
                    if commit.release_lease and commit.fence is not None:
                        row = lease_rules.decide_release(s.lease, commit.fence)
                        if row is not None:
                            s.lease = row
                            self._swap(s)
                            self._notify("work", s.session_id)
                    # Released now, by the landed attempt, or lost: the fence holds nothing.
                    gone = commit.fence is None or not lease_rules.fence_matches(
                        s.lease, commit.fence
                    )
                    return stamp[1].model_copy(
                        update={"replayed": True, "released": gone, "command_pending": False}
                    )
            if commit.fence is None:
                raise LeaseLost(s.session_id, "commit without a lease fence")
            lease_rules.validate_fence(s.lease, commit.fence, s.session_id, now)
            if (
                commit.expected_head_revision is not None
                and commit.expected_head_revision != s.head_revision
            ):
                raise HeadRevisionConflict(
                    s.session_id, commit.expected_head_revision, s.head_revision
                )
            turn = commit.turn
            checkpoint = commit.steering_checkpoint
            if turn and checkpoint and self._steering_pending(s, turn.turn_id, checkpoint):
                raise SteeringPending(s.session_id, turn.turn_id)
            self._complete_claims(s, commit, now)

            new_nodes: list[MessageNode] = []
            graph = commit.graph
            if isinstance(graph, GraphAppend):
                for node in graph.nodes:
                    s.nodes[node.node_id] = node
                s.leaf_node_id = graph.leaf_node_id
                new_nodes = list(graph.nodes)
            elif isinstance(graph, GraphReplace):
                s.nodes = {n.node_id: n for n in graph.nodes}
                s.leaf_node_id = graph.leaf_node_id
                new_nodes = list(graph.nodes)
            if commit.config is not None:
                s.config = commit.config
            if commit.checkpoint is not None:
                s.checkpoint = commit.checkpoint
            if commit.usage is not None:
                s.usage = s.usage + commit.usage
            s.head_revision += 1
            s.exists = True

            deferred = (
                self._defer_active(s, commit.defer_active_inputs_of_turn)
                if commit.defer_active_inputs_of_turn is not None
                else []
            )
            if commit.turn is not None and s.lease is not None:
                s.lease = s.lease.model_copy(
                    update={
                        "running_turn_id": None,
                        "cancel_requested": False,
                        "cancel_reason": None,
                    }
                )

            events: list[DurableEvent] = []
            if commit.applied_command is not None:
                events.append(s.append_event(CommandApplied(command=commit.applied_command), now))
            if commit.turn is not None:
                payload = TurnCommitted(
                    turn_id=commit.turn.turn_id,
                    outcome=commit.turn.outcome,
                    messages=[to_transcript(n) for n in new_nodes],
                    usage=commit.turn.usage,
                    input_ids=[i for ic in commit.completed_input_claims for i in ic.input_ids],
                    deferred_input_ids=deferred,
                )
                events.append(s.append_event(payload, now))
            command_pending = s.first_pending_command_seq() is not None
            idle = (
                commit.release_lease_if_idle
                and not command_pending
                and not has_open_input(s.inputs.values())
            )
            released = False
            if commit.release_lease or idle:
                row = lease_rules.decide_release(s.lease, commit.fence)
                if row is not None:
                    s.lease = row
                    released = True
            result = CommitResult(
                session_id=s.session_id,
                head_revision=s.head_revision,
                events=events,
                deferred_input_ids=deferred,
                released=released,
                command_pending=command_pending and commit.release_lease_if_idle,
            )
            if commit.turn is not None:
                s.stamps[commit.turn.turn_id] = (commit.commit_hash(), result)
            self._swap(s)
            if events:
                self._notify("events", s.session_id)
            # An idle release wakes nobody: there is no work to take over.
            if deferred or (released and not idle):
                self._notify("work", s.session_id)
            return result

    # ------------------------------------------------------------------ reading

    async def load_state(
        self, session_id: str, residency: Residency = Residency.FULL
    ) -> SessionState:
        async with self._lock:
            s = self._read(session_id)
            nodes = (
                list(s.nodes.values())
                if residency is Residency.FULL
                else active_path(s.nodes.values(), s.leaf_node_id)
            )
            return SessionState(
                session_id=session_id,
                exists=s.exists,
                head_revision=s.head_revision,
                leaf_node_id=s.leaf_node_id,
                nodes=nodes,
                config=s.config,
                checkpoint=s.checkpoint,
                usage=s.usage,
                last_seq=s.last_seq,
            )

    @staticmethod
    def _events_after(s: _Session, after_seq: int, limit: int) -> EventPage:
        retained = sorted(s.events)
        events = [s.events[q] for q in retained if q > after_seq][:limit]
        gap = after_seq < s.last_seq and (not retained or retained[0] > after_seq + 1)
        return EventPage(
            session_id=s.session_id,
            after_seq=after_seq,
            events=events,
            gap=gap,
            last_seq=s.last_seq,
        )

    async def read_session(self, session_id: str, after_seq: int | None = None) -> SessionView:
        async with self._lock:
            now = self._now()
            s = self._read(session_id)
            lease = s.live_lease(now)
            return SessionView(
                session_id=session_id,
                head_revision=s.head_revision,
                last_seq=s.last_seq,
                running_turn_id=lease.running_turn_id if lease else None,
                messages=active_path(s.nodes.values(), s.leaf_node_id),
                pending_inputs=self._pending_inputs(s, now),
                events=self._events_after(s, after_seq, 1000) if after_seq is not None else None,
            )

    async def events_after(self, session_id: str, after_seq: int, limit: int = 1000) -> EventPage:
        async with self._lock:
            return self._events_after(self._read(session_id), after_seq, limit)

    # ------------------------------------------------------------------ turn cancellation

    async def request_turn_cancel(
        self, session_id: str, turn_id: str | None, reason: str | None = None
    ) -> str | None:
        async with self._lock:
            s = self._copy(session_id)
            lease = s.live_lease(self._now())
            if lease is None or lease.running_turn_id is None:
                return None
            if turn_id is not None and lease.running_turn_id != turn_id:
                return None
            running = lease.running_turn_id
            if not lease.cancel_requested:
                # First writer wins: a repeated request keeps the original reason (CAN-15).
                s.lease = lease.model_copy(
                    update={"cancel_requested": True, "cancel_reason": reason}
                )
                self._swap(s)
            self._notify("cancel", session_id, running)
            return running

    # ------------------------------------------------------------------ maintenance

    async def delete_session(self, fence: LeaseFence) -> None:
        async with self._lock:
            s = self._validated(fence, self._now())
            for input_id in s.inputs:
                self._input_sessions.pop(input_id, None)
            self._sessions.pop(s.session_id, None)

    async def vacuum(
        self,
        older_than_ms: int,
        session_id: str | None = None,
        *,
        events_older_than_ms: int | None = None,
    ) -> VacuumReport:
        async with self._lock:
            cutoff = self._now() - older_than_ms
            event_cutoff = self._now() - (
                older_than_ms if events_older_than_ms is None else events_older_than_ms
            )
            targets = [session_id] if session_id is not None else list(self._sessions)
            inputs_removed = commands_removed = events_removed = 0
            for sid in targets:
                if sid not in self._sessions:
                    continue
                s = self._copy(sid)
                for record in list(s.inputs.values()):
                    if (
                        record.state in TERMINAL_STATES
                        and s.terminal_at_ms.get(record.input_id, 0) <= cutoff
                    ):
                        del s.inputs[record.input_id]
                        s.terminal_at_ms.pop(record.input_id, None)
                        self._input_sessions.pop(record.input_id, None)
                        inputs_removed += 1
                for command in list(s.commands.values()):
                    if (
                        command.state is not CommandState.PENDING
                        and s.terminal_at_ms.get(command.batch_id, 0) <= cutoff
                    ):
                        del s.commands[command.batch_id]
                        s.terminal_at_ms.pop(command.batch_id, None)
                        commands_removed += 1
                for seq in sorted(s.published):
                    if s.events[seq].created_at_ms <= event_cutoff:
                        del s.events[seq]
                        s.published.discard(seq)
                        events_removed += 1
                self._swap(s)
            return VacuumReport(
                removed_input_tombstones=inputs_removed,
                removed_command_tombstones=commands_removed,
                removed_events=events_removed,
            )

    async def sessions_with_orphaned_work(
        self, limit: int = 100, *, among: Collection[str] | None = None
    ) -> list[str]:
        async with self._lock:
            now = self._now()
            found: list[str] = []
            for sid in sorted(self._sessions):
                if among is not None and sid not in among:
                    continue
                s = self._sessions[sid]
                if s.live_lease(now) is not None:
                    continue
                has_input = any(
                    r.state in (InputState.ACCEPTED, InputState.PENDING_ACTIVE)
                    or (r.state is InputState.DEFERRED_NEXT_TURN and not s.claim_live(r.claim, now))
                    for r in s.inputs.values()
                )
                has_command = any(
                    c.state is CommandState.PENDING and not s.claim_live(c.claim, now)
                    for c in s.commands.values()
                )
                if has_input or has_command:
                    found.append(sid)
                    if len(found) >= limit:
                        break
            return found

    # ------------------------------------------------------------------ outbox

    async def unpublished_events(
        self,
        limit: int = 500,
        *,
        shard: int | None = None,
        shard_count: int = 1,
        shards: Collection[int] | None = None,
    ) -> list[DurableEvent]:
        async with self._lock:
            out: list[DurableEvent] = []
            for sid in sorted(self._sessions):
                if shard is not None and session_shard(sid) % shard_count != shard:
                    continue
                if shards is not None and session_shard(sid) % shard_count not in shards:
                    continue
                s = self._sessions[sid]
                for seq in sorted(s.events):
                    if seq not in s.published:
                        out.append(s.events[seq])
                        if len(out) >= limit:
                            return out
            return out

    async def mark_published(self, events: Sequence[EventKey]) -> None:
        async with self._lock:
            for event in events:
                s = self._sessions.get(event.session_id)
                if s is not None and event.seq in s.events:
                    s.published.add(event.seq)

    # ------------------------------------------------------------------ wake-ups

    def notifications(self) -> AsyncIterator[Notification]:
        """A stream registered immediately, so wake-ups after this call are never missed."""
        return _Subscription(self._subscribers)
