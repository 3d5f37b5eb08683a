"""The two systems under test, behind one interface so one harness measures both.

A target says how to prepare its resources, how to start its i-th process, where the
benchmark publishes, which queue shows it is ready, and how to read its commit events.
"""

from __future__ import annotations

from typing import Any, Protocol

import psycopg
from aio_pika.abc import AbstractConnection

from bench import baseline_worker
from bench.procs import process_env, python_module
from bench.tracker import CommitTracker
from bench.workload import SUBMIT_TYPE
from consumer.settings import default_prefetch

WORKER_MODULE = "consumer.cli"


class Target(Protocol):
    kind: str

    async def prepare(
        self, database_url: str, namespace: str, connection: AbstractConnection
    ) -> None:
        """Create what the processes expect to exist before they start."""

    def command(
        self, database_url: str, amqp_url: str, namespace: str, index: int, concurrency: int
    ) -> tuple[list[str], dict[str, str]]:
        """argv and environment of the ``index``-th process."""

    def ingress_exchange(self, namespace: str) -> str: ...

    def ready_queue(self, namespace: str) -> str: ...

    def observations_exchange(self, namespace: str) -> str: ...

    def known_names(self, namespace: str) -> list[str]:
        """Queues and exchanges to delete after the run."""

    def handle_event(self, tracker: CommitTracker, body: dict[str, Any], at: float) -> None: ...


class PipelineTarget:
    """Real ``lash-consumer run`` workers with the echo model at zero delay."""

    kind = "pipeline"

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.extra_env = dict(extra_env or {})

    async def prepare(
        self, database_url: str, namespace: str, connection: AbstractConnection
    ) -> None:
        # Workers create the schema and declare the topology themselves (CONTRACT.md).
        return None

    def command(
        self, database_url: str, amqp_url: str, namespace: str, index: int, concurrency: int
    ) -> tuple[list[str], dict[str, str]]:
        env = {
            "LASH_DATABASE_URL": database_url,
            "LASH_AMQP_URL": amqp_url,
            "LASH_NAMESPACE": namespace,
            "LASH_PROVIDER": "echo",
            "LASH_ECHO_DELAY_MS": "0",
            "LASH_CONCURRENCY": str(concurrency),
            "LASH_HTTP_PORT": "0",
            "LASH_OWNER_ID": f"{namespace}-w{index}",
            "LASH_LOG_FORMAT": "json",
            **self.extra_env,
        }
        return python_module(WORKER_MODULE, "run"), process_env(env)

    def ingress_exchange(self, namespace: str) -> str:
        return f"{namespace}.ingress"

    def ready_queue(self, namespace: str) -> str:
        return f"{namespace}.ingress"

    def observations_exchange(self, namespace: str) -> str:
        return f"{namespace}.observations"

    def known_names(self, namespace: str) -> list[str]:
        return [f"{namespace}.ingress", f"{namespace}.dead-letter", f"{namespace}.observations"]

    def handle_event(self, tracker: CommitTracker, body: dict[str, Any], at: float) -> None:
        event_type = body.get("type")
        session_id = str(body.get("session_id"))
        if event_type == "input.admitted":
            record = body.get("input") or {}
            if isinstance(record, dict) and record.get("input_id") is not None:
                source_key = record.get("source_key")
                tracker.admitted(
                    session_id,
                    None if source_key is None else str(source_key),
                    str(record["input_id"]),
                )
        elif event_type == "turn.committed":
            outcome = body.get("outcome") or {}
            kind = str(outcome.get("kind", "?"))
            detail = outcome.get("stop") or (outcome.get("finish") or {}).get("kind") or "?"
            input_ids = [str(i) for i in body.get("input_ids") or []]
            tracker.committed(
                f"{session_id}:{body.get('turn_id')}", input_ids, f"{kind}/{detail}", at
            )


class BaselineTarget:
    """:mod:`bench.baseline_worker` processes: one commit per message, then ack."""

    kind = "baseline"

    async def prepare(
        self, database_url: str, namespace: str, connection: AbstractConnection
    ) -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(baseline_worker.CREATE_TABLE)
        channel = await connection.channel()
        try:
            await baseline_worker.declare_topology(channel, namespace)
        finally:
            await channel.close()

    def command(
        self, database_url: str, amqp_url: str, namespace: str, index: int, concurrency: int
    ) -> tuple[list[str], dict[str, str]]:
        env = {
            "BENCH_DATABASE_URL": database_url,
            "BENCH_AMQP_URL": amqp_url,
            "BENCH_NAMESPACE": namespace,
            "BENCH_CONCURRENCY": str(concurrency),
            # The prefetch a worker of this concurrency uses: the same messages in flight.
            "BENCH_PREFETCH": str(default_prefetch(concurrency)),
        }
        return python_module("bench.baseline_worker"), process_env(env)

    def ingress_exchange(self, namespace: str) -> str:
        return baseline_worker.ingress_name(namespace)

    def ready_queue(self, namespace: str) -> str:
        return baseline_worker.ingress_name(namespace)

    def observations_exchange(self, namespace: str) -> str:
        return baseline_worker.observations_name(namespace)

    def known_names(self, namespace: str) -> list[str]:
        return [
            baseline_worker.ingress_name(namespace),
            baseline_worker.observations_name(namespace),
        ]

    def handle_event(self, tracker: CommitTracker, body: dict[str, Any], at: float) -> None:
        if body.get("type") == baseline_worker.COMMITTED_TYPE:
            input_ids = [str(i) for i in body.get("input_ids") or []]
            key = f"{body.get('session_id')}:{input_ids[0] if input_ids else '?'}"
            tracker.committed(key, input_ids, None, at)


ROUTING_KEY = SUBMIT_TYPE
