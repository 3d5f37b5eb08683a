"""Real worker processes for fault tests: start, signal, kill, and always clean up.

Each worker is ``python -m consumer.cli run`` in its own process group (so ``kill -9`` of
the group takes every child with it and a test never leaks a process), configured only by
``LASH_*`` environment variables like a deployed worker. Every start gets a fresh
``LASH_OWNER_ID`` so lease rows name the exact process incarnation that held them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class WorkerConfig:
    """The ``LASH_*`` settings shared by every worker of one fleet."""

    database_url: str
    amqp_url: str
    namespace: str
    echo_delay_ms: int = 300
    lease_ttl_ms: int = 2500
    sweep_interval_ms: int = 500
    concurrency: int = 8
    shutdown_grace_s: float = 8.0
    max_deliveries: int = 5
    max_message_bytes: int | None = None
    # Small pools: the PostgreSQL server (max_connections) is shared with other test runs.
    db_pool_size: int = 3
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, owner_id: str, http_port: int) -> dict[str, str]:
        env = dict(os.environ)
        for key in list(env):
            if key.startswith("LASH_"):
                del env[key]
        env.update(
            {
                "LASH_DATABASE_URL": self.database_url,
                "LASH_AMQP_URL": self.amqp_url,
                "LASH_NAMESPACE": self.namespace,
                "LASH_PROVIDER": "echo",
                "LASH_ECHO_DELAY_MS": str(self.echo_delay_ms),
                "LASH_LEASE_TTL_MS": str(self.lease_ttl_ms),
                "LASH_SWEEP_INTERVAL_MS": str(self.sweep_interval_ms),
                "LASH_CONCURRENCY": str(self.concurrency),
                "LASH_SHUTDOWN_GRACE_S": str(self.shutdown_grace_s),
                "LASH_MAX_DELIVERIES": str(self.max_deliveries),
                "LASH_HTTP_PORT": str(http_port),
                "LASH_OWNER_ID": owner_id,
                "LASH_DB_POOL_SIZE": str(self.db_pool_size),
                "LASH_LOG_FORMAT": "json",
                "LASH_LOG_LEVEL": os.environ.get("LASH_FAULT_LOG_LEVEL", "info"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.max_message_bytes is not None:
            env["LASH_MAX_MESSAGE_BYTES"] = str(self.max_message_bytes)
        env.update(self.extra_env)
        return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    """One worker process (its own process group) and its log file."""

    def __init__(self, config: WorkerConfig, owner_id: str, log_dir: Path) -> None:
        self.config = config
        self.owner_id = owner_id
        self.http_port = free_port()
        self.log_path = log_dir / f"{owner_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.signalled: list[tuple[float, int]] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consumer.cli", "run"],
                cwd=REPO_ROOT,
                env=self.config.env(self.owner_id, self.http_port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        """Signal the whole process group (a no-op once it is gone)."""
        if self.proc is None:
            return
        self.signalled.append((time.time(), sig))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code, or ``None`` if the process is still running at the deadline."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.returncode
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        return self.returncode

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Poll ``/readyz`` until the worker says it is ready (database and broker up)."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        last = "no answer"
        async with httpx.AsyncClient(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise WorkerDied(self, f"exited with {self.returncode} before ready")
                try:
                    resp = await client.get(url)
                    if resp.status_code == 200:
                        return
                    last = f"{resp.status_code} {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                await asyncio.sleep(0.1)
        raise WorkerDied(self, f"not ready after {timeout_s}s ({last})")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class WorkerDied(AssertionError):
    def __init__(self, worker: WorkerProcess, what: str) -> None:
        super().__init__(f"worker {worker.owner_id} {what}\n--- log tail ---\n{worker.log_tail()}")


class Fleet:
    """The workers of one test. ``close()`` kills every process group ever started."""

    def __init__(self, config: WorkerConfig, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []
        self._seq = 0

    def spawn(self) -> WorkerProcess:
        self._seq += 1
        worker = WorkerProcess(self.config, f"{self.config.namespace}-w{self._seq}", self.log_dir)
        worker.start()
        self.workers.append(worker)
        return worker

    async def start(self, count: int, timeout_s: float = 45.0) -> list[WorkerProcess]:
        started = [self.spawn() for _ in range(count)]
        await asyncio.gather(*(w.wait_ready(timeout_s) for w in started))
        return started

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive()]

    def alive_pids(self) -> set[int]:
        return {w.pid for w in self.alive()}

    def alive_owner_ids(self) -> set[str]:
        return {w.owner_id for w in self.alive()}

    def by_owner(self, owner_id: str) -> WorkerProcess | None:
        return next((w for w in self.workers if w.owner_id == owner_id), None)

    async def stop_all(self, timeout_s: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every live worker and wait; returns exit codes by owner id."""
        live = self.alive()
        for w in live:
            w.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(w.wait_exit(timeout_s) for w in live))
        return {w.owner_id: c for w, c in zip(live, codes, strict=True)}

    def close(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.kill9()
        for w in self.workers:
            if w.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=10)

    def logs(self, lines: int = 30) -> str:
        return "\n".join(
            f"===== {w.owner_id} (pid {w.proc.pid if w.proc else '-'}, rc {w.returncode})\n"
            f"{w.log_tail(lines)}"
            for w in self.workers
        )
