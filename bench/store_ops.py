"""Latency of the durable core's hot operations against PostgreSQL, beside a raw baseline.

``python -m bench.store_ops [--n 300] [--database-url URL]`` creates a fresh database,
then times, one call at a time (no concurrency, so each figure is a single client's round
trip latency): a raw baseline transaction with one ``INSERT ... ON CONFLICT DO NOTHING`` on
a plain psycopg connection, ``enqueue_input`` (admission), the turn start
``acquire_and_start_turn`` (lease + claim + ``turn.started`` in one transaction), and the
final ``commit`` with the idle release (graph append, claim completion, deferral, stamp,
events, release). Statements per operation are counted with the store's statement listener, and the
client CPU per call (``time.process_time``) is shown beside them.
Nothing here is asserted; it prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from lash_core.commit import FinalTurn, RuntimeCommit
from lash_core.inputs import TextItem, TurnInput, TurnInputDraft
from lash_core.leases import Acquired, LeaseOwner
from lash_core.outcomes import AssistantMessageFinish, Finished
from lash_core.store.postgres import PostgresStore
from lash_core.transcript import GraphAppend, MessageNode

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


class _Counter:
    def __init__(self) -> None:
        self.statements = 0

    def hook(self, *_: Any) -> None:
        self.statements += 1


async def _time(
    n: int, op: Callable[[int], Awaitable[None]], counter: _Counter
) -> tuple[list[float], float, float]:
    """Wall-clock samples (ms), statements per call and client CPU per call (ms)."""
    samples: list[float] = []
    before = counter.statements
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        samples.append((time.perf_counter() - t0) * 1000)
    cpu = (time.process_time() - cpu0) * 1000 / n
    return samples, (counter.statements - before) / n, cpu


def _row(name: str, samples: list[float], statements: float, cpu: float) -> str:
    q = statistics.quantiles(samples, n=100)
    return (
        f"{name:<28} {statistics.fmean(samples):7.2f} {q[49]:7.2f} {q[98]:7.2f}"
        f" {statements:6.1f} {cpu:7.3f}"
    )


async def run(url: str, n: int) -> None:
    owner = LeaseOwner(owner_id="bench", incarnation_id=uuid.uuid4().hex)
    store = PostgresStore(url, pool_size=2)
    await store.start()
    counter = _Counter()
    store.database.add_listener(counter.hook)
    raw = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await raw.execute(
        "CREATE TABLE raw_baseline (session_id text, source_key text, body text,"
        " PRIMARY KEY (session_id, source_key))"
    )

    async def baseline(i: int) -> None:
        counter.hook()
        async with raw.transaction():
            await raw.execute(
                "INSERT INTO raw_baseline VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (f"s{i}", f"k{i}", "hello"),
            )

    async def admit(i: int) -> None:
        await store.enqueue_input(
            TurnInputDraft(
                session_id=f"s{i}",
                source_key=f"k{i}",
                input=TurnInput(items=[TextItem(text="hello")]),
            )
        )

    starts: dict[int, Any] = {}

    async def start(i: int) -> None:
        opened = await store.acquire_and_start_turn(f"s{i}", owner, 30_000)
        assert isinstance(opened.lease, Acquired) and opened.turn is not None
        starts[i] = opened

    async def commit(i: int) -> None:
        opened = starts[i]
        turn = opened.turn
        assert turn is not None and turn.claim is not None
        nodes = [
            MessageNode(node_id=f"u{i}", role="user", text="hello", turn_id=turn.turn_id),
            MessageNode(
                node_id=f"a{i}",
                parent_node_id=f"u{i}",
                role="assistant",
                text="echo: hello",
                turn_id=turn.turn_id,
            ),
        ]
        result = await store.commit(
            RuntimeCommit(
                session_id=f"s{i}",
                fence=opened.lease.lease.fence(),
                release_lease_if_idle=True,
                expected_head_revision=0,
                graph=GraphAppend(nodes=nodes, leaf_node_id=f"a{i}"),
                turn=FinalTurn(
                    turn_id=turn.turn_id,
                    outcome=Finished(finish=AssistantMessageFinish(text="echo: hello")),
                ),
                completed_input_claims=[turn.claim.completion()],
                defer_active_inputs_of_turn=turn.turn_id,
            )
        )
        assert result.released

    print(
        f"{'operation (ms, n=' + str(n) + ')':<28} {'mean':>7} {'p50':>7} {'p99':>7} {'stmts':>6}"
        f" {'cpu ms':>7}"
    )
    for name, op in (
        ("raw INSERT transaction", baseline),
        ("enqueue_input (admission)", admit),
        ("acquire_and_start_turn", start),
        ("commit + idle release", commit),
    ):
        samples, statements, cpu = await _time(n, op, counter)
        print(_row(name, samples, statements, cpu))
    await raw.close()
    await store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    args = parser.parse_args(argv)
    name = f"lash_bench_ops_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        asyncio.run(run(_with_db(args.database_url, name), args.n))
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
