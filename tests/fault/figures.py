"""Figures of the fault and soak runs: collected per test, printed in the terminal summary
(independent of ``-s``) and written to ``.fault-figures.json`` in the repository root so the
latest numbers can go into the README."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
FIGURES_PATH = REPO_ROOT / ".fault-figures.json"

FIGURES: dict[str, dict[str, Any]] = {}


def record(name: str, figures: dict[str, Any]) -> None:
    FIGURES[name] = dict(figures)


def totals(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def total(key: str) -> int:
        return int(sum(int(f.get(key, 0) or 0) for f in figures.values()))

    takeovers = [f["worst_takeover_s"] for f in figures.values() if f.get("worst_takeover_s")]
    observed = [
        f["worst_observed_takeover_s"]
        for f in figures.values()
        if f.get("worst_observed_takeover_s")
    ]
    return {
        "tests": len(figures),
        "faults_injected": total("faults_injected"),
        "inputs": total("inputs"),
        "turns_committed": total("turns_committed"),
        "turns_superseded": total("turns_superseded"),
        "lost": total("lost"),
        "duplicated": total("duplicated"),
        "overlapping_turns": total("overlapping_turns"),
        "observed_holes": total("observed_holes"),
        "observed_duplicates": total("observed_duplicates"),
        "dead_lettered": total("dead_lettered"),
        "worst_takeover_s": round(max(takeovers), 3) if takeovers else None,
        "worst_observed_takeover_s": round(max(observed), 3) if observed else None,
    }


def write(figures: dict[str, dict[str, Any]] | None = None, path: Path = FIGURES_PATH) -> Path:
    """Merge ``figures`` into the file (other runs' entries are kept, ours replaced)."""
    figures = FIGURES if figures is None else figures
    existing: dict[str, Any] = {}
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError):
        existing = {}
    runs = dict(existing.get("runs", {}))
    runs.update(figures)
    doc = {
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "totals": totals(runs),
        "runs": runs,
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def summary_lines(figures: dict[str, dict[str, Any]] | None = None) -> list[str]:
    figures = FIGURES if figures is None else figures
    if not figures:
        return []
    lines = []
    for name, f in sorted(figures.items()):
        lines.append(
            f"{name}: faults={f.get('faults_injected', 0)} inputs={f.get('inputs', 0)} "
            f"turns={f.get('turns_committed', 0)} superseded={f.get('turns_superseded', 0)} "
            f"lost={f.get('lost', 0)} duplicated={f.get('duplicated', 0)} "
            f"holes={f.get('observed_holes', 0)} dup_events={f.get('observed_duplicates', 0)}"
            + (f" worst_takeover={f['worst_takeover_s']:.2f}s" if f.get("worst_takeover_s") else "")
        )
    t = totals(figures)
    lines.append("TOTAL: " + " ".join(f"{k}={v}" for k, v in t.items() if v is not None))
    return lines
