"""A one-line progress display on stderr while a run is in flight.

On a terminal the line is rewritten in place; otherwise (CI logs, pipes) a plain line is
printed every few seconds so logs stay readable.
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench.tracker import CommitTracker


def _line(label: str, tracker: CommitTracker, started: float) -> str:
    total = len(tracker.expected)
    committed = len(tracker.committed_at)
    elapsed = max(time.perf_counter() - started, 1e-9)
    width = 24
    filled = int(width * committed / total) if total else 0
    bar = "#" * filled + "." * (width - filled)
    return (
        f"{label} [{bar}] published {len(tracker.published_at)}/{total} "
        f"committed {committed}/{total} turns {len(tracker.turns)} "
        f"{committed / elapsed:7.1f} in/s {elapsed:6.1f}s"
    )


async def show_progress(label: str, tracker: CommitTracker, enabled: bool = True) -> None:
    """Redraw until cancelled; the final state is printed when cancelled."""
    if not enabled:
        return
    tty = sys.stderr.isatty()
    interval = 0.25 if tty else 5.0
    started = time.perf_counter()
    try:
        while True:
            await asyncio.sleep(interval)
            text = _line(label, tracker, started)
            sys.stderr.write(f"\r{text}\x1b[K" if tty else text + "\n")
            sys.stderr.flush()
    except asyncio.CancelledError:
        text = _line(label, tracker, started)
        sys.stderr.write(f"\r{text}\x1b[K\n" if tty else text + "\n")
        sys.stderr.flush()
        raise
