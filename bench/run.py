"""The benchmark's entry point: which runs, in which order, and the report.

Modes:
- ``throughput``: for each W in ``--workers``, the baseline and the pipeline on the same
  S x K workload, published as fast as the broker confirms.
- ``latency``: at W = ``--latency-workers`` (default the largest W), both systems with
  rate-limited publishing at ``--rate`` inputs/s, by default half the pipeline's measured
  maximum turn rate (measured first if the throughput mode did not run at that W). Half
  the *turn* rate, not the input rate: spread-out inputs of a session rarely merge into
  one turn, so each input costs a turn. The run lasts about ``--latency-duration``
  seconds (at most S x K inputs).
- ``scale``: the pipeline with many sessions touched (``--scale-sessions``) to show how
  throughput, latency and worker memory behave with many sessions.
- ``--statements``: one more pipeline run like the latency run (at the latency rate
  when known, else unlimited) counting its SQL statements from the server log
  (:mod:`bench.statements`); the top statements per turn are printed after the table.
- ``--profile``: one more pipeline run at W=1 with the worker under py-spy (or
  pyinstrument); the report lands in ``bench/results/``.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import profiling
from bench.measure import RunFailed, RunSpec, measure
from bench.options import BenchOptions, parse_options
from bench.report import (
    attach_baseline_ratios,
    render_repeats,
    render_stages,
    render_statements,
    render_table,
    render_windows,
    summarise_repeats,
    write_json,
)
from bench.targets import BaselineTarget, PipelineTarget, Target


async def _attempt(target: Target, spec: RunSpec, opts: BenchOptions) -> dict[str, Any]:
    """One run; a failure is recorded in the results instead of ending the benchmark."""
    try:
        return await measure(target, spec, opts)
    except RunFailed as exc:
        print(f"[bench] {spec.mode}/{target.kind} W={spec.workers} failed: {exc}", file=sys.stderr)
        return {
            "kind": target.kind,
            "mode": spec.mode,
            "workers": spec.workers,
            "concurrency": spec.concurrency,
            "sessions": spec.sessions,
            "inputs_per_session": spec.inputs_per_session,
            "rate_target": spec.rate,
            "error": str(exc),
        }


def _max_turn_rate(runs: list[dict[str, Any]], workers: int) -> float | None:
    rates = [
        r["turns_per_s"]
        for r in runs
        if r["kind"] == "pipeline"
        and r["mode"] == "throughput"
        and r["workers"] == workers
        and "error" not in r
    ]
    return max(rates) if rates else None


def latency_shape(sessions: int, k: int, rate: float, duration_s: float) -> tuple[int, int]:
    """Sessions x inputs for a rate-limited run lasting about ``duration_s``.

    At most the throughput workload (S x K), else at least 20 inputs; inputs are spread over as
    many sessions as possible so consecutive inputs of one session are far apart.
    """
    total = min(sessions * k, max(20, round(rate * duration_s)))
    spread = min(sessions, total)
    return spread, max(1, total // spread)


async def run_bench(opts: BenchOptions, stamp: str | None = None) -> dict[str, Any]:
    """Every requested run; returns the results document (also written as JSON)."""
    stamp = stamp or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    pipeline = PipelineTarget(opts.worker_env)
    baseline = BaselineTarget()
    runs: list[dict[str, Any]] = []
    began = time.perf_counter()

    def spec(mode: str, workers: int, sessions: int, k: int, rate: float | None = None) -> RunSpec:
        return RunSpec(mode, workers, sessions, k, opts.concurrency, rate)

    s, k = opts.sessions, opts.inputs_per_session
    latency_rate: float | None = None
    if "throughput" in opts.modes:
        for w in opts.workers:
            for repeat in range(opts.repeat):
                # Alternate which system runs first, so a machine that drifts (or a run
                # that leaves work behind for the next) favours neither.
                targets: list[Target] = [baseline, pipeline] if opts.baseline else [pipeline]
                if repeat % 2:
                    targets.reverse()
                for target in targets:
                    record = await _attempt(target, spec("throughput", w, s, k), opts)
                    record["repeat"] = repeat
                    runs.append(record)

    if "latency" in opts.modes:
        w = opts.latency_w
        rate = opts.rate
        if rate is None:
            measured = _max_turn_rate(runs, w)
            if measured is None:
                runs.append(await _attempt(pipeline, spec("throughput", w, s, k), opts))
                measured = _max_turn_rate(runs, w)
            rate = None if measured is None else max(round(measured / 2, 1), 1.0)
        if rate is None:
            print("[bench] latency mode skipped: no throughput measured", file=sys.stderr)
        else:
            latency_rate = rate
            ls, lk = latency_shape(s, k, rate, opts.latency_duration_s)
            if opts.baseline:
                runs.append(await _attempt(baseline, spec("latency", w, ls, lk, rate), opts))
            runs.append(await _attempt(pipeline, spec("latency", w, ls, lk, rate), opts))

    if "scale" in opts.modes:
        for sessions in opts.scale_sessions:
            scale_spec = spec("scale", opts.latency_w, sessions, opts.scale_inputs_per_session)
            runs.append(await _attempt(pipeline, scale_spec, opts))

    if opts.statements:
        w = opts.latency_w
        rate = latency_rate or opts.rate
        if rate is None:
            measured = _max_turn_rate(runs, w)
            rate = None if measured is None else max(round(measured / 2, 1), 1.0)
        ss, sk = (s, k) if rate is None else latency_shape(s, k, rate, opts.latency_duration_s)
        statements_spec = RunSpec(
            "statements", w, ss, sk, opts.concurrency, rate, log_statements=True
        )
        runs.append(await _attempt(pipeline, statements_spec, opts))

    profile_info: dict[str, Any] | None = None
    if opts.profile is not None:
        tool = profiling.available_profiler(opts.profile)
        suffix = "pyspy.raw.txt" if tool == "py-spy" else "pyinstrument.txt"
        path = opts.results_dir / f"profile-{stamp}-{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        profile_spec = RunSpec("profile", 1, s, k, opts.concurrency, None, tool, path)
        runs.append(await _attempt(pipeline, profile_spec, opts))
        summary = path.with_suffix(".summary.txt") if tool == "py-spy" else path
        profile_info = {"tool": tool, "report": str(summary), "raw": str(path)}

    attach_baseline_ratios(runs)
    options = asdict(opts)
    options["json_path"] = str(opts.json_path) if opts.json_path else None
    options["results_dir"] = str(opts.results_dir)
    options["database_url"] = _redact(opts.database_url)
    options["amqp_url"] = _redact(opts.amqp_url)
    return {
        "started_at": stamp,
        "elapsed_s": round(time.perf_counter() - began, 1),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "options": options,
        "runs": runs,
        "repeats": summarise_repeats(runs),
        "profile": profile_info,
    }


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _run_until_signalled(opts: BenchOptions) -> dict[str, Any]:
    """:func:`run_bench`, cancelled (so every run still cleans up) on SIGTERM too."""
    task = asyncio.create_task(run_bench(opts))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def run_sync(opts: BenchOptions) -> dict[str, Any]:
    """:func:`run_bench` on a fresh event loop (uvloop when installed, like the workers).

    SIGINT and SIGTERM cancel the runs; their cleanup (stop the processes, drop the
    database, delete the namespace) still happens.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run_until_signalled(opts))
    return uvloop.run(_run_until_signalled(opts))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from command-line arguments; 0 if every run completed."""
    opts = parse_options(argv)
    try:
        results = run_sync(opts)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\n[bench] interrupted; resources cleaned up", file=sys.stderr)
        return 130
    path = opts.json_path or opts.results_dir / f"{results['started_at']}.json"
    write_json(Path(path), results)
    print(render_table(results["runs"]))
    if results.get("repeats"):
        print(f"\n{render_repeats(results['repeats'])}")
    for run in results["runs"]:
        if run.get("mode") == "latency" and (run.get("stages_ms") or {}).get("count"):
            print(f"\nlatency by stage, ms, {run['kind']} W={run['workers']}:")
            print(render_stages(run["stages_ms"]))
        if run.get("mode") == "latency" and len(run.get("latency_windows") or []) > 1:
            print(f"\nlatency over the run, ms, {run['kind']} W={run['workers']}:")
            print(render_windows(run["latency_windows"]))
        if run.get("statements"):
            print(f"\nSQL statements per turn, {run['mode']} W={run['workers']}:")
            print(render_statements(run["statements"]))
    if results["profile"]:
        print(f"\nprofile: {results['profile']['report']}")
    print(f"\nresults: {path}", file=sys.stderr)
    return 1 if any("error" in r for r in results["runs"]) else 0
