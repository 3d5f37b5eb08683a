"""The fault-test harness: real workers, a harness bus, a read-only store, fault injection
and the invariant checker, wired together for one test (or one long soak).

Parts (one job each): :mod:`tests.fault.workers` (process manager), :mod:`tests.fault.bus`
(publisher, observer, receipts, dead letters), :mod:`tests.fault.faults` (targeted broker
and database faults), :mod:`tests.fault.checker` (invariants), :mod:`tests.fault.figures`
(numbers for the README). :class:`Harness` owns their lifetimes: leaving it always kills
every worker process group and removes the namespace's queues and exchanges.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lash_core.events import DurableEvent
from lash_core.leases import LeaseRow
from lash_core.store.base import Store
from tests.fault.bus import Bus, DeadLetter, Observed, Receipt
from tests.fault.checker import CheckReport, Workload, check_invariants, wait_quiescent
from tests.fault.faults import (
    FaultLog,
    close_broker_connections,
    lease_table,
    stall_table,
    terminate_db_backends,
)
from tests.fault.resilient import resilient, retrying
from tests.fault.workers import Fleet, WorkerConfig, WorkerDied, WorkerProcess

__all__ = [
    "Bus",
    "CheckReport",
    "DeadLetter",
    "FaultLog",
    "Fleet",
    "Harness",
    "Observed",
    "Receipt",
    "WorkerConfig",
    "WorkerDied",
    "WorkerProcess",
    "Workload",
    "harness",
    "lease_table",
    "stall_table",
]


@dataclass
class Harness:
    config: WorkerConfig
    fleet: Fleet
    bus: Bus
    store: Store
    faults: FaultLog = field(default_factory=FaultLog)
    workload: Workload = field(default_factory=Workload)
    takeovers: list[float] = field(default_factory=list)
    observed_takeovers: list[float] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.config.namespace

    def session_ids(self, count: int, tag: str = "s") -> list[str]:
        return [f"{self.namespace}-{tag}{i:02d}" for i in range(count)]

    @staticmethod
    def text_for(session_id: str, key: str) -> str:
        """A unique, delimiter-bounded token so no text is a substring of another."""
        return f"<{session_id}|{key}|{uuid.uuid4().hex[:8]}>"

    async def submit(
        self, session_id: str, key: str, *, reply: bool = False, text: str | None = None
    ) -> str:
        """Submit one new input (recorded in the workload); returns its correlation id."""
        text = text or self.text_for(session_id, key)
        self.workload.add(session_id, key, text)
        return await self.bus.submit(session_id, text, source_key=key, reply=reply)

    async def submit_many(
        self, session_ids: list[str], per_session: int, *, spacing_s: float = 0.0, tag: str = "k"
    ) -> None:
        """``per_session`` inputs for each session, round-robin, ``spacing_s`` between rounds."""
        for k in range(per_session):
            for sid in session_ids:
                await self.submit(sid, f"{tag}{k}")
            if spacing_s:
                await asyncio.sleep(spacing_s)

    # ------------------------------------------------------------------ faults

    async def kill9(self, worker: WorkerProcess) -> float:
        worker.kill9()
        at = time.time()
        self.faults.record("kill9", worker.owner_id)
        await worker.wait_exit(10)
        return at

    async def sigterm(self, worker: WorkerProcess) -> float:
        import signal

        worker.signal(signal.SIGTERM)
        self.faults.record("sigterm", worker.owner_id)
        return time.time()

    async def drop_broker(self, workers: list[WorkerProcess] | None = None) -> int:
        pids = [w.pid for w in (workers or self.fleet.alive())]
        return await close_broker_connections(pids, self.faults)

    async def drop_db(self, workers: list[WorkerProcess] | None = None) -> int:
        pids = [w.pid for w in (workers or self.fleet.alive())]
        return await terminate_db_backends(self.config.database_url, pids, self.faults)

    # ------------------------------------------------------------------ leases

    async def leases(self, session_ids: list[str]) -> dict[str, LeaseRow]:
        rows = await asyncio.gather(*(self.store.read_lease(s) for s in session_ids))
        return {s: r for s, r in zip(session_ids, rows, strict=True) if r is not None}

    async def wait_running_turns(
        self, worker: WorkerProcess, session_ids: list[str], at_least: int, timeout_s: float
    ) -> dict[str, LeaseRow]:
        """Wait until ``worker`` holds at least ``at_least`` sessions with a running turn."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = await self.store.now_ms()
            held = {
                s: r
                for s, r in (await self.leases(session_ids)).items()
                if r.is_live(now)
                and r.owner is not None
                and r.owner.owner_id == worker.owner_id
                and r.running_turn_id is not None
            }
            if len(held) >= at_least or time.monotonic() > deadline:
                return held
            await asyncio.sleep(0.05)

    async def wait_any_running_turn(self, session_ids: list[str], timeout_s: float) -> int:
        """Wait until some worker runs a turn of one of ``session_ids``; returns how many
        turns run at that moment (0 at the deadline)."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = await self.store.now_ms()
            running = sum(
                1
                for r in (await self.leases(session_ids)).values()
                if r.is_live(now) and r.running_turn_id is not None
            )
            if running or time.monotonic() > deadline:
                return running
            await asyncio.sleep(0.05)

    def takeover_times(
        self,
        victims: dict[str, LeaseRow],
        killed_at: float,
        events: dict[str, list[DurableEvent]] | None = None,
    ) -> dict[str, float]:
        """Per victim session whose running turn died with its worker: seconds from the kill
        until a newer lease generation started a turn there - by the database's
        ``created_at_ms`` of that ``turn.started`` when the stored ``events`` are given,
        else by when observers received it (which adds the outbox relay's delay).

        A session whose running turn still committed (the kill landed just after the
        commit) had nothing to take over, so it is not measured: its next turn waits for
        the next input, not for recovery.
        """
        out: dict[str, float] = {}
        for sid, row in victims.items():
            if events is not None:
                stream = [
                    (e.type, e.payload.model_dump(mode="json"), e.created_at_ms / 1000)
                    for e in events.get(sid, [])
                ]
            else:
                stream = [
                    (o.type, o.body, o.received_at)
                    for o in self.bus.observed
                    if o.session_id == sid
                ]
            if any(
                t == "turn.committed" and b.get("turn_id") == row.running_turn_id
                for t, b, _ in stream
            ):
                continue
            for kind, body, at in stream:
                if kind == "turn.started" and int(body.get("lease_generation", 0)) > (
                    row.fencing_token
                ):
                    out[sid] = at - killed_at
                    break
        return out

    # ------------------------------------------------------------------ checking

    async def settle_and_check(self, timeout_s: float = 60.0, via_wire: bool = True) -> CheckReport:
        unsettled = await wait_quiescent(self.store, self.workload, self.bus, timeout_s)
        report = await check_invariants(
            self.store,
            self.workload,
            self.bus,
            live_owner_ids=self.fleet.alive_owner_ids(),
            via_wire=via_wire and bool(self.fleet.alive()),
        )
        for sid, why in sorted(unsettled.items()):
            report.violation(f"{sid}: not settled after {timeout_s}s: {why}")
        return report

    def figures(self, report: CheckReport, **extra: Any) -> dict[str, Any]:
        out = report.figures()
        out["faults_injected"] = self.faults.total
        out["faults"] = dict(self.faults.counts)
        out["workers_started"] = len(self.fleet.workers)
        if self.takeovers:
            out["worst_takeover_s"] = round(max(self.takeovers), 3)
            out["takeovers"] = len(self.takeovers)
        if self.observed_takeovers:
            out["worst_observed_takeover_s"] = round(max(self.observed_takeovers), 3)
        out.update(extra)
        return out

    def diagnostics(self, lines: int = 25) -> str:
        return self.fleet.logs(lines)


@asynccontextmanager
async def harness(
    database_url: str, amqp_url: str, namespace: str, log_dir: Path, **worker_settings: Any
) -> AsyncIterator[Harness]:
    """One test's world. Always kills its workers and deletes its broker topology."""
    from lash_core.store.postgres import PostgresStore

    config = WorkerConfig(database_url, amqp_url, namespace, **worker_settings)
    fleet = Fleet(config, log_dir)
    bus = Bus(amqp_url, namespace)
    store: Store = PostgresStore(database_url, pool_size=2, max_overflow=2)
    try:
        await retrying(store.start, 60)
        await bus.start()
        yield Harness(config=config, fleet=fleet, bus=bus, store=resilient(store))
    finally:
        fleet.close()
        with suppress(Exception):
            await bus.delete_topology()
        await bus.close()
        await store.close()
