"""Real ``lash-consumer run`` processes for end-to-end tests, always stopped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika

REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_env(
    database_url: str, amqp_url: str, namespace: str, **settings: object
) -> dict[str, str]:
    """A clean environment: only the ``LASH_*`` settings given here (plus fast defaults)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASH_")}
    values: dict[str, object] = {
        "database_url": database_url,
        "amqp_url": amqp_url,
        "namespace": namespace,
        "http_port": 0,
        "sweep_interval_ms": 300,
        "lease_ttl_ms": 3000,
        "log_format": "json",
        "shutdown_grace_s": 10,
        "db_pool_size": 3,
    }
    values.update(settings)
    env.update({f"LASH_{k.upper()}": str(v) for k, v in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.process.poll() is None:
            if loop.time() > deadline:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(
                    f"{self.name} did not stop within {timeout_s}s:\n{self.log()[-4000:]}"
                )
            await asyncio.sleep(0.05)
        return int(self.process.returncode)


@dataclass
class Fleet:
    database_url: str
    amqp_url: str
    namespace: str
    tmp: Path
    settings: dict[str, object] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def env(self, **overrides: object) -> dict[str, str]:
        return worker_env(
            self.database_url, self.amqp_url, self.namespace, **{**self.settings, **overrides}
        )

    async def start(self, **overrides: object) -> Worker:
        """Start one worker and wait until it consumes ``{ns}.ingress``."""
        name = f"w{len(self.workers) + 1}"
        log_path = self.tmp / f"{name}-{len(self.workers)}.log"
        before = await self.consumer_count()
        with log_path.open("wb") as out:
            process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [sys.executable, "-m", "consumer.cli", "run"],
                cwd=REPO_ROOT,
                env=self.env(owner_id=name, **overrides),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(name, process, log_path)
        self.workers.append(worker)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await self.consumer_count() <= before:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{worker.log()}")
            if loop.time() > deadline:
                raise AssertionError(f"{name} did not start consuming:\n{worker.log()[-4000:]}")
            await asyncio.sleep(0.1)
        return worker

    async def consumer_count(self) -> int:
        connection = await aio_pika.connect(self.amqp_url)
        try:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(f"{self.namespace}.ingress", passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return 0
            result = queue.declaration_result
            return int(result.consumer_count or 0)
        finally:
            await connection.close()

    async def stop_all(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await worker.stop(timeout_s=30)
        for worker in self.workers:
            if worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait(10)


@contextlib.asynccontextmanager
async def fleet(
    database_url: str, amqp_url: str, namespace: str, tmp: Path, **settings: object
) -> AsyncIterator[Fleet]:
    running = Fleet(database_url, amqp_url, namespace, tmp, dict(settings))
    try:
        yield running
    finally:
        await running.stop_all()
