"""Worker processes under test: start with an environment, sample memory, stop cleanly.

Both the real workers and the baseline consumers run as separate processes, so neither
shares the benchmark's event loop and both are measured the same way (RSS from
``/proc/<pid>/status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def memory_kib(pid: int) -> tuple[int, int] | None:
    """``(VmRSS, VmHWM)`` of a live process in KiB: resident now and its peak."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


def _cpu_ticks(stat: Path, *, children: bool) -> int:
    """utime + stime (fields 14 and 15 of ``/proc/<pid>/stat``), with ``children`` also
    cutime + cstime (16 and 17: exited children's). Raises ``OSError`` if it is gone."""
    text = stat.read_text()
    fields = text[text.rfind(")") + 2 :].split()  # after the parenthesised command name
    return sum(int(f) for f in fields[11 : 15 if children else 13])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a live process has used (``/proc/<pid>/stat``)."""
    try:
        return _cpu_ticks(Path(f"/proc/{pid}/stat"), children=False) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


_SERVICES = {"postgres": "postgres", "beam.smp": "rabbitmq"}
"""Process names (``/proc/<pid>/comm``) of the local services -> the name reported."""


def busy_and_steal_ticks(cpu_line: str) -> tuple[int, int]:
    """Busy and stolen clock ticks from ``/proc/stat``'s aggregate ``cpu`` line.

    Its fields are user nice system idle iowait irq softirq steal (guest time is already
    inside user): busy is all of them but idle, iowait and steal.
    """
    values = [int(v) for v in cpu_line.split()[1:9]]
    values += [0] * (8 - len(values))  # old kernels print fewer fields
    return sum(values) - values[3] - values[4] - values[7], values[7]


def machine_cpu_seconds() -> dict[str, float]:
    """CPU time used so far by the whole machine (``host``: busy time of every core, from
    ``/proc/stat``) and by the local PostgreSQL and RabbitMQ servers.

    A service's figure sums user and system time of its processes and of their exited
    children (``cutime``/``cstime``): a PostgreSQL backend that exits is reaped by the
    postmaster, so the difference of two readings counts backends that came and went in
    between. On a machine where everything shares the cores, the host figure per input is
    what bounds throughput; it includes the benchmark's own producer and observer.

    ``steal`` is time the hypervisor ran someone else while this machine's cores wanted
    to run: not work of ours, so ``host`` leaves it out, and it is reported on its own
    (on a shared virtual machine it is what makes one run slower than the next)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"host": 0.0, "steal": 0.0, **{name: 0.0 for name in _SERVICES.values()}}
    with contextlib.suppress(OSError):
        busy, steal = busy_and_steal_ticks(Path("/proc/stat").read_text().splitlines()[0])
        out["host"] = busy / tick
        out["steal"] = steal / tick
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            service = _SERVICES.get((entry / "comm").read_text().strip())
            if service is None:
                continue
            out[service] += _cpu_ticks(entry / "stat", children=True) / tick
        except OSError:
            continue
    return out


def process_env(extra: dict[str, str]) -> dict[str, str]:
    """The current environment plus ``extra``, with the repository importable.

    The project may not be pip-installed; putting the repository root on ``PYTHONPATH``
    lets ``python -m consumer.cli`` and ``python -m bench.baseline_worker`` import either way.
    """
    env = dict(os.environ)
    env.update(extra)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class Managed:
    """One started process and where its output goes."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    rss_end_kib: int | None = None
    rss_peak_kib: int | None = None
    cpu_mark_s: float | None = None
    cpu_used_s: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sample_memory(self) -> None:
        mem = memory_kib(self.pid)
        if mem is None:
            return
        rss, hwm = mem
        self.rss_end_kib = rss
        self.rss_peak_kib = max(self.rss_peak_kib or 0, hwm, rss)

    def mark_cpu(self) -> None:
        """Start counting CPU time from now (excludes start-up)."""
        self.cpu_mark_s = cpu_seconds(self.pid)

    def read_cpu(self) -> None:
        """CPU time used since :meth:`mark_cpu`."""
        now = cpu_seconds(self.pid)
        if now is not None and self.cpu_mark_s is not None:
            self.cpu_used_s = now - self.cpu_mark_s

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Fleet:
    """A group of processes started together and stopped together."""

    members: list[Managed] = field(default_factory=list)

    async def start(
        self, name: str, argv: list[str], env: dict[str, str], log_dir: Path
    ) -> Managed:
        log_path = log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=str(REPO_ROOT),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        member = Managed(name=name, proc=proc, log_path=log_path)
        self.members.append(member)
        return member

    def dead(self) -> list[Managed]:
        return [m for m in self.members if m.proc.returncode is not None]

    def sample_memory(self) -> None:
        for member in self.members:
            member.sample_memory()

    async def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every member, wait for a clean exit, SIGKILL what is left."""
        for member in self.members:
            if member.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    member.proc.send_signal(signal.SIGTERM)
        waits = [asyncio.wait_for(m.proc.wait(), timeout_s) for m in self.members]
        results = await asyncio.gather(*waits, return_exceptions=True)
        for member, result in zip(self.members, results, strict=True):
            if isinstance(result, BaseException):
                with contextlib.suppress(ProcessLookupError):
                    member.proc.kill()
                await member.proc.wait()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
