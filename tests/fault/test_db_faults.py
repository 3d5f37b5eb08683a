"""Database faults: the workers' backends are terminated during admission, claim and
commit, and the lease table stalls for longer than a lease TTL."""

from __future__ import annotations

import asyncio

import pytest

from tests.fault import figures
from tests.fault.conftest import HarnessFactory
from tests.fault.harness import lease_table, stall_table

pytestmark = [pytest.mark.fault, pytest.mark.postgres, pytest.mark.rabbitmq]


async def test_db_backend_termination(make_harness: HarnessFactory) -> None:
    async with make_harness(echo_delay_ms=250, lease_ttl_ms=2500, sweep_interval_ms=500) as h:
        await h.fleet.start(2)
        sessions = h.session_ids(8)
        feeder = asyncio.create_task(h.submit_many(sessions, 5, spacing_s=0.4))
        terminated = []
        # Every ~0.6 s for a while: hits admissions, claims (start_turn) and commits alike.
        for _ in range(8):
            await asyncio.sleep(0.6)
            terminated.append(await h.drop_db())
        await feeder
        terminated.append(await h.drop_db())

        report = await h.settle_and_check(timeout_s=60)
        for w in h.fleet.workers:
            if not w.alive():
                report.violation(f"{w.owner_id} exited ({w.returncode}) on a lost connection")
        figures.record(
            "db_backend_termination", h.figures(report, backends_terminated=sum(terminated))
        )
        assert sum(terminated) > 0, "no worker backend was found to terminate"
        report.assert_ok(h.diagnostics())


async def test_db_stall_never_runs_a_session_twice(make_harness: HarnessFactory) -> None:
    ttl_ms = 2500
    async with make_harness(echo_delay_ms=300, lease_ttl_ms=ttl_ms, sweep_interval_ms=500) as h:
        await h.fleet.start(2)
        table = await lease_table(h.config.database_url)
        sessions = h.session_ids(8)
        feeder = asyncio.create_task(h.submit_many(sessions, 5, spacing_s=0.4))
        for w in h.fleet.alive():
            await h.wait_running_turns(w, sessions, 1, timeout_s=10)
        # Shorter than the TTL: renewals wait and succeed.
        await stall_table(h.config.database_url, table, 1.2, h.faults)
        await asyncio.sleep(1.0)
        # Longer than the TTL: leases expire by the database clock while holders wait.
        await stall_table(h.config.database_url, table, ttl_ms / 1000 + 1.5, h.faults)
        await feeder

        report = await h.settle_and_check(timeout_s=60)
        for w in h.fleet.workers:
            if not w.alive():
                report.violation(f"{w.owner_id} exited ({w.returncode}) during a stall")
        figures.record("db_stall", h.figures(report))
        report.assert_ok(h.diagnostics())
