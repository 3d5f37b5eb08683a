"""A worker dies in the middle of turns: ``kill -9`` (no chance to clean up) and SIGTERM
(graceful). Several sessions are in flight each time."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.fault import figures
from tests.fault.conftest import HarnessFactory
from tests.fault.harness import Harness, WorkerProcess

pytestmark = [pytest.mark.fault, pytest.mark.postgres, pytest.mark.rabbitmq]

TTL_MS = 2500
SWEEP_MS = 500
DELAY_MS = 400


async def busiest(
    h: Harness, sessions: list[str], at_least: int, timeout_s: float
) -> tuple[WorkerProcess, dict[str, object]]:
    """The worker running the most turns, once one runs at least ``at_least`` of them."""
    deadline = time.monotonic() + timeout_s
    best: tuple[WorkerProcess, dict[str, object]] | None = None
    while time.monotonic() < deadline:
        for w in h.fleet.alive():
            held = await h.wait_running_turns(w, sessions, 0, 0)
            if best is None or len(held) > len(best[1]):
                best = (w, dict(held))
        if best is not None and len(best[1]) >= at_least:
            return best
        best = None
        await asyncio.sleep(0.05)
    raise AssertionError(f"no worker ran {at_least} turns within {timeout_s}s\n{h.diagnostics()}")


async def test_kill9_mid_turn_sessions_are_taken_over(make_harness: HarnessFactory) -> None:
    async with make_harness(
        echo_delay_ms=DELAY_MS, lease_ttl_ms=TTL_MS, sweep_interval_ms=SWEEP_MS
    ) as h:
        await h.fleet.start(2)
        sessions = h.session_ids(8)
        feeder = asyncio.create_task(h.submit_many(sessions, 4, spacing_s=0.35))

        victim, held = await busiest(h, sessions, at_least=2, timeout_s=20)
        leases = await h.leases(list(held))
        victims = {
            s: r
            for s, r in leases.items()
            if r.owner is not None and r.owner.owner_id == victim.owner_id
        }
        killed_at = await h.kill9(victim)
        running_at_kill = {s: r.running_turn_id for s, r in victims.items()}
        await feeder

        report = await h.settle_and_check(timeout_s=60)
        takeovers = h.takeover_times(victims, killed_at, report.events)
        h.takeovers.extend(takeovers.values())
        h.observed_takeovers.extend(h.takeover_times(victims, killed_at).values())
        superseded = {
            (sid, tid) for sid, tid, _ in report.superseded_turns if tid in running_at_kill.values()
        }
        committed_before_kill = {
            (sid, tid)
            for sid, tid in running_at_kill.items()
            if any(
                e.type == "turn.committed" and getattr(e.payload, "turn_id", None) == tid
                for e in report.events.get(sid, [])
            )
        }
        figures.record(
            "kill9_takeover",
            h.figures(
                report,
                victim_sessions=len(victims),
                superseded_victim_turns=len(superseded),
            ),
        )
        report.assert_ok(f"after kill -9 of {victim.owner_id}\n{h.diagnostics()}")

        # Every session the dead worker ran a turn for was taken over by a newer generation,
        # unless that turn had already committed just before the kill.
        for sid in victims:
            if (sid, running_at_kill[sid]) in committed_before_kill:
                continue
            assert sid in takeovers, f"{sid} was never taken over\n{h.diagnostics()}"
        bound = (TTL_MS + SWEEP_MS) / 1000 + 2.5
        worst = max(takeovers.values(), default=0.0)
        assert worst <= bound, f"worst takeover {worst:.2f}s > {bound:.2f}s: {takeovers}"
        # The dead worker's turns were superseded (started, never committed).
        assert superseded or len(committed_before_kill) == len(victims), (
            f"no superseded turn among {running_at_kill}"
        )
        for sid, tid in superseded:
            assert not any(
                e.type == "turn.committed" and getattr(e.payload, "turn_id", None) == tid
                for e in report.events[sid]
            )


async def test_sigterm_mid_turn_drains_and_exits_zero(make_harness: HarnessFactory) -> None:
    grace_s = 6.0
    async with make_harness(
        echo_delay_ms=DELAY_MS,
        lease_ttl_ms=TTL_MS,
        sweep_interval_ms=SWEEP_MS,
        shutdown_grace_s=grace_s,
    ) as h:
        await h.fleet.start(2)
        sessions = h.session_ids(6)
        feeder = asyncio.create_task(h.submit_many(sessions, 4, spacing_s=0.35))
        victim, held = await busiest(h, sessions, at_least=1, timeout_s=20)
        running = {s: getattr(r, "running_turn_id", None) for s, r in held.items()}
        started = time.monotonic()
        await h.sigterm(victim)
        code = await victim.wait_exit(grace_s + 8)
        took = time.monotonic() - started
        await feeder
        assert code == 0, f"worker exited with {code} after SIGTERM\n{victim.log_tail(60)}"
        assert took <= grace_s + 8

        report = await h.settle_and_check(timeout_s=60)
        drained = sum(
            1
            for sid, tid in running.items()
            if any(
                e.type == "turn.committed" and getattr(e.payload, "turn_id", None) == tid
                for e in report.events.get(sid, [])
            )
        )
        figures.record(
            "sigterm_drain",
            h.figures(
                report,
                shutdown_s=round(took, 2),
                turns_running_at_sigterm=len(running),
                drained_by_victim=drained,
            ),
        )
        report.assert_ok(f"after SIGTERM of {victim.owner_id}\n{h.diagnostics()}")


async def test_paused_worker_is_fenced_off_after_takeover(make_harness: HarnessFactory) -> None:
    """SIGSTOP a worker in the middle of turns for longer than the lease TTL (a stalled
    holder, not provably dead: its pid still exists), let another worker take over, then
    SIGCONT it: its late commits must be fenced off - never a second concurrent turn."""
    async with make_harness(
        echo_delay_ms=DELAY_MS, lease_ttl_ms=TTL_MS, sweep_interval_ms=SWEEP_MS
    ) as h:
        await h.fleet.start(2)
        sessions = h.session_ids(6)
        feeder = asyncio.create_task(h.submit_many(sessions, 4, spacing_s=0.35))
        victim, held = await busiest(h, sessions, at_least=1, timeout_s=20)
        leases = await h.leases(list(held))
        victims = {
            s: r
            for s, r in leases.items()
            if r.owner is not None and r.owner.owner_id == victim.owner_id
        }
        victim.signal(signal.SIGSTOP)
        paused_at = time.time()
        h.faults.record("sigstop", victim.owner_id)
        await asyncio.sleep(TTL_MS / 1000 + 2.5)
        victim.signal(signal.SIGCONT)
        await feeder

        report = await h.settle_and_check(timeout_s=60)
        takeovers = h.takeover_times(victims, paused_at, report.events)
        h.takeovers.extend(takeovers.values())
        figures.record(
            "sigstop_fencing",
            h.figures(report, victim_sessions=len(victims), taken_over=len(takeovers)),
        )
        assert victim.alive(), f"paused worker died after SIGCONT\n{victim.log_tail(60)}"
        report.assert_ok(f"after SIGSTOP/SIGCONT of {victim.owner_id}\n{h.diagnostics()}")
        assert takeovers, f"no session of the paused worker was taken over: {victims}"
