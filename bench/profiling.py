"""Profiling one worker during a benchmark run.

``py-spy`` attaches to the running worker after it is ready (startup is excluded) and
samples it without pausing it; its collapsed stacks are saved together with a short
summary: the functions and the libraries where the worker spends its CPU time.
``pyinstrument`` instead wraps the worker's command line and writes its own text report
when the worker exits (so it includes startup).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

# Leaf-frame file path fragments -> the library they belong to, first match wins.
_LIBRARIES: tuple[tuple[str, str], ...] = (
    ("sqlalchemy", "sqlalchemy"),
    ("psycopg_pool", "psycopg"),
    ("psycopg", "psycopg"),
    ("aio_pika", "aio-pika/aiormq/pamqp"),
    ("aiormq", "aio-pika/aiormq/pamqp"),
    ("pamqp", "aio-pika/aiormq/pamqp"),
    ("pydantic", "pydantic"),
    ("structlog", "structlog/logging"),
    ("logging", "structlog/logging"),
    ("prometheus_client", "prometheus"),
    ("opentelemetry", "opentelemetry"),
    ("json", "json"),
    ("uvloop", "event loop"),
    ("asyncio", "event loop"),
    ("selectors", "event loop"),
    ("ssl", "ssl/socket"),
    ("socket", "ssl/socket"),
    ("lash_core", "lash_core"),
    ("consumer", "consumer"),
)


def available_profiler(requested: str) -> str:
    """The profiler to use: the requested one, or for ``auto`` py-spy if installed."""
    if requested == "auto":
        return "py-spy" if py_spy_path() is not None else "pyinstrument"
    return requested


def py_spy_path() -> str | None:
    found = shutil.which("py-spy")
    if found is not None:
        return found
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else None


def pyinstrument_command(argv: list[str], out_path: Path) -> list[str]:
    """Wrap ``python -m module args`` so pyinstrument runs it and saves a text report."""
    if len(argv) < 3 or argv[1] != "-m":
        raise ValueError(f"expected a 'python -m module' command, got {argv!r}")
    return [argv[0], "-m", "pyinstrument", "-r", "text", "-o", str(out_path), *argv[1:]]


class PySpy:
    """``py-spy record`` attached to one pid, stopped with SIGINT to write its output."""

    def __init__(self, pid: int, raw_path: Path, rate: int = 200) -> None:
        self.pid = pid
        self.raw_path = raw_path
        self.rate = rate
        self._proc: asyncio.subprocess.Process | None = None
        self._log_path = raw_path.with_suffix(".log")

    async def start(self) -> None:
        tool = py_spy_path()
        if tool is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        with self._log_path.open("wb") as log:
            self._proc = await asyncio.create_subprocess_exec(
                tool,
                "record",
                "--pid",
                str(self.pid),
                "--format",
                "raw",
                "--function",
                "--nonblocking",
                "--rate",
                str(self.rate),
                "--output",
                str(self.raw_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self._proc.wait(), 30)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None


def _frame_file(frame: str) -> str:
    """``function (path/file.py:line)`` -> ``path/file.py``."""
    start = frame.rfind("(")
    return frame[start + 1 : frame.rfind(":")] if start >= 0 else frame


def library_of(frame: str) -> str:
    path = _frame_file(frame)
    for fragment, library in _LIBRARIES:
        if fragment in path:
            return library
    return "other"


def is_project_frame(frame: str) -> bool:
    """A frame of the project's own code (the CLI's entry frames excluded)."""
    path = _frame_file(frame)
    return ("lash_core/" in path or "consumer/" in path) and "consumer/cli.py" not in path


def summarize_collapsed(text: str, top: int = 25) -> str:
    """A readable summary of py-spy ``raw`` (collapsed ``a;b;c count``) output.

    Self time is the leaf frame's share of samples (where the CPU actually was). "Caused
    by" charges each sample to the deepest frame of the project's own code on its stack,
    i.e. which of our functions the library time is spent for; stacks without one (the
    greenlets SQLAlchemy's async layer runs statements in) are grouped as such. Inclusive
    time counts a project function once per sample it appears in.
    """
    self_time: Counter[str] = Counter()
    caused_by: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_library: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        self_time[leaf] += count
        by_library[library_of(leaf)] += count
        ours = [f for f in frames if is_project_frame(f)]
        caused_by[ours[-1] if ours else f"(no project frame: {library_of(frames[0])})"] += count
        for frame in set(ours):
            inclusive[frame] += count
    if total == 0:
        return "no samples (was the worker busy while profiled?)\n"

    def table(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"{title}", "-" * len(title)]
        rows += [f"{100.0 * n / total:6.1f}%  {name}" for name, n in counter.most_common(top)]
        return [*rows, ""]

    lines = [f"{total} samples (active CPU only, idle excluded)", ""]
    lines += table("by library (leaf frame)", by_library)
    lines += table("self time (leaf function)", self_time)
    lines += table("caused by (deepest project frame)", caused_by)
    lines += table("inclusive time (project functions)", inclusive)
    return "\n".join(lines)
