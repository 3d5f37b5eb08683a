"""Benchmark options and their command-line form.

One dataclass carries every knob so the runner, the smoke test and the CLI wrapper all
drive the benchmark the same way; ``--quick`` only changes defaults the user did not set.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

MODES = ("throughput", "latency", "scale")
PROFILERS = ("py-spy", "pyinstrument")


@dataclass
class BenchOptions:
    """What to run and against which services."""

    workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    sessions: int = 200
    inputs_per_session: int = 5
    concurrency: int = 16
    modes: list[str] = field(default_factory=lambda: ["throughput", "latency"])
    # Throughput mode: baseline/pipeline pairs per W, alternating which runs first; the
    # table then adds each W's medians (a shared machine drifts between runs).
    repeat: int = 1
    # Latency mode: inputs per second; None = half the measured maximum turn rate.
    rate: float | None = None
    latency_workers: int | None = None
    latency_duration_s: float = 30.0
    scale_sessions: list[int] = field(default_factory=lambda: [1000, 10000])
    scale_inputs_per_session: int = 1
    baseline: bool = True
    profile: str | None = None
    statements: bool = False
    database_url: str = field(
        default_factory=lambda: os.environ.get("LASH_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    amqp_url: str = field(default_factory=lambda: os.environ.get("LASH_AMQP_URL", DEFAULT_AMQP_URL))
    namespace_prefix: str = "lashbench"
    json_path: Path | None = None
    results_dir: Path = RESULTS_DIR
    # Fail a run when no input commits for this long (a stuck fleet, not a slow one).
    stall_timeout_s: float = 60.0
    ready_timeout_s: float = 60.0
    # Seconds to measure the idle transaction rate before each run (0 = skip).
    idle_probe_s: float = 3.0
    worker_env: dict[str, str] = field(default_factory=dict)
    # Niceness of the processes under test (workers, baseline): above 0, the bench's
    # publisher and observer, stand-ins for producers and UIs on other machines, are not
    # starved by them on a machine they share.
    nice: int = 0
    progress: bool = True
    keep_logs: bool = False

    @property
    def latency_w(self) -> int:
        return self.latency_workers if self.latency_workers is not None else max(self.workers)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _modes(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if values == ["all"]:
        return list(MODES)
    if values == ["none"]:
        return []  # e.g. only --profile
    unknown = [v for v in values if v not in MODES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}, all or none; got {text!r}")
    return values


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lash-consumer bench",
        description=(
            "Benchmark the worker fleet against a raw aio-pika + PostgreSQL baseline on a "
            "fresh database and namespace."
        ),
    )
    add = parser.add_argument
    add("--workers", type=_int_list, help="worker counts to compare (default 1,2,4)")
    add("--sessions", type=int, help="sessions per run (default 200)")
    add("--inputs-per-session", type=int, help="inputs per session (default 5)")
    add("--concurrency", type=int, help="per-worker concurrency (default 16)")
    add(
        "--modes",
        type=_modes,
        help="comma list of throughput, latency, scale; all; none (default throughput,latency)",
    )
    add(
        "--repeat",
        type=int,
        help="throughput mode: interleaved baseline/pipeline pairs per W, with medians (default 1)",
    )
    add("--rate", type=float, help="latency mode: inputs/s (default: half the max turns/s)")
    add("--latency-workers", type=int, help="latency and scale modes: W (default max --workers)")
    add("--latency-duration", type=float, help="latency mode: seconds of publishing (default 30)")
    add("--scale-sessions", type=_int_list, help="scale mode session counts (default 1000,10000)")
    add("--scale-inputs-per-session", type=int, help="scale mode inputs per session (default 1)")
    add("--no-baseline", action="store_true", help="skip the raw baseline runs")
    add(
        "--profile",
        nargs="?",
        const="auto",
        choices=[*PROFILERS, "auto"],
        help="also profile one worker (W=1) with py-spy or pyinstrument",
    )
    add(
        "--statements",
        action="store_true",
        help="also count a run's SQL statements from the (local) PostgreSQL server log",
    )
    add("--database-url", help="PostgreSQL server (a fresh database is created on it)")
    add("--amqp-url", help="RabbitMQ broker (a fresh namespace is used on it)")
    add("--namespace-prefix", help="prefix of the fresh LASH_NAMESPACE (default lashbench)")
    add(
        "--json", dest="json_path", type=Path, help="results file (default bench/results/<ts>.json)"
    )
    add("--stall-timeout", type=float, help="fail a run after this long without progress (s)")
    add(
        "--idle-probe",
        type=float,
        help="seconds to measure idle DB tx/s per run (default 3; 0=off)",
    )
    add("--worker-env", type=_env_pair, action="append", default=[], metavar="NAME=VALUE")
    add(
        "--nice",
        type=int,
        help="run the workers and baseline at this niceness (default 0; e.g. 10 keeps the "
        "bench's publisher and observer from being starved by them)",
    )
    add("--no-progress", action="store_true", help="no progress line on stderr")
    add("--keep-logs", action="store_true", help="keep worker logs even when runs succeed")
    add("--quick", action="store_true", help="small, fast defaults (W=1,2; 20 sessions x 3)")
    return parser


def parse_options(argv: list[str] | None = None) -> BenchOptions:
    args = build_parser().parse_args(argv)
    opts = BenchOptions()
    if args.quick:
        opts.workers = [1, 2]
        opts.sessions = 20
        opts.inputs_per_session = 3
        opts.scale_sessions = [200]
        opts.latency_duration_s = 10.0
        opts.stall_timeout_s = 30.0
    explicit = {
        "workers": args.workers,
        "sessions": args.sessions,
        "inputs_per_session": args.inputs_per_session,
        "concurrency": args.concurrency,
        "modes": args.modes,
        "repeat": args.repeat,
        "rate": args.rate,
        "latency_workers": args.latency_workers,
        "latency_duration_s": args.latency_duration,
        "scale_sessions": args.scale_sessions,
        "scale_inputs_per_session": args.scale_inputs_per_session,
        "database_url": args.database_url,
        "amqp_url": args.amqp_url,
        "namespace_prefix": args.namespace_prefix,
        "json_path": args.json_path,
        "stall_timeout_s": args.stall_timeout,
        "idle_probe_s": args.idle_probe,
        "nice": args.nice,
    }
    for name, value in explicit.items():
        if value is not None:
            setattr(opts, name, value)
    if args.profile is not None:
        opts.profile = args.profile
    opts.baseline = not args.no_baseline
    opts.statements = args.statements
    opts.progress = not args.no_progress
    opts.keep_logs = args.keep_logs
    opts.worker_env = dict(args.worker_env)
    for name in (
        "sessions",
        "inputs_per_session",
        "concurrency",
        "scale_inputs_per_session",
        "repeat",
    ):
        if getattr(opts, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    return opts
