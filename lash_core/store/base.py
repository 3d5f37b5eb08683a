"""The store interface: every durable operation the runtime and the service need.

Two implementations pass one conformance suite (``tests/conformance``):
:class:`lash_core.store.memory.InMemoryStore` and
:class:`lash_core.store.postgres.PostgresStore`. Every decision about leases, claims and
admission is made by the pure functions in ``lash_core.inputs`` / ``leases`` / ``claims``;
a store reads rows under the right locks, applies those rules, and writes the result in
one transaction. Time for leases, claims and liveness is the store's clock (the database
clock for PostgreSQL).

Every state change that observers care about appends a durable event with the next
gapless per-session ``seq`` in the same transaction (``input.admitted``,
``input.cancelled``, ``turn.started``, ``input.accepted``, ``turn.committed``,
``session.command_applied``).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Collection, Sequence
from enum import StrEnum
from typing import Any, Literal, Protocol

from pydantic import Field

from lash_core._model import Frozen
from lash_core.claims import CommandClaim, TurnInputClaim
from lash_core.commands import CommandDraft, QueuedCommand
from lash_core.commit import CommitResult, RuntimeCommit, SessionConfig
from lash_core.errors import InvalidRequest, SourceKeyConflict
from lash_core.events import DurableEvent, EventKey, OutboxMessage, wire_body
from lash_core.inputs import (
    CancelResult,
    CancelTarget,
    CheckpointKind,
    PendingTurnInput,
    SuffixCancelResult,
    TurnInputDraft,
)
from lash_core.leases import DeadCheck, LeaseClaimResult, LeaseFence, LeaseOwner, LeaseRow
from lash_core.outcomes import Usage
from lash_core.transcript import MessageNode

MAX_CLAIM_INPUTS = 64


class AdmissionStatus(StrEnum):
    ADMITTED = "admitted"
    DUPLICATE = "duplicate"


class InputAdmission(Frozen):
    status: AdmissionStatus
    record: PendingTurnInput
    event: DurableEvent | None = None
    held_by: LeaseOwner | None = None
    """The owner of the session's live lease when the input was admitted, if the store
    reports it. That holder sees the input before it can release the lease (the admission
    gate), so the admitter need not wake a drain unless the holder is provably dead.
    ``None`` means no live lease, or not reported: wake a drain."""
    behind_open_input: bool = False
    """The session already had open input (:data:`~lash_core.inputs.OPEN_STATES`) when
    this input was admitted, read after the admission gate. With no live lease holder,
    a drain has been woken for that input (by its admitter, by the ``work`` notification
    its admission sent to every worker, or by whoever released the lease with it still
    open) and claims this input with it, so the admitter need not wake a second drain
    that would only race the first for the lease and find nothing left. ``False`` means
    none, or not reported: wake a drain."""
    runs_elsewhere: bool = False
    """Another process publishes the session's events (this store has a local publisher
    that does not: see :meth:`Store.set_local_publisher`), so the session's turns belong
    there, where its state is cached and its events need no scan: the admission's
    ``work`` notification asks that publisher's worker to drain it at once
    (:attr:`Notification.for_publisher`), and the admitter wakes no drain of its own.
    Should no worker publish the session just then, the others' check of notified work
    (or the recovery sweep) drains it. ``False``: wake a drain as usual."""


class CommandAdmission(Frozen):
    status: AdmissionStatus
    command: QueuedCommand


class TurnStart(Frozen):
    """A turn that has begun under a lease: ``turn.started`` is durable.

    ``command_pending``: a session command is pending; the claim stopped before it (or it
    leads), so it must be applied before the next turn starts. ``event.revision`` (the head
    revision) and ``leaf_node_id`` name the committed state the turn starts from, so a
    runtime holding that state in memory need not load it again.
    """

    session_id: str
    turn_id: str
    lease_generation: int
    claim: TurnInputClaim | None
    resolved_input_ids: list[str] = Field(default_factory=list)
    event: DurableEvent
    leaf_node_id: str | None = None
    command_pending: bool = False


class TenureStart(Frozen):
    """What :meth:`Store.acquire_and_start_turn` did.

    ``lease`` is the claim result (``Busy``: nothing was written), or ``None`` when the
    call was made ``only_if_work`` and the session had nothing to run (the lease was free
    but not taken: see :attr:`idle`). When acquired, ``turn`` is the turn begun in the same
    transaction, or ``None`` when no input was claimable; ``command_pending`` says whether a
    session command waits (it may be why no input was claimable: input admitted after a
    pending command waits for it).
    """

    lease: LeaseClaimResult | None
    turn: TurnStart | None = None
    command_pending: bool = False

    @property
    def idle(self) -> bool:
        """Nothing to run and the lease left untaken (``only_if_work``)."""
        return self.lease is None


class Residency(StrEnum):
    FULL = "full"
    ACTIVE_PATH = "active_path"


class SessionState(Frozen):
    """A session's committed state as the runtime loads it."""

    session_id: str
    exists: bool
    head_revision: int
    leaf_node_id: str | None
    nodes: list[MessageNode]
    config: SessionConfig | None = None
    checkpoint: dict[str, Any] | None = None
    usage: Usage = Field(default_factory=Usage)
    last_seq: int = 0


class EventPage(Frozen):
    """Events after a ``seq``. ``gap`` is true when some of them are no longer retained."""

    session_id: str
    after_seq: int
    events: list[DurableEvent]
    gap: bool = False
    last_seq: int = 0


class SessionView(Frozen):
    """What ``session.read`` returns."""

    session_id: str
    head_revision: int
    last_seq: int
    running_turn_id: str | None
    messages: list[MessageNode]
    pending_inputs: list[PendingTurnInput]
    events: EventPage | None = None


class VacuumReport(Frozen):
    removed_input_tombstones: int = 0
    removed_command_tombstones: int = 0
    removed_events: int = 0


class NotifiedEvent(Frozen):
    """A durable event as its ``events`` notification carries it: ``payload`` is the
    payload's JSON object text, spliced into the wire body unparsed."""

    seq: int
    revision: int
    created_at_ms: int = 0
    type: str
    payload: str


class Notification(Frozen):
    """A wake-up between workers (PostgreSQL ``LISTEN/NOTIFY``; in-process for memory).

    ``work``: a session may have claimable work (admission, release, deferral).
    ``cancel``: a turn cancel was requested. ``events``: durable events were appended;
    ``events`` carries them when the store sends them along (and they fit), so that the
    worker publishing the session's events can publish them without reading them back.
    """

    kind: Literal["work", "cancel", "events"]
    session_id: str
    turn_id: str | None = None
    for_publisher: bool = False
    """``work`` its admitter left, without waking a drain, for the worker that publishes
    the session's events to drain at once (see :attr:`InputAdmission.runs_elsewhere`);
    not set when a live lease holder will see the input anyway. Every other worker
    treats it as plain ``work``."""
    events: tuple[NotifiedEvent, ...] = ()
    """An ``events`` notification's events, in ``seq`` order, when it carries them."""

    def outbox_messages(self) -> list[OutboxMessage]:
        """The carried :attr:`events` as the outbox relay publishes them."""
        sid = self.session_id
        return [
            OutboxMessage(
                sid, e.seq, e.type, e.created_at_ms, wire_body(sid, e.seq, e.revision, e.payload)
            )
            for e in self.events
        ]


class LocalPublisher(Protocol):
    """The outbox publisher of this process, as a store sees it (see
    :meth:`Store.set_local_publisher`)."""

    def publishes(self, session_id: str) -> bool:
        """Whether this process publishes ``session_id``'s durable events now."""

    def wake(self) -> None:
        """New durable events may exist: scan for them."""

    def committed(self, events: Sequence[DurableEvent]) -> None:
        """``events`` of sessions it publishes were just committed: it may publish them
        from memory instead of scanning for them (an empty list: scan, as :meth:`wake`)."""


class Store(abc.ABC):
    """Durable state of agent sessions. All methods are safe to call concurrently."""

    _local_publisher: LocalPublisher | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect and migrate. Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def now_ms(self) -> int:
        """The store's authoritative clock (DB time for PostgreSQL)."""

    # ------------------------------------------------------------------ admission (§1.7)

    @abc.abstractmethod
    async def enqueue_input(self, draft: TurnInputDraft) -> InputAdmission:
        """Admit idempotently by ``(session_id, source_key)``.

        Same content: ``duplicate`` with the stored record whatever its state. Different
        content: raises :class:`~lash_core.errors.SourceKeyConflict`, nothing written.
        Active-turn input for a turn that is not running is stored as next-turn input.
        A new record appends ``input.admitted`` and wakes workers.
        """

    async def enqueue_inputs(
        self, drafts: Sequence[TurnInputDraft]
    ) -> list[InputAdmission | SourceKeyConflict | InvalidRequest]:
        """Admit several inputs (of any sessions): one outcome per draft, in order.

        Each outcome is what :meth:`enqueue_input` would have returned for that draft, or
        the :class:`~lash_core.errors.SourceKeyConflict` / ``InvalidRequest`` it would have
        raised (returned, so one bad draft does not fail the others). Drafts of one session
        are admitted in the order given. Any other error is raised for the whole call; the
        drafts may then be submitted again (admission is idempotent by source key), which
        is why a store that admits the batch in one transaction is preferable: then a
        raised error means nothing was admitted. This default admits one by one.
        """
        outcomes: list[InputAdmission | SourceKeyConflict | InvalidRequest] = []
        for draft in drafts:
            try:
                outcomes.append(await self.enqueue_input(draft))
            except (SourceKeyConflict, InvalidRequest) as exc:
                outcomes.append(exc)
        return outcomes

    @abc.abstractmethod
    async def get_input(self, session_id: str, input_id: str) -> PendingTurnInput | None: ...

    @abc.abstractmethod
    async def list_inputs(self, session_id: str) -> list[PendingTurnInput]:
        """Every record of the session in any state, ``enqueue_seq`` order (diagnostics)."""

    @abc.abstractmethod
    async def list_pending_inputs(self, session_id: str) -> list[PendingTurnInput]:
        """``pending_active`` / ``deferred_next_turn`` rows without a live claim."""

    @abc.abstractmethod
    async def cancel_inputs(
        self, session_id: str, targets: Sequence[CancelTarget]
    ) -> list[CancelResult]:
        """Atomic bulk cancel; one result per target in order (§1.10)."""

    @abc.abstractmethod
    async def cancel_input_suffix(
        self, session_id: str, anchor: CancelTarget
    ) -> SuffixCancelResult:
        """Cancel the anchor and every later input of the session atomically."""

    @abc.abstractmethod
    async def abandon_input_claim(self, claim: TurnInputClaim) -> None:
        """Hand claimed rows back (``accepted`` -> ``pending_active``). No lease needed."""

    # ------------------------------------------------------------------ leases (§2)

    @abc.abstractmethod
    async def try_claim_lease(
        self, session_id: str, owner: LeaseOwner, ttl_ms: int
    ) -> LeaseClaimResult: ...

    @abc.abstractmethod
    async def reclaim_lease(
        self,
        session_id: str,
        owner: LeaseOwner,
        observed_holder: LeaseFence,
        ttl_ms: int,
        holder_is_dead: DeadCheck | None = None,
    ) -> LeaseClaimResult: ...

    @abc.abstractmethod
    async def renew_lease(self, fence: LeaseFence, ttl_ms: int) -> LeaseRow:
        """Extend a live lease; raises :class:`~lash_core.errors.LeaseLost`. The returned
        row carries ``cancel_requested`` so a renewing turn also learns of cancellation."""

    @abc.abstractmethod
    async def release_lease(self, fence: LeaseFence) -> None:
        """CAS release; a stale or repeated release is a silent no-op. Wakes workers."""

    @abc.abstractmethod
    async def read_lease(self, session_id: str) -> LeaseRow | None:
        """The session's lease row, or ``None`` if it has none. A row with no holder at
        generation 0 means the same as none (a store may write one when it first admits
        the session's input, as PostgreSQL does, to spare the first claim a lock)."""

    # ------------------------------------------------------------------ claims (§3)

    @abc.abstractmethod
    async def start_turn(
        self,
        fence: LeaseFence,
        turn_id: str | None = None,
        *,
        claim_next_turn_inputs: bool = True,
        require_inputs: bool = True,
        max_inputs: int = MAX_CLAIM_INPUTS,
    ) -> TurnStart | None:
        """Begin a turn under ``fence`` in one transaction.

        Validates the fence; resolves input left by a dead generation (``accepted`` rows of
        another generation become ``completed`` if their message is committed, otherwise
        ``deferred_next_turn``; stray ``pending_active`` rows become next-turn input);
        optionally claims up to ``max_inputs`` next-turn inputs in admission order, but
        none admitted after the session's earliest pending command (that command runs
        first: ``inputs.select_next_turn_claim(before_seq=...)``); records the turn as the
        running turn; appends ``turn.started``. With ``require_inputs`` and nothing to
        claim, writes nothing and returns ``None``.

        ``turn_id=None``: the store names the turn, after the merged claimed input's
        ``trace_turn_id`` if it has one, else a fresh ``turn_`` id.
        """

    @abc.abstractmethod
    async def acquire_and_start_turn(
        self,
        session_id: str,
        owner: LeaseOwner,
        ttl_ms: int,
        *,
        max_inputs: int = MAX_CLAIM_INPUTS,
        only_if_work: bool = False,
    ) -> TenureStart:
        """``try_claim_lease`` and, when acquired, ``start_turn(turn_id=None)`` in ONE
        transaction: the first step of a drain's tenure is one round trip.

        The lease is written whenever it is acquired, also when no input is claimable (the
        caller then applies a pending command or releases) — unless ``only_if_work``: then a
        session with no claimable input and no pending command is left without a lease
        (``TenureStart.idle``), so a drain that finds nothing costs one transaction and needs
        no release. Nothing can be stranded by that: the decision is taken under the lease
        row lock every admission must pass (see :meth:`commit`), so input admitted after it
        sees no live holder and wakes a drain itself. Input a dead generation left behind is
        still settled in that transaction."""

    @abc.abstractmethod
    async def claim_next_turn_inputs(
        self, fence: LeaseFence, owner: LeaseOwner, max_inputs: int = MAX_CLAIM_INPUTS
    ) -> TurnInputClaim | None:
        """Idle claim of ``deferred_next_turn`` rows (§1.8), stopping before the earliest
        pending command like :meth:`start_turn`. No event, no running turn."""

    @abc.abstractmethod
    async def claim_active_turn_inputs(
        self,
        fence: LeaseFence,
        owner: LeaseOwner,
        turn_id: str,
        checkpoint: CheckpointKind,
        max_inputs: int = MAX_CLAIM_INPUTS,
    ) -> TurnInputClaim | None:
        """Checkpoint claim of steering input for ``turn_id``; appends ``input.accepted``."""

    @abc.abstractmethod
    async def has_active_input(
        self, session_id: str, turn_id: str, checkpoint: CheckpointKind
    ) -> bool:
        """Read-only probe: is there admissible steering input for this checkpoint?"""

    # ------------------------------------------------------------------ queued commands (§4)

    @abc.abstractmethod
    async def enqueue_command(self, draft: CommandDraft) -> CommandAdmission:
        """Content-checked idempotent admission; conflict raises ``SourceKeyConflict``."""

    @abc.abstractmethod
    async def list_commands(
        self, session_id: str, *, pending_only: bool = False
    ) -> list[QueuedCommand]: ...

    @abc.abstractmethod
    async def cancel_command(self, session_id: str, batch_id: str) -> QueuedCommand | None:
        """Cancel a pending command without a live claim; ``None`` if claimed or gone."""

    @abc.abstractmethod
    async def claim_leading_command(
        self, fence: LeaseFence, owner: LeaseOwner
    ) -> CommandClaim | None:
        """Claim the earliest pending command iff it precedes every pending next-turn input
        in admission order (one shared sequence orders both)."""

    # ------------------------------------------------------------------ commit (§5)

    @abc.abstractmethod
    async def commit(self, commit: RuntimeCommit) -> CommitResult:
        """Apply a runtime commit atomically (§5.4), appending its durable events.

        ``release_lease_if_idle``: after settling, in the same transaction, release the
        lease iff the session has no open input and no pending command left
        (``CommitResult.released``; ``command_pending`` reports a waiting command). Such a
        release needs no wake-up and no re-check by the caller: every admission locks the
        lease row (shared) before it draws its ``enqueue_seq`` and notifies after its own
        commit, so an admission either committed before this commit locked the row (and
        was seen) or commits after the release (and its own wake-up finds the lease free).
        """

    # ------------------------------------------------------------------ reading

    @abc.abstractmethod
    async def load_state(
        self, session_id: str, residency: Residency = Residency.FULL
    ) -> SessionState: ...

    @abc.abstractmethod
    async def read_session(self, session_id: str, after_seq: int | None = None) -> SessionView: ...

    @abc.abstractmethod
    async def events_after(
        self, session_id: str, after_seq: int, limit: int = 1000
    ) -> EventPage: ...

    # ------------------------------------------------------------------ turn cancellation

    @abc.abstractmethod
    async def request_turn_cancel(
        self, session_id: str, turn_id: str | None, reason: str | None = None
    ) -> str | None:
        """Mark the running turn (``turn_id`` or whichever runs) for cancellation under a
        live lease. Returns the turn id, or ``None`` when no such turn runs. Notifies."""

    # ------------------------------------------------------------------ maintenance

    @abc.abstractmethod
    async def delete_session(self, fence: LeaseFence) -> None:
        """Delete everything of the session, including its lease row, under its lease."""

    @abc.abstractmethod
    async def vacuum(
        self,
        older_than_ms: int,
        session_id: str | None = None,
        *,
        events_older_than_ms: int | None = None,
    ) -> VacuumReport:
        """Delete terminal input/command tombstones older than ``older_than_ms`` and
        published events older than ``events_older_than_ms`` (default: the same age), ages
        by the store clock. Non-terminal rows and unpublished events are never removed."""

    @abc.abstractmethod
    async def sessions_with_orphaned_work(
        self, limit: int = 100, *, among: Collection[str] | None = None
    ) -> list[str]:
        """Sessions with claimable pending input or commands and no live lease.

        ``among`` restricts the answer to those sessions (one query checks every session a
        burst of wake-ups named); an empty collection finds nothing.
        """

    # ------------------------------------------------------------------ outbox

    @abc.abstractmethod
    async def unpublished_events(
        self,
        limit: int = 500,
        *,
        shard: int | None = None,
        shard_count: int = 1,
        shards: Collection[int] | None = None,
    ) -> list[DurableEvent]:
        """Durable events not yet confirmed published, ordered by ``(session_id, seq)``.

        With ``shard``, only sessions where ``events.session_shard(session_id) % shard_count
        == shard`` (stores keep the shard value in a column written at insert), so several
        relays can split the sessions between them and each session has one publisher.
        ``shards`` selects several such shards in one call (a relay holding many shards
        scans them all at once); an empty collection selects nothing.
        """

    async def unpublished_messages(
        self,
        limit: int = 500,
        *,
        shards: Collection[int],
        shard_count: int = 1,
        published: Sequence[EventKey] = (),
    ) -> list[OutboxMessage]:
        """``unpublished_events`` of ``shards`` as the outbox relay publishes them (wire
        bodies built); a store may build them without parsing each payload.

        ``published``: events the caller has had confirmed since its last call. They are
        marked published first (``mark_published``) and are not in the answer; a store
        may do both in one round trip, which is why a relay defers its marks to its next
        scan. Marked even when ``shards`` is empty."""
        await self.mark_published(published)
        if not shards:
            return []
        events = await self.unpublished_events(limit, shards=shards, shard_count=shard_count)
        return [OutboxMessage.of(event) for event in events]

    @abc.abstractmethod
    async def mark_published(self, events: Sequence[EventKey]) -> None: ...

    # ------------------------------------------------------------------ wake-ups

    @abc.abstractmethod
    def notifications(self) -> AsyncIterator[Notification]:
        """An endless stream of wake-ups from every worker using this store."""

    def set_local_publisher(self, publisher: LocalPublisher | None) -> None:
        """Name the outbox publisher running beside this store in the same process.

        Appended durable events are announced with an ``events`` wake-up so that whichever
        worker publishes the session's events scans for them. When that is this process
        (``publisher.publishes(session_id)``), the wake-up would only travel through the
        database to come back here, and every listening worker would be woken by it: so
        the store sends none and, once the change is committed, hands the events over
        (``publisher.committed(events)``) or, where it has not built them, wakes it
        (``publisher.wake()``). Should the publisher lose the session between that check
        and publishing, whoever takes the session's events over scans them on taking over
        (and polls).

        Admitted input of a session the publisher does not publish is reported as
        :attr:`InputAdmission.runs_elsewhere` and its ``work`` notification as
        :attr:`Notification.for_publisher`: its turns belong with its publisher."""
        self._local_publisher = publisher

    def _runs_elsewhere(self, session_id: str) -> bool:
        """Whether ``session_id``'s events are another process's to publish (a local
        publisher is named and does not publish them): see ``InputAdmission.runs_elsewhere``."""
        publisher = self._local_publisher
        return publisher is not None and not publisher.publishes(session_id)

    def _quiet_events(self, session_id: str) -> LocalPublisher | None:
        """The local publisher, if it publishes ``session_id``'s events (then appended
        events need no ``events`` wake-up: wake it after the commit instead)."""
        publisher = self._local_publisher
        if publisher is not None and publisher.publishes(session_id):
            return publisher
        return None
