"""Dispatch: drive many sessions concurrently, each under its lease, one drain at a time.

Wake-ups come from three places, fastest first: the worker that admitted an input kicks
the session directly (unless a live lease holder will see the input, or the input queued
behind open input whose own wake-up covers it: see ``Admission``); ``work``
notifications from the store reach every worker; and a recovery sweep every
``LASH_SWEEP_INTERVAL_MS`` asks the store for sessions whose pending work has no live
lease (a crashed worker's sessions, or a lost notification). Polling is only that
fallback.

Notifications are not handled one by one: every admission notifies every worker, and a
check per notification per worker would make each input cost more the more workers there
are. Instead the sessions they name are collected for ``notify_delay_s`` (which also gives
the admitting worker time to take the lease) and checked with one query that keeps only
those with work and no live lease; a session draining here is skipped (its drain picks
the work up). So a worker's notification cost is bounded by one query per delay, however
many notifications arrive. Sweeps and checks kick at most as many sessions as the worker
has free drain slots: a saturated worker would only queue them behind its own work and
race whoever is about to drain them (the admitter, whose drain is queued there) for the
lease, each lost race costing transactions on every side.

Turns run where the session's events are published, when that is known: an admitter
that does not publish a session's events (``InputAdmission.runs_elsewhere``) wakes no
drain, and its ``work`` notification (``for_publisher``) makes the worker whose outbox
relay holds the session's shard (``runs_here``) drain it at once, without the delay and
the check. There the session's state stays cached between turns and its events go out
from memory without a scan (``OutboxRelay.committed``). Every other worker treats that
notification as plain ``work``, so if no worker publishes the session just then, the
check drains it after the delay.

A session has at most one drain task in this process. A kick while it drains marks it to
be drained again; a kick while it waits for a drain slot does not, since the drain that
follows reads after it. Input admitted while a drain runs is never left behind: the final commit
releases the lease only when nothing is left, and admission waits for that commit's lease
row lock (see ``Store.commit``), so a later admission sees the lease free and kicks a drain. At most
``LASH_CONCURRENCY`` sessions drain at once. A session whose lease another live worker
holds is left to that worker, never retried in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from structlog.contextvars import bound_contextvars

from consumer.observability.logs import get_logger
from consumer.observability.metrics import (
    ACTIVE_SESSIONS,
    CLAIMS,
    LEASE_EVENTS,
    TURN_DURATION,
    TURNS,
)
from consumer.observability.tracing import span
from lash_core.engine import DrainReport, SessionDriver
from lash_core.outcomes import Finished
from lash_core.store.base import Notification, Store

log = get_logger(__name__)

SHUTDOWN_REASON = "worker shutting down"


def outcome_label(report_outcome: object) -> str:
    """``finished`` or the stop reason (``cancelled``, ``provider_error``, ...)."""
    if isinstance(report_outcome, Finished):
        return "finished"
    return str(getattr(report_outcome, "stop", "unknown"))


class Dispatcher:
    """Schedules ``SessionDriver.drain`` calls for the sessions this worker should run."""

    def __init__(
        self,
        driver: SessionDriver,
        store: Store,
        *,
        concurrency: int,
        sweep_interval_s: float,
        sweep_limit: int = 500,
        notify_delay_s: float = 0.25,
        runs_here: Callable[[str], bool] | None = None,
    ) -> None:
        self._driver = driver
        self._store = store
        self._runs_here = runs_here
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._sweep_interval_s = sweep_interval_s
        self._sweep_limit = sweep_limit
        self._notify_delay_s = min(notify_delay_s, sweep_interval_s)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._notified: set[str] = set()
        self._closing = False
        self._sweep_now = False
        self._sweeper_wake = asyncio.Event()
        self.sweeps = 0
        self.checks = 0
        self.probes = 0
        self.handoffs = 0
        self._active = 0
        self.drains = 0
        self.idle_drains = 0
        self.busy_drains = 0
        self.turns = 0

    # ------------------------------------------------------------------ wake-ups

    def kick(self, session_id: str) -> None:
        """Drain ``session_id`` soon (or again, if it is draining now): it has work."""
        if self._closing:
            return
        if session_id in self._tasks:
            self._again.add(session_id)
            return
        task = asyncio.create_task(self._drain_loop(session_id), name=f"drain:{session_id}")
        self._tasks[session_id] = task

    def on_notification(self, note: Notification) -> None:
        if note.kind == "work":
            if note.session_id in self._tasks or self._closing:
                return
            runs_here = self._runs_here
            if note.for_publisher and runs_here is not None and runs_here(note.session_id):
                # Left here by its admitter: this worker publishes the session's events.
                self.handoffs += 1
                self.kick(note.session_id)
                return
            self._notified.add(note.session_id)
            self._sweeper_wake.set()
        elif note.kind == "cancel":
            self.cancel_local(note.session_id, note.turn_id, None)

    def cancel_local(self, session_id: str, turn_id: str | None, reason: str | None) -> bool:
        """Cancel the turn if it runs in this process (the store flag covers the rest)."""
        return self._driver.cancel(session_id, turn_id, reason)

    def sweep_soon(self) -> None:
        """Run the recovery sweep now (e.g. after missing notifications)."""
        self._sweep_now = True
        self._sweeper_wake.set()

    @property
    def draining_sessions(self) -> set[str]:
        return set(self._tasks)

    # ------------------------------------------------------------------ draining

    async def _drain_loop(self, session_id: str) -> None:
        # The first round drains without asking: every kick comes with evidence of work
        # (an admission here, or a check that just found it orphaned), and under load,
        # when drains wait for slots, asking first cost a statement per turn to save a
        # one-transaction idle acquisition only in the rare case that the work went.
        fresh = True
        try:
            while not self._closing:
                async with self._slots:
                    if self._closing:
                        return
                    # Every kick follows a commit (an admission's, or the state a check
                    # read), and the round starting now reads after it: kicks while this
                    # round waited for its slot need no round of their own. Only a kick
                    # from here on sends the session round again.
                    self._again.discard(session_id)
                    if fresh or await self._still_orphaned(session_id):
                        await self._drain_once(session_id)
                fresh = False
                if session_id not in self._again:
                    return
        finally:
            self._tasks.pop(session_id, None)
            self._again.discard(session_id)

    async def _still_orphaned(self, session_id: str) -> bool:
        """Whether a session still has work and no live lease (one statement).

        Asked before a drain goes round again (it was kicked while draining): the drain
        that just ended has usually taken that work already, or another worker may be
        draining it now."""
        self.probes += 1
        try:
            found = await self._store.sessions_with_orphaned_work(1, among=(session_id,))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("work_check_failed", session_id=session_id, error=str(exc))
            return True
        return bool(found)

    async def _drain_once(self, session_id: str) -> None:
        self._active += 1
        ACTIVE_SESSIONS.set(self._active)
        try:
            with (
                bound_contextvars(session_id=session_id),
                span("lash.drain", session_id=session_id),
            ):
                report = await self._driver.drain(session_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The sweep picks the session up again once its lease is free.
            log.exception("drain_failed", session_id=session_id)
            return
        finally:
            self._active -= 1
            ACTIVE_SESSIONS.set(self._active)
        self.drains += 1
        self._record(report)

    def _record(self, report: DrainReport) -> None:
        if not report.acquired:
            if report.idle:  # nothing to run, the lease was never taken
                self.idle_drains += 1
            else:
                self.busy_drains += 1
                LEASE_EVENTS.labels(event="busy").inc()
            return
        LEASE_EVENTS.labels(event="takeover" if report.took_over else "acquired").inc()
        if report.lease_lost:
            LEASE_EVENTS.labels(event="lost").inc()
        for turn in report.turns:
            self.turns += 1
            TURNS.labels(outcome=outcome_label(turn.outcome)).inc()
            TURN_DURATION.observe(turn.duration_s)
            if turn.input_ids:
                CLAIMS.labels(mode="next_turn").inc(len(turn.input_ids))
            log.debug(
                "drain_turn",
                session_id=report.session_id,
                turn_id=turn.turn_id,
                lease_generation=turn.lease_generation,
                outcome=outcome_label(turn.outcome),
                inputs=len(turn.input_ids),
                duration_s=round(turn.duration_s, 4),
                replayed=turn.replayed,
            )

    # ------------------------------------------------------------------ recovery sweep

    async def run_sweeper(self) -> None:
        """Every sweep interval, kick sessions with pending work and no live lease; in
        between, check the sessions that ``work`` notifications named (batched)."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while not self._closing:
            if self._sweep_now or loop.time() >= next_sweep:
                self._sweep_now = False
                self._notified.clear()  # the full sweep covers them
                await self._sweep(None)
                next_sweep = loop.time() + self._sweep_interval_s
            elif self._notified:
                # Let the burst gather (and the admitting worker take the lease) first.
                await asyncio.sleep(self._notify_delay_s)
                among, self._notified = self._notified, set()
                among.difference_update(self._tasks)
                if among and self._room() > 0:
                    await self._sweep(among)
                elif among:
                    self._notified.update(among)  # checked once a slot is free
            self._sweeper_wake.clear()
            if self._closing or self._sweep_now or self._notified:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_sweep - loop.time())):
                    await self._sweeper_wake.wait()

    async def _sweep(self, among: set[str] | None) -> None:
        """Kick the sessions (of ``among``, or all) with pending work and no live lease."""
        if among is None:
            self.sweeps += 1
        else:
            self.checks += 1
        try:
            orphaned = await self._store.sessions_with_orphaned_work(self._sweep_limit, among=among)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Notified sessions are not retried here: the next full sweep covers them.
            log.warning("sweep_failed", error=f"{type(exc).__name__}: {exc}")
            return
        for session_id in orphaned:
            if session_id in self._tasks:
                continue
            if self._room() <= 0:
                # A busy worker would only queue the session behind its own work and race
                # whoever else is about to drain it (its admitter, an idle worker) for
                # the lease: notified sessions wait for a free slot here, the rest for
                # the next sweep.
                if among is not None:
                    self._notified.add(session_id)
                continue
            self.kick(session_id)

    def _room(self) -> int:
        """Free drain slots: sessions this worker could start draining right now."""
        return self._concurrency - len(self._tasks)

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self, grace_s: float, cancel_wait_s: float = 30.0) -> None:
        """Stop taking work; let running drains finish within ``grace_s``; then cancel
        their turns (they commit as stopped/cancelled and release their leases)."""
        self._closing = True
        self._sweeper_wake.set()
        pending = set(self._tasks.values())
        if pending:
            log.info("dispatch_draining", sessions=len(pending), grace_s=grace_s)
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        if pending:
            running = self._driver.running()
            log.warning("dispatch_cancelling_turns", sessions=sorted(running))
            for session_id, turn_id in running.items():
                self._driver.cancel(session_id, turn_id, SHUTDOWN_REASON)
            _, pending = await asyncio.wait(pending, timeout=cancel_wait_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
