"""Drives one session's pending work under one lease tenure (lash-semantics §2.7, §4.5).

``SessionDriver.drain`` is the only place that acquires a session lease, decides what
runs next (leading session commands, then next-turn input merged into one turn), commits
and releases. The consumer service and the embedded facade both call it, so a session
behaves the same whether it runs behind RabbitMQ or inside a host process.

The hot path is lean: a drain of one input is two store calls. The first acquires the
lease and starts the turn (``Store.acquire_and_start_turn``: the store claims the input,
names the turn and stops before any pending session command). The second is the final
commit. A finished turn leaves its last steering checkpoint to it
(``RuntimeCommit.steering_checkpoint``): the store checks for steering input under the
lease row lock and, if there is any, writes nothing, and the turn takes the input and goes
on (:class:`~lash_core.errors.SteeringPending`). The commit releases the lease in the same
transaction when the session is left idle (``release_lease_if_idle``), which the store
decides under the lease row lock that every admission must pass, so no re-check is needed
after it. A session command is claimed only when the store reports one pending. The
acquisition takes the lease only if there is something to run (``only_if_work``), so a
drain that finds nothing is one transaction with no release; after a separate release
(the last turn ``max_turns`` allows, a cancelled task) the drain simply tries to acquire
again.

Committed state is cached per session (``state_cache``: bounded by sessions and by
memory, least recently used first out): it is advanced by each commit made here and
trusted for a new turn only while the turn starts from exactly that state (the head
revision and leaf the store reports at turn start); otherwise, and after a replayed or
failed commit, it is loaded again. A session at revision 0 has no state to load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from lash_core.claims import CommandClaim, TurnInputClaim
from lash_core.clock import Clock, IdFactory, SystemClock, UuidIds
from lash_core.commands import ResetSession
from lash_core.commit import CommitResult, FinalTurn, RuntimeCommit, SessionConfig
from lash_core.engine.agent import AgentConfig
from lash_core.engine.lease_guard import LeaseGuard
from lash_core.engine.reports import DrainReport, TurnReport
from lash_core.engine.state_cache import StateCache, nodes_size
from lash_core.engine.turn import TurnContext, TurnControl, TurnOutput, TurnRunner
from lash_core.errors import (
    HeadRevisionConflict,
    LeaseLost,
    RetryableStoreError,
    SteeringPending,
    Superseded,
    TurnCommitConflict,
)
from lash_core.events import TurnActivity
from lash_core.inputs import CheckpointKind
from lash_core.leases import (
    Acquired,
    Lease,
    LeaseFence,
    LeaseOwner,
    holder_is_definitely_dead,
)
from lash_core.store.base import MAX_CLAIM_INPUTS, Residency, Store, TenureStart, TurnStart
from lash_core.transcript import (
    GraphAppend,
    GraphDelta,
    GraphReplace,
    GraphUnchanged,
    MessageNode,
    active_path,
)

log = structlog.get_logger(__name__)

ActivitySink = Callable[[TurnActivity], Awaitable[None]]

COMMIT_BACKOFF_S = 0.05
COMMIT_BACKOFF_MAX_S = 1.0
MAX_IDLE_ROUNDS = 3


class _TenureLost(Exception):
    """The lease was lost mid-tenure: nothing more may be committed under it."""


@dataclass
class _Cache:
    """The committed state of a session as known under one generation."""

    head_revision: int
    nodes: list[MessageNode]
    leaf_node_id: str | None
    checkpoint: dict[str, Any] | None
    replace_required: bool = False
    size: int = -1  # estimated memory of ``nodes`` (``nodes_size``), kept up to date

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = nodes_size(self.nodes)

    def delta(self, new_nodes: list[MessageNode]) -> GraphDelta:
        if self.replace_required:
            nodes = [*self.nodes, *new_nodes]
            return GraphReplace(nodes=nodes, leaf_node_id=nodes[-1].node_id if nodes else None)
        if not new_nodes:
            return GraphUnchanged()
        return GraphAppend(nodes=new_nodes, leaf_node_id=new_nodes[-1].node_id)

    def advance(self, head_revision: int, new_nodes: list[MessageNode]) -> None:
        self.head_revision = head_revision
        self.nodes = [*self.nodes, *new_nodes]
        self.size += nodes_size(new_nodes)
        if new_nodes:
            self.leaf_node_id = new_nodes[-1].node_id
        self.replace_required = False


@dataclass
class _Tally:
    turns: list[TurnReport] = field(default_factory=list)
    commands_applied: int = 0


@dataclass
class _Opening:
    """How a tenure begins: its lease and what the acquiring transaction already did."""

    lease: Lease
    acquired_at: float
    turn: TurnStart | None
    command_pending: bool
    took_over: bool = False


class _Idle:
    """``_acquire`` found nothing to run and left the lease untaken."""


_IDLE = _Idle()


@dataclass
class _TenureEnd:
    """``idle_release``: the last commit released the lease after the store found the
    session idle under the admission gate, so nothing can have been left behind."""

    idle_release: bool = False


class SessionDriver:
    """Runs sessions' pending work; one instance serves many sessions concurrently."""

    def __init__(
        self,
        store: Store,
        agent: AgentConfig,
        owner: LeaseOwner,
        *,
        lease_ttl_ms: int = 30_000,
        on_activity: ActivitySink | None = None,
        ids: IdFactory | None = None,
        clock: Clock | None = None,
        state_cache: StateCache[_Cache] | None = None,
    ) -> None:
        self.store = store
        self.agent = agent
        self.owner = owner
        self.lease_ttl_ms = lease_ttl_ms
        self.on_activity = on_activity
        self.ids: IdFactory = ids or UuidIds()
        self.clock: Clock = clock or SystemClock()
        self._running: dict[str, TurnControl] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._again: set[str] = set()
        self._replacements: dict[str, list[MessageNode]] = {}
        self._states: StateCache[_Cache] = state_cache if state_cache is not None else StateCache()

    # ------------------------------------------------------------------ host levers

    def cancel(
        self, session_id: str, turn_id: str | None = None, reason: str | None = None
    ) -> bool:
        """Cancel a turn running in THIS process (True if one was signalled). Cooperative and
        prompt: the turn commits as stopped/cancelled."""
        control = self._running.get(session_id)
        if control is None or (turn_id is not None and control.turn_id != turn_id):
            return False
        control.cancel(reason)
        return True

    def running(self) -> dict[str, str]:
        """session_id -> running turn_id in this process."""
        return {sid: control.turn_id for sid, control in self._running.items()}

    def replace_graph_on_next_commit(self, session_id: str, nodes: list[MessageNode]) -> None:
        """Make the next commit of ``session_id`` a full replacement starting from ``nodes``
        (the facade's ``open_fresh`` / ``open_with_state``)."""
        self._replacements[session_id] = list(nodes)

    def pending_replacement(self, session_id: str) -> list[MessageNode] | None:
        return self._replacements.get(session_id)

    def forget(self, session_id: str) -> None:
        """Drop any pending replacement and cached state of ``session_id`` (park/close/delete)."""
        self._replacements.pop(session_id, None)
        self._states.pop(session_id)

    def is_draining(self, session_id: str) -> bool:
        lock = self._locks.get(session_id)
        return lock is not None and lock.locked()

    # ------------------------------------------------------------------ drain

    async def drain(self, session_id: str, *, max_turns: int | None = None) -> DrainReport:
        """Run all pending work of one session under one lease tenure, then release.

        A drain already running for the session in this process absorbs this call: it is
        told to go round again, and this call returns ``acquired=False``.
        """
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        if lock.locked():
            self._again.add(session_id)
            return DrainReport(session_id=session_id, acquired=False)
        async with lock:
            try:
                return await self._drain_locked(session_id, max_turns)
            finally:
                # Nothing ever waits on this lock (a busy drain returns at once), so it can go.
                self._locks.pop(session_id, None)
                self._again.discard(session_id)

    async def _drain_locked(self, session_id: str, max_turns: int | None) -> DrainReport:
        tally = _Tally()
        acquired_any = took_over = lease_lost = idle = False
        idle_rounds = 0
        while True:
            self._again.discard(session_id)
            may_start = max_turns is None or len(tally.turns) < max_turns
            opening = await self._acquire(session_id, may_start)
            if isinstance(opening, _Idle):
                idle = not acquired_any
                break
            if opening is None:
                break
            acquired_any = True
            took_over = took_over or opening.took_over
            before = (len(tally.turns), tally.commands_applied)
            try:
                end = await self._tenure(opening, tally, max_turns)
            except _TenureLost:
                lease_lost = True
                break
            if max_turns is not None and len(tally.turns) >= max_turns:
                break
            idle_rounds = (
                0 if (len(tally.turns), tally.commands_applied) != before else idle_rounds + 1
            )
            if idle_rounds >= MAX_IDLE_ROUNDS:
                break
            # A concurrent drain call that found this one running was absorbed: go round.
            if session_id in self._again:
                continue
            if end.idle_release:
                break
            # Released outside an idle commit: input can have arrived between the last
            # claim and the release, so go round: the next acquisition takes the lease only
            # if there is work (one transaction when there is none).
            continue
        return DrainReport(
            session_id=session_id,
            acquired=acquired_any,
            idle=idle,
            took_over=took_over,
            lease_lost=lease_lost,
            commands_applied=tally.commands_applied,
            turns=tally.turns,
        )

    async def _acquire(self, session_id: str, may_start: bool) -> _Opening | _Idle | None:
        """Take the lease (starting the first turn in the same transaction when allowed),
        or take it over from a provably dead holder."""
        acquired_at = time.monotonic()
        if may_start:
            opened: TenureStart = await self.store.acquire_and_start_turn(
                session_id,
                self.owner,
                self.lease_ttl_ms,
                max_inputs=MAX_CLAIM_INPUTS,
                only_if_work=True,
            )
            if opened.lease is None:
                return _IDLE  # nothing to run; the lease was not taken
            result = opened.lease
            if isinstance(result, Acquired):
                return _Opening(result.lease, acquired_at, opened.turn, opened.command_pending)
        else:
            result = await self.store.try_claim_lease(session_id, self.owner, self.lease_ttl_ms)
            if isinstance(result, Acquired):
                return _Opening(result.lease, acquired_at, None, True)
        if holder_is_definitely_dead(result.holder.owner, self.owner):
            acquired_at = time.monotonic()
            again = await self.store.reclaim_lease(
                session_id,
                self.owner,
                result.holder.fence(),
                self.lease_ttl_ms,
                holder_is_definitely_dead,
            )
            if isinstance(again, Acquired):
                log.info("lease_taken_over", session_id=session_id)
                # Nothing is known about pending commands yet: look for one first.
                return _Opening(again.lease, acquired_at, None, True, took_over=True)
        return None

    # ------------------------------------------------------------------ one tenure

    async def _tenure(self, opening: _Opening, tally: _Tally, max_turns: int | None) -> _TenureEnd:
        lease = opening.lease
        session_id = lease.session_id
        guard = LeaseGuard(
            self.store,
            lease,
            self.lease_ttl_ms,
            acquired_at=opening.acquired_at,
            on_cancel_requested=lambda turn_id, reason: self._renewal_cancel(
                session_id, turn_id, reason
            ),
        )
        guard.start()
        end = _TenureEnd()
        released = False
        start, command_pending = opening.turn, opening.command_pending
        try:
            while True:
                guard.check()
                if start is None:
                    if command_pending:
                        await self._apply_commands(session_id, guard, tally)
                    if max_turns is not None and len(tally.turns) >= max_turns:
                        break
                    start = await self.store.start_turn(guard.fence, max_inputs=MAX_CLAIM_INPUTS)
                    if start is None:
                        break
                last = max_turns is not None and len(tally.turns) + 1 >= max_turns
                cache = await self._state_for(session_id, start)
                report, result, idle = await self._run_turn(cache, start, guard, last)
                tally.turns.append(report)
                if result.released:
                    released = True
                    end.idle_release = idle
                    break
                start, command_pending = None, result.command_pending
        except (LeaseLost, Superseded) as exc:
            guard.mark_lost(str(exc))
            self._states.pop(session_id)
            raise _TenureLost from exc
        except BaseException:
            # Whatever failed, the cached state may be ahead of or behind the store.
            self._states.pop(session_id)
            raise
        finally:
            await guard.stop()
            if not released and not guard.is_lost:
                await self._release(guard.fence)
        if guard.is_lost:
            self._states.pop(session_id)
            raise _TenureLost
        return end

    async def _apply_commands(self, session_id: str, guard: LeaseGuard, tally: _Tally) -> None:
        """Apply every session command that precedes all pending next-turn input."""
        cache: _Cache | None = None
        while (
            claim := await self.store.claim_leading_command(guard.fence, self.owner)
        ) is not None:
            if cache is None:
                cache = await self._load(session_id)
            cache = await self._apply_command(cache, claim, guard)
            self._remember(session_id, cache)
            tally.commands_applied += 1

    # ------------------------------------------------------------------ cached state

    async def _state_for(self, session_id: str, start: TurnStart) -> _Cache:
        """The committed state ``start`` begins from: cached if it is exactly that state,
        empty at revision 0, else loaded."""
        cached = self._states.get(session_id)
        if (
            cached is not None
            and cached.head_revision == start.event.revision
            and cached.leaf_node_id == start.leaf_node_id
        ):
            if session_id in self._replacements:
                return self._remember(session_id, self._with_replacement(session_id, cached))
            return cached
        if start.event.revision == 0:
            return self._remember(
                session_id, self._with_replacement(session_id, _Cache(0, [], None, None))
            )
        return await self._load(session_id)

    def _remember(self, session_id: str, cache: _Cache) -> _Cache:
        self._states.put(session_id, cache, cache.size)
        return cache

    def _with_replacement(self, session_id: str, cache: _Cache) -> _Cache:
        """Apply a pending facade replacement (``replace_graph_on_next_commit``)."""
        replacement = self._replacements.get(session_id)
        if replacement is not None:
            cache.nodes = list(replacement)
            cache.size = nodes_size(cache.nodes)
            cache.leaf_node_id = replacement[-1].node_id if replacement else None
            cache.replace_required = True
        return cache

    async def _load(self, session_id: str) -> _Cache:
        state = await self.store.load_state(session_id, Residency.ACTIVE_PATH)
        nodes = active_path(state.nodes, state.leaf_node_id)
        cache = _Cache(
            head_revision=state.head_revision,
            nodes=nodes,
            leaf_node_id=state.leaf_node_id if nodes else None,
            checkpoint=state.checkpoint,
        )
        return self._remember(session_id, self._with_replacement(session_id, cache))

    def _renewal_cancel(self, session_id: str, turn_id: str | None, reason: str | None) -> None:
        self.cancel(session_id, turn_id, reason)

    async def _release(self, fence: LeaseFence) -> None:
        try:
            await self.store.release_lease(fence)
        except Exception:
            log.warning("lease_release_failed", session_id=fence.session_id, exc_info=True)

    # ------------------------------------------------------------------ commands

    async def _apply_command(self, cache: _Cache, claim: CommandClaim, guard: LeaseGuard) -> _Cache:
        command = claim.command.command
        checkpoint: dict[str, Any] | None = None
        if isinstance(command, ResetSession):
            graph: GraphDelta = GraphReplace(nodes=[], leaf_node_id=None)
        else:
            graph = cache.delta([])
            checkpoint = {
                **(cache.checkpoint or {}),
                "tool_catalog_hash": self.agent.tools.catalog_hash(),
            }
        commit = RuntimeCommit(
            session_id=claim.session_id,
            fence=guard.fence,
            expected_head_revision=cache.head_revision,
            graph=graph,
            checkpoint=checkpoint,
            applied_command=command,
            completed_command_claims=[claim.completion()],
        )
        try:
            result = await self._commit(commit, guard)
        except Superseded:
            if guard.is_lost:
                raise
            # An earlier attempt of this same commit landed before a transient error.
            return await self._load(claim.session_id)
        if isinstance(command, ResetSession):
            self._replacements.pop(claim.session_id, None)
            return _Cache(result.head_revision, [], None, cache.checkpoint)
        cache.advance(result.head_revision, [])
        if checkpoint is not None:
            cache.checkpoint = checkpoint
        self._replacements.pop(claim.session_id, None)
        log.info("session_command_applied", session_id=claim.session_id, kind=command.kind)
        return cache

    # ------------------------------------------------------------------ turns

    async def _run_turn(
        self, cache: _Cache, start: TurnStart, guard: LeaseGuard, last: bool
    ) -> tuple[TurnReport, CommitResult, bool]:
        """Run and commit one turn. Returns its report, the commit's result and whether a
        release it made was an idle release (decided by the store under its lock)."""
        session_id, turn_id = start.session_id, start.turn_id
        began = time.monotonic()
        control = TurnControl(turn_id)
        self._running[session_id] = control
        runner = TurnRunner(
            store=self.store,
            agent=self.agent,
            owner=self.owner,
            guard=guard,
            control=control,
            context=TurnContext(
                session_id=session_id,
                turn_id=turn_id,
                base_nodes=cache.nodes,
                leaf_node_id=cache.leaf_node_id,
                inputs=list(start.claim.inputs) if start.claim else [],
                seq=start.event.seq,
                revision=start.event.revision,
            ),
            ids=self.ids,
            clock=self.clock,
            sink=self.on_activity,
        )
        step = runner.run
        while True:
            self._running[session_id] = control
            try:
                with self.agent.span(
                    "lash.turn",
                    session_id=session_id,
                    turn_id=turn_id,
                    lease_generation=guard.generation,
                ):
                    out = await step()
            finally:
                if self._running.get(session_id) is control:
                    del self._running[session_id]
            claims = [c for c in (start.claim, *out.checkpoint_claims) if c is not None]
            if out.lease_lost:
                await self._abandon(claims)
                guard.mark_lost(guard.lost_reason or "lease lost during the turn")
                raise _TenureLost
            # The last allowed turn and a cancelled task release unconditionally; otherwise
            # the commit releases only if it leaves the session idle.
            release = last or out.task_cancelled
            commit = self._final_commit(
                cache, start, out, claims, guard, release, runner.final_checkpoint
            )
            try:
                result = await asyncio.shield(self._commit_turn(commit, guard))
            except SteeringPending:
                # Nothing was written: the turn takes the steering input and goes on.
                log.info("turn_steered_at_commit", session_id=session_id, turn_id=turn_id)
                step = runner.resume
                continue
            except (LeaseLost, Superseded):
                await self._abandon(claims)
                raise
            break
        if result.replayed:
            self._states.pop(session_id)
        else:
            cache.advance(result.head_revision, _new_nodes(commit, cache))
            self._remember(session_id, cache)  # counted again at its new size
        self._replacements.pop(session_id, None)
        assert commit.turn is not None
        report = TurnReport(
            session_id=session_id,
            turn_id=commit.turn.turn_id,
            lease_generation=guard.generation,
            outcome=out.outcome,
            input_ids=[i for c in claims for i in c.completion().input_ids],
            deferred_input_ids=result.deferred_input_ids,
            events=[start.event, *result.events],
            duration_s=time.monotonic() - began,
            replayed=result.replayed,
        )
        log.info(
            "turn_committed",
            session_id=session_id,
            turn_id=report.turn_id,
            outcome=out.outcome.kind,
            inputs=len(report.input_ids),
        )
        if out.task_cancelled:
            raise asyncio.CancelledError
        idle = result.released and not result.replayed and commit.release_lease_if_idle
        return report, result, idle

    def _final_commit(
        self,
        cache: _Cache,
        start: TurnStart,
        out: TurnOutput,
        claims: list[TurnInputClaim],
        guard: LeaseGuard,
        release: bool,
        steering_checkpoint: CheckpointKind | None,
    ) -> RuntimeCommit:
        provider = self.agent.provider
        return RuntimeCommit(
            session_id=start.session_id,
            fence=guard.fence,
            release_lease=release,
            release_lease_if_idle=not release,
            expected_head_revision=cache.head_revision,
            graph=cache.delta(out.nodes),
            config=SessionConfig(provider_id=provider.provider_id, model=provider.model),
            usage=out.usage,
            turn=FinalTurn(turn_id=start.turn_id, outcome=out.outcome, usage=out.usage),
            completed_input_claims=[c.completion() for c in claims],
            defer_active_inputs_of_turn=start.turn_id,
            steering_checkpoint=steering_checkpoint,
        )

    async def _commit_turn(self, commit: RuntimeCommit, guard: LeaseGuard) -> CommitResult:
        """The final commit; a turn id already used by another commit (a reused
        ``trace_turn_id``) is retried once under a fresh turn id so the input still lands."""
        try:
            return await self._commit(commit, guard)
        except TurnCommitConflict:
            assert commit.turn is not None
            fresh = self.ids.new_id("turn_")
            log.warning("turn_id_reused", session_id=commit.session_id, turn_id=commit.turn.turn_id)
            return await self._commit(_retarget(commit, fresh), guard)

    async def _commit(self, commit: RuntimeCommit, guard: LeaseGuard) -> CommitResult:
        """Commit, retrying the SAME commit on transient errors while the lease can still
        be valid (a final commit's stamp makes a landed retry a replay)."""
        delay = COMMIT_BACKOFF_S
        while True:
            try:
                with self.agent.span("lash.commit", session_id=commit.session_id):
                    return await self.store.commit(commit)
            except HeadRevisionConflict as exc:
                # A lock timeout or serialization failure may surface as a conflict although
                # the head never moved: that one is transient. A moved head is not.
                if exc.actual != commit.expected_head_revision or not guard.can_still_be_valid():
                    raise
                log.info("commit_retry_head_unchanged", session_id=commit.session_id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, COMMIT_BACKOFF_MAX_S)
            except RetryableStoreError as exc:
                if not guard.can_still_be_valid():
                    log.warning("commit_retry_after_ttl", session_id=commit.session_id)
                    return await self.store.commit(commit)
                log.info("commit_retry", session_id=commit.session_id, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, COMMIT_BACKOFF_MAX_S)

    async def _abandon(self, claims: list[TurnInputClaim]) -> None:
        for claim in claims:
            try:
                await self.store.abandon_input_claim(claim)
            except Exception:
                log.warning("abandon_claim_failed", session_id=claim.session_id, exc_info=True)


def _new_nodes(commit: RuntimeCommit, cache: _Cache) -> list[MessageNode]:
    """The nodes a commit added on top of what ``cache`` already holds."""
    graph = commit.graph
    if isinstance(graph, GraphAppend):
        return list(graph.nodes)
    if isinstance(graph, GraphReplace):
        return list(graph.nodes[len(cache.nodes) :])
    return []


def _retarget(commit: RuntimeCommit, turn_id: str) -> RuntimeCommit:
    assert commit.turn is not None
    graph = commit.graph
    if isinstance(graph, GraphAppend | GraphReplace):
        nodes = [
            n.model_copy(update={"turn_id": turn_id}) if n.turn_id == commit.turn.turn_id else n
            for n in graph.nodes
        ]
        graph = graph.model_copy(update={"nodes": nodes})
    return commit.model_copy(
        update={"turn": commit.turn.model_copy(update={"turn_id": turn_id}), "graph": graph}
    )
