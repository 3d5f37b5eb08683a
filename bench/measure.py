"""One measured run: fresh resources, W processes, a workload, the numbers.

The procedure is identical for the pipeline and the baseline (only the
:class:`~bench.targets.Target` differs): start W processes on a fresh database and
namespace, wait until all W consume, bind the observer, publish S x K inputs (as fast
as confirms allow, or at a fixed rate), wait until every input is seen committed, then
sample memory, stop the processes and read the database's committed-transaction count.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection

from bench import profiling, stages, statements
from bench.amqp_io import Observer, publish_workload, queue_state
from bench.options import BenchOptions
from bench.procs import Fleet, machine_cpu_seconds
from bench.progress import show_progress
from bench.resources import (
    autovacuum_runs,
    dbname_of,
    delete_namespace,
    fresh_database,
    settled_xact_commit,
    unique_namespace,
    xact_commit,
)
from bench.stats import latency_summary
from bench.targets import ROUTING_KEY, Target
from bench.tracker import CommitTracker
from bench.workload import build_workload
from consumer import broker


@dataclass(frozen=True)
class RunSpec:
    """What one run does."""

    mode: str
    workers: int
    sessions: int
    inputs_per_session: int
    concurrency: int
    rate: float | None = None
    # Profile the first process: "py-spy" or "pyinstrument"; output under profile_dir.
    profiler: str | None = None
    profile_path: Path | None = None
    # Count the SQL statements of the run from the server log (bench/statements.py).
    log_statements: bool = False


class RunFailed(RuntimeError):
    """A run could not complete; the message says why and where the logs are."""


async def _wait_ready(
    connection: AbstractConnection,
    queue: str,
    exchange: str,
    fleet: Fleet,
    want: int,
    timeout_s: float,
) -> None:
    """Until ``want`` consumers are on ``queue`` and ``exchange`` exists; fail on a dead process."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        dead = fleet.dead()
        if dead:
            member = dead[0]
            raise RunFailed(
                f"{member.name} exited with {member.proc.returncode} before it was ready:\n"
                f"{member.log_tail()}"
            )
        state = await queue_state(connection, queue)
        if state is not None and state[1] >= want and await _exchange_exists(connection, exchange):
            return
        if loop.time() > deadline:
            seen = "no queue" if state is None else f"{state[1]} consumers"
            raise RunFailed(f"not ready after {timeout_s:.0f}s ({seen} on {queue}, want {want})")
        await asyncio.sleep(0.2)


async def _exchange_exists(connection: AbstractConnection, name: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_exchange(name, passive=True)
        return True
    except aio_pika.exceptions.ChannelClosed:
        return False
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def _watch_dead_letters(
    connection: AbstractConnection, queue: str, tracker: CommitTracker, interval_s: float = 1.0
) -> None:
    """Fail the run as soon as anything is dead-lettered: such a run measures nothing."""
    while True:
        await asyncio.sleep(interval_s)
        state = await queue_state(connection, queue)
        if state is not None and state[0] > 0:
            tracker.fail(
                f"{state[0]} message(s) dead-lettered to {queue} "
                f"({len(tracker.committed_at)}/{len(tracker.expected)} committed)"
            )
            return


async def _idle_tx_rate(opts: BenchOptions, dbname: str, seconds: float) -> float | None:
    """Committed transactions per second while the ready processes have no work.

    Background loops (sweeps, relays, lease checks) commit even when idle; measuring them
    first lets the report separate per-turn cost from that constant rate. Statistics
    are flushed by backends about once a second, so the probe needs a few seconds.
    """
    if seconds <= 0:
        return None
    before = await xact_commit(opts.database_url, dbname)
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    after = await xact_commit(opts.database_url, dbname)
    return round((after - before) / (time.perf_counter() - started), 2)


async def _sample_memory(fleet: Fleet, interval_s: float = 0.5) -> None:
    while True:
        fleet.sample_memory()
        await asyncio.sleep(interval_s)


def _per_s(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else 0.0


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def latency_window_s(publish_s: float) -> float:
    """The window of a paced run's latency over time: a tenth of its publishing, at least
    5 s (so a window holds a few hundred inputs at the usual rates)."""
    return max(5.0, round(publish_s / 10.0))


async def measure(target: Target, spec: RunSpec, opts: BenchOptions) -> dict[str, Any]:
    """Run ``spec`` against ``target``; return the result record (fields: bench/README.md)."""
    namespace = unique_namespace(opts.namespace_prefix)
    log_dir = Path(tempfile.mkdtemp(prefix=f"lash-bench-{target.kind}-"))
    label = f"{spec.mode}/{target.kind} W={spec.workers}"
    failed = True
    connection = await broker.connect_plain(opts.amqp_url)
    try:
        async with fresh_database(opts.database_url) as database_url:
            dbname = dbname_of(database_url)
            result = await _measure_in(
                target, spec, opts, connection, database_url, dbname, namespace, log_dir, label
            )
            failed = False
            return result
    finally:
        with contextlib.suppress(Exception):
            await delete_namespace(opts.amqp_url, namespace, target.known_names(namespace))
        with contextlib.suppress(Exception):
            await connection.close()
        if failed or opts.keep_logs:
            print(f"[bench] {label}: process logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


async def _measure_in(
    target: Target,
    spec: RunSpec,
    opts: BenchOptions,
    connection: AbstractConnection,
    database_url: str,
    dbname: str,
    namespace: str,
    log_dir: Path,
    label: str,
) -> dict[str, Any]:
    await target.prepare(database_url, namespace, connection)
    server_log: Path | None = None
    if spec.log_statements:
        server_log = await statements.server_log_path(opts.database_url)
        if server_log is None:
            raise RunFailed("--statements needs a readable PostgreSQL server log")
        await statements.enable_statement_log(opts.database_url, dbname)
    log_window = (0, 0)
    fleet = Fleet()
    tracker = CommitTracker()
    wall = stages.WallClock.now()
    observer = Observer(
        connection, target.observations_exchange(namespace), tracker, target.handle_event
    )
    background: list[asyncio.Task[None]] = []
    spy: profiling.PySpy | None = None
    window_start: float | None = None
    machine_used: dict[str, float] = {}
    window_s = 0.0
    try:
        for index in range(spec.workers):
            argv, env = target.command(
                database_url, opts.amqp_url, namespace, index, spec.concurrency
            )
            if index == 0 and spec.profiler == "pyinstrument" and spec.profile_path is not None:
                argv = profiling.pyinstrument_command(argv, spec.profile_path)
            if opts.nice:
                argv = ["nice", "-n", str(opts.nice), *argv]  # nice execs: the same pid
            await fleet.start(f"{target.kind}-{index}", argv, env, log_dir)
        await _wait_ready(
            connection,
            target.ready_queue(namespace),
            target.observations_exchange(namespace),
            fleet,
            spec.workers,
            opts.ready_timeout_s,
        )
        submissions = build_workload(spec.sessions, spec.inputs_per_session)
        tracker.expect(submissions)
        await observer.start()
        idle_tx_per_s = await _idle_tx_rate(opts, dbname, opts.idle_probe_s)
        if spec.profiler == "py-spy" and spec.profile_path is not None:
            spy = profiling.PySpy(fleet.members[0].pid, spec.profile_path)
            await spy.start()
        xact_before = await xact_commit(opts.database_url, dbname)
        window_start = time.perf_counter()
        if server_log is not None:
            log_window = (statements.log_size(server_log), 0)
        for member in fleet.members:
            member.mark_cpu()
        machine_before = machine_cpu_seconds()
        background.append(asyncio.create_task(_sample_memory(fleet)))
        background.append(asyncio.create_task(show_progress(label, tracker, opts.progress)))
        background.append(
            asyncio.create_task(
                _watch_dead_letters(connection, f"{namespace}.dead-letter", tracker)
            )
        )
        publish_channel = await broker.open_channel(connection)
        published = await publish_workload(
            publish_channel,
            target.ingress_exchange(namespace),
            ROUTING_KEY,
            submissions,
            tracker,
            rate=spec.rate,
        )
        publish_s = time.perf_counter() - (tracker.first_publish or time.perf_counter())
        await tracker.wait_all(opts.stall_timeout_s)
        if server_log is not None:
            log_window = (log_window[0], statements.log_size(server_log))
        fleet.sample_memory()
        for member in fleet.members:
            member.read_cpu()
        machine_used = {
            name: used - machine_before.get(name, 0.0)
            for name, used in machine_cpu_seconds().items()
        }
        if spy is not None:
            await spy.stop()
        ingress_state = await queue_state(connection, target.ready_queue(namespace))
        dead_state = await queue_state(connection, f"{namespace}.dead-letter")
        await publish_channel.close()
    except BaseException as exc:
        if opts.progress:
            sys.stderr.write("\n")
        tails = "\n".join(f"--- {m.name} ---\n{m.log_tail(20)}" for m in fleet.members)
        if isinstance(exc, Exception) and not isinstance(exc, RunFailed):
            raise RunFailed(f"{label}: {exc}\n{tails}") from exc
        raise
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if spy is not None:
            await spy.stop()
        await observer.stop()
        await fleet.stop()
        if window_start is not None:
            window_s = time.perf_counter() - window_start
    xact_after = await settled_xact_commit(opts.database_url, dbname)
    maintenance = await autovacuum_runs(database_url)
    if spec.profiler == "py-spy" and spec.profile_path is not None and spec.profile_path.exists():
        summary = profiling.summarize_collapsed(spec.profile_path.read_text(errors="replace"))
        spec.profile_path.with_suffix(".summary.txt").write_text(summary)

    committed = len(tracker.committed_at)
    turns = len(tracker.turns)
    stage_report = None
    if target.kind == "pipeline":
        stage_report = stages.breakdown(
            await stages.read_stamps(database_url),
            {i: wall.ms(t) for i, t in tracker.published_at.items()},
            {i: wall.ms(t) for i, t in tracker.committed_at.items()},
        )
    statement_counts = None
    if server_log is not None:
        counts = statements.count_statements(server_log, *log_window, dbname)
        statement_counts = statements.statements_report(counts, turns)
    first = tracker.first_publish or 0.0
    last = tracker.last_commit or first
    duration = max(last - first, 0.0)
    xacts = xact_after - xact_before
    events = observer.received
    acks = published  # each ingress message is acked once: the queue is drained below
    amqp_total = published + acks + events
    cpu_total = sum(m.cpu_used_s or 0.0 for m in fleet.members)
    return {
        "kind": target.kind,
        "mode": spec.mode,
        "workers": spec.workers,
        "concurrency": spec.concurrency,
        "sessions": spec.sessions,
        "inputs_per_session": spec.inputs_per_session,
        "rate_target": spec.rate,
        "inputs_published": published,
        "inputs_committed": committed,
        "turns": turns,
        "duration_s": round(duration, 3),
        "turns_per_s": _per_s(turns, duration),
        "inputs_per_s": _per_s(committed, duration),
        "inputs_per_turn": _ratio(committed, turns),
        "publish_s": round(publish_s, 3),
        "latency_ms": latency_summary(tracker.latencies_ms()),
        "latency_windows": (
            tracker.latency_windows(latency_window_s(publish_s)) if spec.rate else None
        ),
        "stages_ms": stage_report,
        "db": {
            "xact_commit": xacts,
            "tx_per_turn": _ratio(xacts, turns),
            "tx_per_input": _ratio(xacts, committed),
            "idle_tx_per_s": idle_tx_per_s,
            "autovacuum_runs": maintenance,
            "window_s": round(window_s, 2),
            "tx_per_turn_excl_idle": None
            if idle_tx_per_s is None
            else _ratio(max(xacts - idle_tx_per_s * window_s, 0.0), turns),
        },
        "amqp": {
            "publishes": published,
            "acks": acks,
            "events": events,
            "total": amqp_total,
            "per_turn": _ratio(amqp_total, turns),
            "events_per_turn": _ratio(events, turns),
            "ingress_left": None if ingress_state is None else ingress_state[0],
            "dead_letters": None if dead_state is None else dead_state[0],
        },
        "rss_kib": {
            "end": [m.rss_end_kib for m in fleet.members],
            "peak": [m.rss_peak_kib for m in fleet.members],
            "end_max": max((m.rss_end_kib or 0 for m in fleet.members), default=0),
            "peak_max": max((m.rss_peak_kib or 0 for m in fleet.members), default=0),
        },
        "cpu": {
            "worker_s": [
                None if m.cpu_used_s is None else round(m.cpu_used_s, 2) for m in fleet.members
            ],
            "utilisation": _ratio(cpu_total, duration * len(fleet.members)),
            "ms_per_turn": _ratio(cpu_total * 1000.0, turns),
            "host_cpus": os.cpu_count(),
            # Per committed input, over the same window: the whole machine (which bounds
            # throughput when everything shares the cores), the processes under test and
            # the two servers.
            "host_ms_per_input": _ratio(machine_used.get("host", 0.0) * 1000.0, committed),
            "workers_ms_per_input": _ratio(cpu_total * 1000.0, committed),
            "postgres_ms_per_input": _ratio(machine_used.get("postgres", 0.0) * 1000.0, committed),
            "rabbitmq_ms_per_input": _ratio(machine_used.get("rabbitmq", 0.0) * 1000.0, committed),
            # The share of the window's core time the hypervisor gave to other machines.
            "steal_share": _ratio(machine_used.get("steal", 0.0), duration * (os.cpu_count() or 1)),
        },
        "events_by_type": dict(tracker.events_by_type),
        "outcomes": dict(tracker.outcomes),
        "duplicate_events": tracker.duplicate_events,
        "unmatched_commits": tracker.unmatched,
        "observer_undecodable": observer.undecodable,
        "profile": str(spec.profile_path) if spec.profile_path is not None else None,
        "statements": statement_counts,
    }
