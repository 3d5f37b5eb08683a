"""Turning run records into the comparison table and the JSON results file."""

from __future__ import annotations

import json
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


def attach_baseline_ratios(runs: list[dict[str, Any]]) -> None:
    """Give each pipeline run its ratio to the baseline run of the same mode, W and load."""
    baselines = {
        (r["mode"], r["workers"], r["sessions"], r["inputs_per_session"]): r
        for r in runs
        if r.get("kind") == "baseline" and "error" not in r
    }
    for run in runs:
        if run.get("kind") != "pipeline" or "error" in run:
            continue
        base = baselines.get(
            (run["mode"], run["workers"], run["sessions"], run["inputs_per_session"])
        )
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
        f"{_mib(rss['end_max'])}/{_mib(rss['peak_max'])}",
    ]


def render_table(runs: list[dict[str, Any]]) -> str:
    """A plain-text table, one row per run.

    ``tx/turn (net)``: committed database transactions per turn, all / without the idle
    background rate measured before the run. ``cpu ms/turn``: CPU time of the processes
    under test (not the broker or the database) per turn. RSS: the largest worker at the
    end / its peak.
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


def render_statements(report: dict[str, Any], top: int = 12) -> str:
    """The most frequent SQL statements of a ``--statements`` run, per turn."""
    lines = [f"{_fmt(report.get('per_turn'), 1):>8}  all statements ({report.get('total')})"]
    for row in report.get("top", [])[:top]:
        lines.append(f"{_fmt(row['per_turn'], 2):>8}  {row['statement'][:100]}")
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path
