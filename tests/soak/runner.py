"""The soak: steady traffic over many sessions while a chaos loop kills (``-9``), stops
(SIGTERM) and restarts workers and drops their broker and database connections; then
every invariant of :mod:`tests.fault.checker` over the whole run.

The CI test (``tests/soak/test_soak_short.py``) and the long command
(``scripts/soak.py``) run this same code with different plans.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lash_core.leases import LeaseRow
from tests.fault.checker import CheckReport
from tests.fault.faults import have_rabbitmqctl
from tests.fault.harness import Harness, WorkerProcess


@dataclass
class SoakPlan:
    workers: int = 3
    sessions: int = 20
    inputs_per_session: int = 5
    duration_s: float = 60.0
    feed_fraction: float = 0.75
    chaos_every_s: float = 8.0
    echo_delay_ms: int = 200
    lease_ttl_ms: int = 2500
    sweep_interval_ms: int = 500
    shutdown_grace_s: float = 5.0
    settle_timeout_s: float = 90.0
    seed: int = 1
    weights: dict[str, int] = field(
        default_factory=lambda: {"kill9": 3, "sigterm": 2, "broker_drop": 2, "db_drop": 2}
    )

    def worker_settings(self) -> dict[str, Any]:
        return {
            "echo_delay_ms": self.echo_delay_ms,
            "lease_ttl_ms": self.lease_ttl_ms,
            "sweep_interval_ms": self.sweep_interval_ms,
            "shutdown_grace_s": self.shutdown_grace_s,
        }


@dataclass
class _Kill:
    victims: dict[str, LeaseRow]
    at: float


@dataclass
class SoakState:
    kills: list[_Kill] = field(default_factory=list)
    planned_exits: set[str] = field(default_factory=set)
    sigterm_codes: dict[str, int | None] = field(default_factory=dict)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    start_failures: list[str] = field(default_factory=list)
    injection_failures: list[str] = field(default_factory=list)


async def _feed(h: Harness, plan: SoakPlan, rng: random.Random) -> None:
    sessions = h.session_ids(plan.sessions)
    order = [(sid, k) for k in range(plan.inputs_per_session) for sid in sessions]
    rng.shuffle(order)
    # Keep each session's own inputs in key order (k0 before k1 ...) - not required for
    # correctness, but it makes transcripts easy to read when a check fails.
    counters: dict[str, int] = {}
    interval = plan.duration_s * plan.feed_fraction / max(1, len(order))
    start = time.monotonic()
    for i, (sid, _) in enumerate(order):
        k = counters.get(sid, 0)
        counters[sid] = k + 1
        await h.submit(sid, f"k{k}")
        delay = start + (i + 1) * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def _replace(h: Harness, state: SoakState, old: WorkerProcess, after_s: float) -> None:
    await asyncio.sleep(after_s)
    if old.alive():
        code = await old.wait_exit(30)
        state.sigterm_codes[old.owner_id] = code
    # A worker that cannot start (say the shared PostgreSQL is out of connections) exits
    # non-zero by design; that is the environment, not an invariant: count it and retry.
    for _ in range(3):
        w = h.fleet.spawn()
        try:
            await w.wait_ready(60)
            return
        except AssertionError as exc:
            w.kill9()
            state.planned_exits.add(w.owner_id)
            state.start_failures.append(str(exc)[:2000])
    state.problems.append(f"no replacement worker became ready: {state.start_failures[-1]}")


async def _chaos_step(
    h: Harness, plan: SoakPlan, state: SoakState, rng: random.Random, sessions: list[str]
) -> str:
    """Inject one fault; returns what was done (for progress output)."""
    alive = h.fleet.alive()
    if not alive:
        return "no worker alive: nothing injected"
    weights = dict(plan.weights)
    if not have_rabbitmqctl():
        weights.pop("broker_drop", None)
    action = rng.choices(list(weights), weights=list(weights.values()))[0]
    # A chaos monkey that aims: the worker running the most turns right now (ties at
    # random), so faults land in the middle of turns rather than on idle workers.
    leases = await h.leases(sessions)
    now = await h.store.now_ms()
    running: dict[str, dict[str, LeaseRow]] = {w.owner_id: {} for w in alive}
    for sid, row in leases.items():
        if row.is_live(now) and row.owner is not None and row.running_turn_id is not None:
            running.setdefault(row.owner.owner_id, {})[sid] = row
    rng.shuffle(alive)
    victim = max(alive, key=lambda w: len(running[w.owner_id]))
    if action == "kill9":
        victims = running[victim.owner_id]
        state.planned_exits.add(victim.owner_id)
        at = await h.kill9(victim)
        state.kills.append(_Kill(victims, at))
        _spawn_bg(state, _replace(h, state, victim, 1.0))
    elif action == "sigterm":
        state.planned_exits.add(victim.owner_id)
        await h.sigterm(victim)
        _spawn_bg(state, _replace(h, state, victim, 0.0))
    elif action == "broker_drop":
        await h.drop_broker([victim])
    else:
        await h.drop_db([victim])
    return f"{action} {victim.owner_id} ({len(running[victim.owner_id])} turns running)"


def _spawn_bg(state: SoakState, coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    state.background.add(task)
    task.add_done_callback(state.background.discard)


async def run_soak(
    h: Harness, plan: SoakPlan, progress: Callable[[str], None] | None = None
) -> tuple[CheckReport, dict[str, Any]]:
    """Run the plan against ``h`` and return the invariant report and the figures.
    ``progress`` receives one line per injected fault (the long soak prints them)."""
    rng = random.Random(plan.seed)
    state = SoakState()
    sessions = h.session_ids(plan.sessions)
    started = time.monotonic()
    await h.fleet.start(plan.workers)
    feeder = asyncio.create_task(_feed(h, plan, rng))
    try:
        deadline = started + plan.duration_s
        while time.monotonic() < deadline:
            pause = plan.chaos_every_s * rng.uniform(0.7, 1.3)
            await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
            try:
                done = await _chaos_step(h, plan, state, rng, sessions)
            except Exception as exc:  # injecting a fault failed; the run goes on
                done = f"fault injection failed: {type(exc).__name__}: {exc}"
                state.injection_failures.append(done)
            if progress is not None:
                progress(
                    f"[{time.monotonic() - started:7.1f}s] {done}; submitted "
                    f"{h.workload.input_count}, observed {len(h.bus.observed)} events, "
                    f"{len(h.fleet.alive())} workers alive"
                )
        await feeder
        if state.background:
            await asyncio.wait(set(state.background), timeout=90)
    finally:
        if not feeder.done():
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
    # Top the fleet up so settling never depends on luck.
    while len(h.fleet.alive()) < plan.workers:
        await h.fleet.start(1)

    report = await h.settle_and_check(timeout_s=plan.settle_timeout_s)
    for w in h.fleet.workers:
        if w.owner_id not in state.planned_exits and not w.alive():
            report.violation(f"{w.owner_id} died unplanned ({w.returncode}):\n{w.log_tail(30)}")
    for owner, code in state.sigterm_codes.items():
        if code != 0:
            report.violation(f"{owner} exited {code} after SIGTERM")
    for problem in state.problems:
        report.violation(problem)
    for kill in state.kills:
        h.takeovers.extend(h.takeover_times(kill.victims, kill.at, report.events).values())
        h.observed_takeovers.extend(h.takeover_times(kill.victims, kill.at).values())
    figures = h.figures(
        report,
        duration_s=round(time.monotonic() - started, 1),
        worker_start_failures=len(state.start_failures),
        injection_failures=len(state.injection_failures),
        plan={k: v for k, v in asdict(plan).items() if k != "weights"},
    )
    return report, figures
