"""The embeddable session facade, in the spirit of lash's ``LashCore`` / ``LashSession``
(lash-semantics §7).

``LashCore`` binds a store and an agent to one lease owner (one incarnation per core, so
two cores in one process exclude each other like two workers would). A ``LashSession``
is a handle on one session id: it holds the session's committed state per residency for
reading, and sends all work through the same :class:`~lash_core.engine.SessionDriver` the
consumer service uses. A direct turn is therefore durable and exactly-once too: its input
is admitted as next-turn input first, and the drain runs it.

Opening never takes the lease. Parking drops every in-memory trace of the session (the
returned :class:`ParkedSession` is a few fields), flushing first only when the session
has a replacement that was never committed (``open_fresh`` / ``open_with_state``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence

from lash_core._model import Frozen
from lash_core.claims import TurnInputClaim
from lash_core.clock import Clock, IdFactory, UuidIds
from lash_core.commands import CommandDraft, QueuedCommand, SessionCommand
from lash_core.commit import RuntimeCommit
from lash_core.engine.agent import AgentConfig
from lash_core.engine.driver import SessionDriver
from lash_core.engine.reports import DrainReport, TurnReport
from lash_core.errors import InvalidRequest, LashError, SessionBusy, SessionMismatch
from lash_core.events import DurableEvent, TurnActivity, TurnCommitted, TurnStarted
from lash_core.inputs import (
    ActiveTurnIngress,
    CancelResult,
    CancelTarget,
    CheckpointKind,
    Ingress,
    InputIdTarget,
    InputState,
    NextTurnIngress,
    PendingTurnInput,
    SuffixCancelResult,
    TextItem,
    TurnInput,
    TurnInputDraft,
)
from lash_core.leases import (
    Acquired,
    Lease,
    LeaseOwner,
    holder_is_definitely_dead,
    local_process_owner,
)
from lash_core.observe import (
    SessionObservation,
    events_after_cursor,
    observe,
    session_wakeups,
    subscribe,
)
from lash_core.outcomes import Usage
from lash_core.store.base import (
    CommandAdmission,
    EventPage,
    InputAdmission,
    Residency,
    SessionState,
    Store,
)
from lash_core.transcript import GraphReplace, MessageNode, active_path

WAIT_POLL_S = 0.5
"""How often a direct turn waiting on another drain re-checks without a notification."""


class ParkedSession(Frozen):
    """What survives a park: enough to resume, nothing of the transcript."""

    session_id: str
    residency: Residency
    head_revision: int


class InputCancelled(LashError):
    """The input of a direct turn was cancelled before any turn ran it."""

    code = "input_cancelled"


def _as_input(value: str | TurnInput) -> TurnInput:
    return TurnInput(items=[TextItem(text=value)]) if isinstance(value, str) else value


class LashCore:
    """A store and an agent, run by one lease owner (this process incarnation)."""

    def __init__(
        self,
        store: Store,
        agent: AgentConfig,
        *,
        owner: LeaseOwner | None = None,
        lease_ttl_ms: int = 30_000,
        ids: IdFactory | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.agent = agent
        self.owner = owner or local_process_owner(f"lash-core-{uuid.uuid4().hex}", uuid.uuid4().hex)
        self.lease_ttl_ms = lease_ttl_ms
        self.ids: IdFactory = ids or UuidIds()
        self._listeners: dict[str, set[asyncio.Queue[TurnActivity]]] = {}
        self.driver = SessionDriver(
            store,
            agent,
            self.owner,
            lease_ttl_ms=lease_ttl_ms,
            on_activity=self._dispatch_activity,
            ids=self.ids,
            clock=clock,
        )

    # ------------------------------------------------------------------ opening

    async def open(self, session_id: str, *, residency: Residency = Residency.FULL) -> LashSession:
        """Attach to a session (new or existing) and load its state. No lease is taken."""
        state = await self.store.load_state(session_id, residency)
        return LashSession(self, session_id, residency, state)

    async def open_fresh(
        self, session_id: str, *, residency: Residency = Residency.FULL
    ) -> LashSession:
        """Ignore the persisted transcript: the next commit replaces the graph."""
        return await self._open_replacing(session_id, residency, [])

    async def open_with_state(
        self, session_id: str, state: SessionState, *, residency: Residency = Residency.FULL
    ) -> LashSession:
        """Start from an explicit state (its active path); the next commit replaces the graph."""
        if state.session_id != session_id:
            raise SessionMismatch(
                f"state belongs to session {state.session_id!r}, not {session_id!r}"
            )
        return await self._open_replacing(
            session_id, residency, active_path(state.nodes, state.leaf_node_id)
        )

    async def _open_replacing(
        self, session_id: str, residency: Residency, nodes: list[MessageNode]
    ) -> LashSession:
        persisted = await self.store.load_state(session_id, Residency.ACTIVE_PATH)
        self.driver.replace_graph_on_next_commit(session_id, nodes)
        state = persisted.model_copy(
            update={"nodes": nodes, "leaf_node_id": nodes[-1].node_id if nodes else None}
        )
        return LashSession(self, session_id, residency, state)

    async def resume(self, parked: ParkedSession) -> LashSession:
        return await self.open(parked.session_id, residency=parked.residency)

    # ------------------------------------------------------------------ store-only levers

    async def enqueue_turn_input(
        self,
        session_id: str,
        input: str | TurnInput,
        *,
        id: str | None = None,
        ingress: Ingress | None = None,
    ) -> InputAdmission:
        """Admit input durably without opening a competing writer (source key ``host:<id>``)."""
        input_id = id or self.ids.new_id("ti_")
        return await self.store.enqueue_input(
            TurnInputDraft(
                session_id=session_id,
                input_id=input_id,
                source_key=f"host:{input_id}",
                ingress=ingress or NextTurnIngress(),
                input=_as_input(input),
            )
        )

    async def delete_session(self, session_id: str) -> None:
        """Delete a session under its lease; a live holder makes this :class:`SessionBusy`."""
        lease = await self.acquire_lease(session_id)
        try:
            await self.store.delete_session(lease.fence())
        except BaseException:
            await self.store.release_lease(lease.fence())
            raise
        self.driver.forget(session_id)

    async def acquire_lease(self, session_id: str) -> Lease:
        """Take the session lease for a host operation (delete, flush); busy -> SessionBusy.

        A drain of this core holds the lease under the same owner, where the store would
        grant re-entry; that counts as busy too, so a host operation never runs under a
        running turn's feet."""
        if self.driver.is_draining(session_id):
            raise SessionBusy(session_id, self.owner.owner_id)
        result = await self.store.try_claim_lease(session_id, self.owner, self.lease_ttl_ms)
        if not isinstance(result, Acquired) and holder_is_definitely_dead(
            result.holder.owner, self.owner
        ):
            result = await self.store.reclaim_lease(
                session_id,
                self.owner,
                result.holder.fence(),
                self.lease_ttl_ms,
                holder_is_definitely_dead,
            )
        if not isinstance(result, Acquired):
            raise SessionBusy(session_id, result.holder.owner.owner_id)
        return result.lease

    # ------------------------------------------------------------------ live activity

    async def _dispatch_activity(self, activity: TurnActivity) -> None:
        for queue in self._listeners.get(activity.session_id, ()):
            queue.put_nowait(activity)

    def _listen(self, session_id: str) -> asyncio.Queue[TurnActivity]:
        queue: asyncio.Queue[TurnActivity] = asyncio.Queue()
        self._listeners.setdefault(session_id, set()).add(queue)
        return queue

    def _unlisten(self, session_id: str, queue: asyncio.Queue[TurnActivity]) -> None:
        queues = self._listeners.get(session_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._listeners[session_id]


class LashSession:
    """A handle on one session. Cheap; many may exist for one session id."""

    def __init__(
        self, core: LashCore, session_id: str, residency: Residency, state: SessionState
    ) -> None:
        self.core = core
        self.session_id = session_id
        self.residency = residency
        self._state: SessionState | None = state
        self._stale = False
        self._parked = False

    # ------------------------------------------------------------------ state

    def _live(self) -> None:
        if self._parked:
            raise InvalidRequest(f"session {self.session_id!r} is parked or closed")

    @property
    def store(self) -> Store:
        return self.core.store

    async def state(self) -> SessionState:
        """The committed state per residency, reloaded after this handle ran work."""
        self._live()
        if self._state is None or self._stale:
            replacement = self.core.driver.pending_replacement(self.session_id)
            state = await self.store.load_state(self.session_id, self.residency)
            if replacement is not None:
                state = state.model_copy(
                    update={
                        "nodes": replacement,
                        "leaf_node_id": replacement[-1].node_id if replacement else None,
                    }
                )
            self._state, self._stale = state, False
        return self._state

    async def refresh(self) -> SessionState:
        self._stale = True
        return await self.state()

    async def transcript(self) -> list[MessageNode]:
        """The active path, oldest first."""
        state = await self.state()
        return active_path(state.nodes, state.leaf_node_id)

    async def usage(self) -> Usage:
        """Token usage of every committed turn of the session."""
        return (await self.refresh()).usage

    # ------------------------------------------------------------------ turns

    async def run_turn(self, input: str | TurnInput, *, id: str | None = None) -> TurnReport:
        """Run ``input`` as a turn and return its report.

        The input is admitted first (source key ``host:<id>``: a retried call with the same
        id runs once), then the session is drained: leading session commands apply first,
        and input queued before this one may share its turn. If another drain (here or on
        another owner) holds the session, this waits until that drain has run the input.
        """
        self._live()
        admission = await self.enqueue(input, id=id)
        return await self._await_turn_of(admission.record.input_id)

    async def stream_turn(
        self, input: str | TurnInput, *, id: str | None = None
    ) -> AsyncIterator[TurnActivity | TurnReport]:
        """Like :meth:`run_turn`, yielding live activity of the session, then the report.
        Leaving the iteration early cancels the turn (it commits as stopped/cancelled)."""
        self._live()
        queue = self.core._listen(self.session_id)
        task = asyncio.create_task(self.run_turn(input, id=id))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not queue.empty():
                    yield queue.get_nowait()
                yield task.result()
                return
        finally:
            self.core._unlisten(self.session_id, queue)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def drain(self, *, max_turns: int | None = None) -> DrainReport:
        """Run queued commands and input now (all of it, or ``max_turns`` turns)."""
        self._live()
        try:
            return await self.core.driver.drain(self.session_id, max_turns=max_turns)
        finally:
            self._stale = True

    async def _await_turn_of(self, input_id: str) -> TurnReport:
        """Drain until the turn that ran ``input_id`` is known. The common case (this drain
        ran it) needs no subscription; otherwise wait for wake-ups from the store."""
        found = await self._drain_for(input_id)
        if found is not None:
            return found
        async with session_wakeups(self.store, self.session_id) as wakeups:
            while True:
                wakeups.clear()
                found = await self._drain_for(input_id)
                if found is not None:
                    return found
                await wakeups.wait(WAIT_POLL_S)

    async def _drain_for(self, input_id: str) -> TurnReport | None:
        report = await self.drain()
        for turn in report.turns:
            if input_id in turn.input_ids:
                return turn
        record = await self.store.get_input(self.session_id, input_id)
        if record is None:
            raise InvalidRequest(f"input {input_id!r} no longer exists")
        if record.state is InputState.CANCELLED:
            raise InputCancelled(f"input {input_id!r} was cancelled")
        if record.state is InputState.COMPLETED:
            return await self._report_from_log(input_id)
        return None

    async def _report_from_log(self, input_id: str) -> TurnReport:
        """Rebuild the report of a turn some other drain committed, from the event log."""
        seq, generation = 0, 0
        started: dict[str, int] = {}
        while True:
            page = await self.store.events_after(self.session_id, seq)
            for event in page.events:
                payload = event.payload
                if isinstance(payload, TurnStarted):
                    started[payload.turn_id] = payload.lease_generation
                if isinstance(payload, TurnCommitted) and input_id in payload.input_ids:
                    generation = started.get(payload.turn_id, 0)
                    return TurnReport(
                        session_id=self.session_id,
                        turn_id=payload.turn_id,
                        lease_generation=generation,
                        outcome=payload.outcome,
                        input_ids=payload.input_ids,
                        deferred_input_ids=payload.deferred_input_ids,
                        events=[event],
                        duration_s=0.0,
                        replayed=True,
                    )
            if not page.events:
                raise LashError(f"the turn of input {input_id!r} is no longer in the event log")
            seq = page.events[-1].seq

    # ------------------------------------------------------------------ input

    async def enqueue(
        self,
        input: str | TurnInput,
        *,
        id: str | None = None,
        ingress: Ingress | None = None,
    ) -> InputAdmission:
        """Admit input (next turn by default) with source key ``host:<id>``."""
        self._live()
        return await self.core.enqueue_turn_input(self.session_id, input, id=id, ingress=ingress)

    async def steer(
        self,
        input: str | TurnInput,
        *,
        id: str | None = None,
        turn_id: str | None = None,
        min_boundary: CheckpointKind = "after_work",
    ) -> InputAdmission:
        """Send input to the running turn (``turn_id`` or whichever runs). With no running
        turn it is admitted as next-turn input, so it is never stranded."""
        self._live()
        target = turn_id or await self.running_turn_id()
        ingress: Ingress = (
            ActiveTurnIngress(turn_id=target, min_boundary=min_boundary)
            if target
            else NextTurnIngress()
        )
        return await self.enqueue(input, id=id, ingress=ingress)

    async def running_turn_id(self) -> str | None:
        local = self.core.driver.running().get(self.session_id)
        if local is not None:
            return local
        lease = await self.store.read_lease(self.session_id)
        now = await self.store.now_ms()
        return lease.running_turn_id if lease is not None and lease.is_live(now) else None

    async def pending_inputs(self) -> list[PendingTurnInput]:
        return await self.store.list_pending_inputs(self.session_id)

    async def cancel_pending_input(self, input_id: str) -> CancelResult:
        return (await self.cancel_pending_inputs([InputIdTarget(value=input_id)]))[0]

    async def cancel_pending_inputs(self, targets: Sequence[CancelTarget]) -> list[CancelResult]:
        return await self.store.cancel_inputs(self.session_id, targets)

    async def cancel_pending_input_suffix(self, anchor: CancelTarget) -> SuffixCancelResult:
        return await self.store.cancel_input_suffix(self.session_id, anchor)

    async def abandon_claim(self, claim: TurnInputClaim) -> None:
        await self.store.abandon_input_claim(claim)

    # ------------------------------------------------------------------ queued work

    async def queued_work(self, *, pending_only: bool = True) -> list[QueuedCommand]:
        return await self.store.list_commands(self.session_id, pending_only=pending_only)

    async def cancel_queued_work(self, batch_id: str) -> QueuedCommand | None:
        return await self.store.cancel_command(self.session_id, batch_id)

    async def enqueue_command(
        self, command: SessionCommand, *, idempotency_key: str | None = None
    ) -> CommandAdmission:
        """Queue a session command; it applies under the lease before later turn work."""
        self._live()
        return await self.store.enqueue_command(
            CommandDraft(
                session_id=self.session_id,
                idempotency_key=idempotency_key or self.core.ids.new_id("cmd_"),
                command=command,
            )
        )

    # ------------------------------------------------------------------ cancellation

    def cancel_running_turns(self, reason: str | None = None) -> int:
        """Cancel this session's turns running in this process; returns how many."""
        return 1 if self.core.driver.cancel(self.session_id, None, reason) else 0

    async def request_turn_cancel(
        self, turn_id: str | None = None, reason: str | None = None
    ) -> str | None:
        """Ask whichever worker runs the turn to cancel it (durable, fleet-wide)."""
        local = self.core.driver.cancel(self.session_id, turn_id, reason)
        remote = await self.store.request_turn_cancel(self.session_id, turn_id, reason)
        return remote or (self.core.driver.running().get(self.session_id) if local else None)

    # ------------------------------------------------------------------ observation

    async def observe(self) -> SessionObservation:
        return await observe(self.store, self.session_id)

    async def events_after(self, cursor: str) -> EventPage:
        return await events_after_cursor(self.store, self.session_id, cursor)

    def subscribe(
        self, cursor: str | None = None, *, poll_interval_s: float = 1.0
    ) -> AsyncIterator[DurableEvent | SessionObservation]:
        return subscribe(self.store, self.session_id, cursor, poll_interval_s=poll_interval_s)

    # ------------------------------------------------------------------ lifecycle

    async def park(self) -> ParkedSession:
        """Drop this handle's in-memory state; flush a never-committed replacement first."""
        self._live()
        if self.core.driver.is_draining(self.session_id):
            raise InvalidRequest(f"session {self.session_id!r} is still in use by a drain")
        replacement = self.core.driver.pending_replacement(self.session_id)
        head = (await self.store.load_state(self.session_id, Residency.ACTIVE_PATH)).head_revision
        if replacement is not None:
            head = await self._flush(replacement, head)
        self.core.driver.forget(self.session_id)
        self._state, self._parked = None, True
        return ParkedSession(
            session_id=self.session_id, residency=self.residency, head_revision=head
        )

    async def close(self) -> None:
        """Park without keeping a handle."""
        if not self._parked:
            await self.park()

    async def delete(self) -> None:
        self._live()
        await self.core.delete_session(self.session_id)
        self._state, self._parked = None, True

    async def _flush(self, nodes: list[MessageNode], head: int) -> int:
        lease = await self.core.acquire_lease(self.session_id)
        try:
            result = await self.store.commit(
                RuntimeCommit(
                    session_id=self.session_id,
                    fence=lease.fence(),
                    release_lease=True,
                    expected_head_revision=head,
                    graph=GraphReplace(
                        nodes=nodes, leaf_node_id=nodes[-1].node_id if nodes else None
                    ),
                )
            )
        except BaseException:
            await self.store.release_lease(lease.fence())
            raise
        return result.head_revision
