"""Database round trips of one drained turn, end to end through ``SessionDriver.drain``.

Counts the statements the store sends (``Database.add_listener``; BEGIN/COMMIT are not
statements) and the transactions it begins (``add_begin_listener``), attributed to the store
operation that sent them, for a drain of a session holding one next-turn input: the first
drain of a new session and a drain of a session that already has history (the steady state).
Counts are deterministic, so the test asserts upper bounds on them; it prints the per-
operation breakdown and the wall time of draining 200 single-input sessions, but never
asserts a timing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import pytest

from lash_core.engine.driver import SessionDriver
from lash_core.store.base import Store
from lash_core.store.postgres import PostgresStore
from tests.engine.support import agent
from tests.postgres.conftest import draft, owner, sid

pytestmark = pytest.mark.postgres

#: Upper bounds (statements, transactions) per drained single-input turn; see the module
#: docstring of ``lash_core.engine.driver`` for what each remaining trip is for. Before the
#: lean hot path every one of these drains took 29 statements in 12 transactions.
BOUNDS = {
    # acquire+start 3 (admission wrote a free lease row: no advisory lock on the first claim),
    # commit 3 (its head read also checks the last steering checkpoint, so no probe before
    # it, and reads what the commit defers, so one write)
    "first": (6, 2),
    # acquire+start 3, commit 3 (state cached by this driver)
    "steady": (6, 2),
    # as steady, plus loading the state once (this worker never ran the session)
    "cold": (8, 3),
}

_operation: ContextVar[str] = ContextVar("operation", default="?")

#: Store operations the driver and the turn runner call.
_TRACED = (
    "try_claim_lease",
    "reclaim_lease",
    "acquire_and_start_turn",
    "renew_lease",
    "release_lease",
    "load_state",
    "claim_leading_command",
    "list_pending_inputs",
    "list_commands",
    "start_turn",
    "has_active_input",
    "claim_active_turn_inputs",
    "commit",
    "abandon_input_claim",
)


@dataclass
class Trips:
    statements: Counter[str] = field(default_factory=Counter)
    transactions: Counter[str] = field(default_factory=Counter)

    def total(self) -> tuple[int, int]:
        return sum(self.statements.values()), sum(self.transactions.values())

    def table(self) -> str:
        names = sorted(set(self.statements) | set(self.transactions))
        rows = [
            f"    {n:<24} tx={self.transactions[n]:<3} stmt={self.statements[n]}" for n in names
        ]
        statements, transactions = self.total()
        return "\n".join([*rows, f"    {'TOTAL':<24} tx={transactions:<3} stmt={statements}"])


def _traced(store: Store) -> None:
    """Wrap the store's operations (on this instance) so statements know who sent them."""
    for name in _TRACED:
        method = getattr(store, name, None)
        if method is None:
            continue

        def wrap(m: Callable[..., Awaitable[Any]], n: str) -> Callable[..., Awaitable[Any]]:
            async def call(*args: Any, **kwargs: Any) -> Any:
                token = _operation.set(n)
                try:
                    return await m(*args, **kwargs)
                finally:
                    _operation.reset(token)

            return call

        setattr(store, name, wrap(method, name))


@contextmanager
def counting(store: PostgresStore) -> Iterator[Trips]:
    trips = Trips()

    def on_statement(_: str) -> None:
        trips.statements[_operation.get()] += 1

    def on_begin() -> None:
        trips.transactions[_operation.get()] += 1

    store.database.add_listener(on_statement)
    store.database.add_begin_listener(on_begin)
    try:
        yield trips
    finally:
        store.database.remove_listener(on_statement)
        store.database.remove_begin_listener(on_begin)


async def test_statements_and_transactions_per_drained_turn(pg_url: str) -> None:
    store = PostgresStore(pg_url, pool_size=2)
    await store.start()
    try:
        _traced(store)
        driver = SessionDriver(store, agent(), owner("W"), lease_ttl_ms=60_000)
        s = sid("rt")
        await store.enqueue_input(draft(s, "first"))
        with counting(store) as first:
            report = await driver.drain(s)
        assert len(report.turns) == 1
        await store.enqueue_input(draft(s, "second"))
        with counting(store) as steady:
            report = await driver.drain(s)
        assert len(report.turns) == 1 and report.turns[0].outcome.kind == "finished"
        other = SessionDriver(store, agent(), owner("V"), lease_ttl_ms=60_000)
        await store.enqueue_input(draft(s, "third"))
        with counting(store) as cold:
            report = await other.drain(s)
        assert len(report.turns) == 1 and report.turns[0].outcome.kind == "finished"
        assert (await store.read_lease(s)).lease_token is None  # type: ignore[union-attr]
        measured = {"first": first, "steady": steady, "cold": cold}
        for name, trips in measured.items():
            print(f"\n{name} drain (1 turn):\n{trips.table()}")
        for name, trips in measured.items():
            statements, transactions = trips.total()
            max_statements, max_transactions = BOUNDS[name]
            assert statements <= max_statements, trips.table()
            assert transactions <= max_transactions, trips.table()
    finally:
        await store.close()


async def test_time_draining_200_single_input_sessions(pg_url: str) -> None:
    """Prints the wall time only (timings are never asserted); checks every turn ran."""
    store = PostgresStore(pg_url, pool_size=10)
    await store.start()
    try:
        driver = SessionDriver(store, agent(), owner("W"), lease_ttl_ms=60_000)
        sessions = [sid("t200") for _ in range(200)]
        for s in sessions:
            await store.enqueue_input(draft(s, "hello"))
        gate = asyncio.Semaphore(10)

        async def drain(s: str) -> int:
            async with gate:
                return len((await driver.drain(s)).turns)

        with counting(store) as trips:
            began = time.perf_counter()
            turns = await asyncio.gather(*(drain(s) for s in sessions))
            elapsed = time.perf_counter() - began
        assert turns == [1] * len(sessions)
        statements, transactions = trips.total()
        print(
            f"\n200 single-input sessions, 10 at a time: {elapsed:.3f}s"
            f" ({elapsed / len(sessions) * 1000:.2f} ms/session;"
            f" {statements / len(sessions):.1f} statements,"
            f" {transactions / len(sessions):.1f} transactions per turn)"
        )
    finally:
        await store.close()
