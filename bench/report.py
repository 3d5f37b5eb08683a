"""Turning run records into the comparison table and the JSON results file."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mib(kib: int | None) -> str:
    return "-" if not kib else f"{kib / 1024:.0f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}%"


def _load(run: dict[str, Any]) -> tuple[str, int, int, int]:
    """What makes two runs comparable: mode, W and the workload's shape."""
    return (run["mode"], run["workers"], run["sessions"], run["inputs_per_session"])


def attach_baseline_ratios(runs: list[dict[str, Any]]) -> None:
    """Give each pipeline run its ratio to the baseline run of the same mode, W and load,
    and with ``--repeat`` of the same pair (the baseline measured beside it)."""
    baselines = {
        (*_load(r), r.get("repeat", 0)): r
        for r in runs
        if r.get("kind") == "baseline" and "error" not in r
    }
    for run in runs:
        if run.get("kind") != "pipeline" or "error" in run:
            continue
        base = baselines.get((*_load(run), run.get("repeat", 0)))
        if base is None:
            run["vs_baseline"] = None
            continue
        p99 = run["latency_ms"].get("p99")
        base_p99 = base["latency_ms"].get("p99")
        run["vs_baseline"] = {
            "inputs_per_s": _safe_ratio(run["inputs_per_s"], base["inputs_per_s"]),
            "turns_per_s_vs_messages_per_s": _safe_ratio(run["turns_per_s"], base["inputs_per_s"]),
            "p99_latency": _safe_ratio(p99, base_p99),
        }


def _safe_ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


HEADERS = (
    "mode",
    "system",
    "W",
    "S x K",
    "inputs",
    "turns",
    "turns/s",
    "inputs/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "x base",
    "tx/turn (net)",
    "amqp/turn",
    "cpu ms/turn",
    "host/pg/mq ms/input",
    "steal",
    "RSS MiB",
)


def _row(run: dict[str, Any]) -> list[str]:
    mode = run["mode"]
    if run.get("rate_target"):
        mode = f"{mode}@{run['rate_target']:.0f}/s"
    head = [
        mode,
        run["kind"],
        str(run["workers"]),
        f"{run['sessions']}x{run['inputs_per_session']}",
    ]
    if "error" in run:
        return [*head, "FAILED"]
    lat = run["latency_ms"]
    ratio = (run.get("vs_baseline") or {}).get("inputs_per_s")
    rss = run["rss_kib"]
    return [
        *head,
        f"{run['inputs_committed']}/{run['inputs_published']}",
        str(run["turns"]),
        _fmt(run["turns_per_s"]),
        _fmt(run["inputs_per_s"]),
        _fmt(lat.get("p50")),
        _fmt(lat.get("p95")),
        _fmt(lat.get("p99")),
        _fmt(ratio, 3),
        _fmt(run["db"]["tx_per_turn"], 1) + "/" + _fmt(run["db"].get("tx_per_turn_excl_idle"), 1),
        _fmt(run["amqp"]["per_turn"], 2),
        _fmt(run.get("cpu", {}).get("ms_per_turn"), 2),
        "/".join(
            _fmt(run.get("cpu", {}).get(f"{part}_ms_per_input"), 2)
            for part in ("host", "postgres", "rabbitmq")
        ),
        _percent(run.get("cpu", {}).get("steal_share")),
        f"{_mib(rss['end_max'])}/{_mib(rss['peak_max'])}",
    ]


def render_table(runs: list[dict[str, Any]]) -> str:
    """A plain-text table, one row per run.

    ``tx/turn (net)``: committed database transactions per turn, all / without the idle
    background rate measured before the run. ``cpu ms/turn``: CPU time of the processes
    under test (not the broker or the database) per turn. ``host/pg/mq ms/input``: CPU
    time per committed input of the whole machine (every process, the benchmark's own
    included), of the PostgreSQL server and of the RabbitMQ server, over the measured
    window (without steal). ``steal``: the share of the window's core time the
    hypervisor gave to other machines. RSS: the largest worker at the end / its peak.
    """
    rows = [list(HEADERS), *(_row(r) for r in runs)]
    width = max(len(r) for r in rows)
    widths = [max((len(r[i]) for r in rows if i < len(r)), default=0) for i in range(width)]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i >= 2 else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    failures = [r for r in runs if "error" in r]
    for run in failures:
        first = run["error"].strip().splitlines()[0] if run["error"].strip() else "?"
        lines.append(f"FAILED {run['mode']}/{run['kind']} W={run['workers']}: {first[:200]}")
    return "\n".join(lines)


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def summarise_repeats(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode, W and load measured more than once (``--repeat``): the median, least and
    greatest of each figure over the completed runs, and of the per-pair ratios."""
    groups: dict[tuple[str, int, int, int], list[dict[str, Any]]] = {}
    for run in runs:
        if "error" not in run and "repeat" in run:
            groups.setdefault(_load(run), []).append(run)
    out: list[dict[str, Any]] = []
    for (mode, workers, sessions, k), group in groups.items():
        pipeline = [r for r in group if r["kind"] == "pipeline"]
        baseline = [r for r in group if r["kind"] == "baseline"]
        if max(len(pipeline), len(baseline)) < 2:
            continue

        def figures(rs: list[dict[str, Any]], get: Callable[[dict[str, Any]], Any]) -> list[float]:
            return [float(v) for v in (get(r) for r in rs) if v is not None]

        out.append(
            {
                "mode": mode,
                "workers": workers,
                "sessions": sessions,
                "inputs_per_session": k,
                "pipeline_runs": len(pipeline),
                "baseline_runs": len(baseline),
                "pipeline_inputs_per_s": _spread(figures(pipeline, lambda r: r["inputs_per_s"])),
                "pipeline_turns_per_s": _spread(figures(pipeline, lambda r: r["turns_per_s"])),
                "baseline_inputs_per_s": _spread(figures(baseline, lambda r: r["inputs_per_s"])),
                "ratio": _spread(
                    figures(pipeline, lambda r: (r.get("vs_baseline") or {}).get("inputs_per_s"))
                ),
                "pipeline_cpu_ms_per_turn": _spread(
                    figures(pipeline, lambda r: r.get("cpu", {}).get("ms_per_turn"))
                ),
                "pipeline_host_ms_per_input": _spread(
                    figures(pipeline, lambda r: r.get("cpu", {}).get("host_ms_per_input"))
                ),
                "baseline_host_ms_per_input": _spread(
                    figures(baseline, lambda r: r.get("cpu", {}).get("host_ms_per_input"))
                ),
                "pipeline_p99_ms": _spread(figures(pipeline, lambda r: r["latency_ms"].get("p99"))),
            }
        )
    return out


def render_repeats(summaries: list[dict[str, Any]]) -> str:
    """One line per repeated W: medians, with the least and greatest in brackets."""

    def cell(spread: dict[str, float] | None, digits: int = 1) -> str:
        if spread is None:
            return "-"
        return (
            f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}-{spread['max']:.{digits}f}]"
        )

    lines = ["medians over repeated runs [least-greatest]:"]
    for s in summaries:
        lines.append(
            f"  {s['mode']} W={s['workers']} {s['sessions']}x{s['inputs_per_session']}: "
            f"x base {cell(s['ratio'], 3)} over {s['pipeline_runs']} runs; "
            f"pipeline inputs/s {cell(s['pipeline_inputs_per_s'])}; "
            f"baseline msg/s {cell(s['baseline_inputs_per_s'])}; "
            f"cpu ms/turn {cell(s['pipeline_cpu_ms_per_turn'], 2)}; "
            f"host cpu ms/input {cell(s.get('pipeline_host_ms_per_input'), 2)} "
            f"(baseline {cell(s.get('baseline_host_ms_per_input'), 2)})"
        )
    return "\n".join(lines)


def render_statements(report: dict[str, Any], top: int = 12) -> str:
    """The most frequent SQL statements of a ``--statements`` run, per turn."""
    lines = [f"{_fmt(report.get('per_turn'), 1):>8}  all statements ({report.get('total')})"]
    for row in report.get("top", [])[:top]:
        lines.append(f"{_fmt(row['per_turn'], 2):>8}  {row['statement'][:100]}")
    return "\n".join(lines)


def render_stages(report: dict[str, Any]) -> str:
    """Where latency went (bench/stages.py): stage p50/p95/p99, and the slowest inputs."""
    slowest = report["slowest"]
    lines = [
        f"{'stage':<8} {'p50':>8} {'p95':>8} {'p99':>8}   "
        f"slowest {slowest['count']} (>= {_fmt(slowest['total_ms_min'])} ms), mean"
    ]
    for stage, row in report["stages"].items():
        lines.append(
            f"{stage:<8} {_fmt(row['p50']):>8} {_fmt(row['p95']):>8} {_fmt(row['p99']):>8}   "
            f"{_fmt(slowest['mean_ms'][stage]):>8}"
        )
    return "\n".join(lines)


def render_windows(windows: list[dict[str, Any]]) -> str:
    """A paced run's latency by publish time (``CommitTracker.latency_windows``)."""
    lines = [f"{'from s':>7} {'inputs':>7} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}"]
    for row in windows:
        lines.append(
            f"{_fmt(row['start_s']):>7} {row['count']:>7} {_fmt(row['p50']):>8} "
            f"{_fmt(row['p95']):>8} {_fmt(row['p99']):>8} {_fmt(row['max']):>8}"
        )
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path
