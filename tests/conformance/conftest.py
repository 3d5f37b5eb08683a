"""Fixtures of the conformance suite: one ``store`` per backend and a harness over it.

Every test runs twice, against :class:`InMemoryStore` (with a :class:`ManualClock`) and
against :class:`PostgresStore` (database clock). The :class:`Harness` hides the only
differences: how a lease is made to expire (advance the manual clock, or wait until the
database clock passes the expiry) and which TTL a test that needs expiry should use.

The PostgreSQL store is started once per pytest process on the ``pg_url`` database and
``reset()`` before each test; all conformance tests share one session-scoped event loop so
that its connection pool stays usable across tests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from lash_core.clock import ManualClock
from lash_core.commands import CommandDraft, RefreshToolCatalog, ResetSession
from lash_core.commit import FinalTurn, RuntimeCommit
from lash_core.inputs import (
    ActiveTurnIngress,
    CheckpointKind,
    Ingress,
    NextTurnIngress,
    TextItem,
    TurnInput,
    TurnInputDraft,
)
from lash_core.leases import (
    Acquired,
    Busy,
    Lease,
    LeaseClaimResult,
    LeaseOwner,
    LocalProcessLiveness,
    local_process_owner,
    read_process_start,
)
from lash_core.outcomes import AssistantMessageFinish, Finished, Stopped, TurnOutcome, Usage
from lash_core.store.base import Store
from lash_core.store.memory import InMemoryStore
from lash_core.transcript import GraphAppend, GraphDelta, GraphUnchanged, MessageNode

LONG_TTL_MS = 60_000
T = TypeVar("T")


@dataclass
class Harness:
    """What differs between backends, behind one small surface."""

    store: Store
    backend: str
    clock: ManualClock | None
    url: str | None = None

    @property
    def short_ttl_ms(self) -> int:
        """A TTL a test can outlive: cheap with a manual clock, ~1 s of real time on PG."""
        return 1_000

    async def expire(self, lease: Lease) -> None:
        """Return once the store clock has passed ``lease.expires_at_ms``."""
        if self.clock is not None:
            if self.clock.now_ms() <= lease.expires_at_ms:
                self.clock.set(lease.expires_at_ms + 1)
            return
        loop = asyncio.get_running_loop()
        remaining_ms = max(0, lease.expires_at_ms - await self.store.now_ms())
        deadline = loop.time() + remaining_ms / 1000 + 30
        while await self.store.now_ms() <= lease.expires_at_ms:
            if loop.time() > deadline:
                raise AssertionError("store clock never passed the lease expiry")
            await asyncio.sleep(0.05)

    @asynccontextmanager
    async def reopen(self) -> AsyncIterator[Store]:
        """A second, independent handle on the same durable state (another pool on the
        same database). The in-memory store has no durable state outside the object, so
        its "second handle" is the same object."""
        if self.url is None:
            yield self.store
            return
        from lash_core.store.postgres import PostgresStore

        other = PostgresStore(self.url)
        await other.start()
        try:
            yield other
        finally:
            await other.close()

    async def advance(self, ms: int) -> None:
        """Let at least ``ms`` of store time pass (manual clock: instantly)."""
        if self.clock is not None:
            self.clock.advance(ms)
            return
        start = await self.store.now_ms()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ms / 1000 + 30
        while await self.store.now_ms() < start + ms:
            if loop.time() > deadline:
                raise AssertionError("store clock did not advance")
            await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- stores


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def postgres_store(pg_url: str) -> AsyncIterator[Store]:
    from lash_core.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["memory", "postgres"])
def backend(request: pytest.FixtureRequest) -> Harness:
    """The store under test (no I/O here; PostgreSQL is started once per process)."""
    if request.param == "memory":
        clock = ManualClock()
        return Harness(store=InMemoryStore(clock=clock), backend="memory", clock=clock)
    store: Store = request.getfixturevalue("postgres_store")
    url: str = request.getfixturevalue("pg_url")
    return Harness(store=store, backend="postgres", clock=None, url=url)


@pytest_asyncio.fixture(loop_scope="session")
async def harness(backend: Harness) -> Harness:
    """The backend, emptied: each conformance case starts from a fresh store."""
    reset = getattr(backend.store, "reset", None)
    if backend.backend == "postgres" and reset is not None:
        await reset()
    return backend


@pytest.fixture
def store(harness: Harness) -> Store:
    return harness.store


# --------------------------------------------------------------------------- builders


def owner(name: str, incarnation: str = "1") -> LeaseOwner:
    return LeaseOwner(owner_id=name, incarnation_id=f"{name}-{incarnation}")


def text_input(text: str) -> TurnInput:
    return TurnInput(items=[TextItem(text=text)])


def draft(
    session_id: str,
    text: str = "hello",
    *,
    source_key: str | None = None,
    input_id: str | None = None,
    ingress: Ingress | None = None,
) -> TurnInputDraft:
    return TurnInputDraft(
        session_id=session_id,
        input_id=input_id,
        source_key=source_key,
        ingress=ingress or NextTurnIngress(),
        input=text_input(text),
    )


def active(turn_id: str, boundary: CheckpointKind = "after_work") -> ActiveTurnIngress:
    return ActiveTurnIngress(turn_id=turn_id, min_boundary=boundary)


def command_draft(session_id: str, key: str, *, reset: bool = True) -> CommandDraft:
    command = ResetSession(reason="r") if reset else RefreshToolCatalog(reason="r")
    return CommandDraft(session_id=session_id, idempotency_key=key, command=command)


def finished(text: str = "done") -> TurnOutcome:
    return Finished(finish=AssistantMessageFinish(text=text))


def cancelled_outcome() -> TurnOutcome:
    return Stopped(stop="cancelled")


def node(
    node_id: str, text: str, *, parent: str | None = None, role: Any = "user", turn: str = "t1"
) -> MessageNode:
    return MessageNode(node_id=node_id, parent_node_id=parent, role=role, text=text, turn_id=turn)


def append(*nodes: MessageNode) -> GraphDelta:
    if not nodes:
        return GraphUnchanged()
    return GraphAppend(nodes=list(nodes), leaf_node_id=nodes[-1].node_id)


def final(turn_id: str, outcome: TurnOutcome | None = None, **usage: int) -> FinalTurn:
    return FinalTurn(turn_id=turn_id, outcome=outcome or finished(), usage=Usage(**usage))


def commit(session_id: str, lease: Lease | None = None, **fields: Any) -> RuntimeCommit:
    return RuntimeCommit(
        session_id=session_id, fence=lease.fence() if lease is not None else None, **fields
    )


def acquired(result: LeaseClaimResult) -> Lease:
    assert isinstance(result, Acquired), f"expected acquired, got {result!r}"
    return result.lease


def busy(result: LeaseClaimResult) -> Lease:
    assert isinstance(result, Busy), f"expected busy, got {result!r}"
    return result.holder


async def lease_for(
    store: Store, session_id: str, name: str = "w", ttl: int = LONG_TTL_MS
) -> Lease:
    return acquired(await store.try_claim_lease(session_id, owner(name), ttl))


def live_local_owner(name: str) -> LeaseOwner:
    """This very process: provably alive to a same-host claimant."""
    return local_process_owner(name, f"{name}-inc")


def dead_local_owner(name: str) -> LeaseOwner:
    """A local process on this host and boot whose recorded start time no longer matches."""
    me = live_local_owner(name)
    assert isinstance(me.liveness, LocalProcessLiveness)
    start = read_process_start(os.getpid()) or 0
    return LeaseOwner(
        owner_id=name,
        incarnation_id=f"{name}-dead",
        liveness=me.liveness.model_copy(update={"process_start": start + 987_654}),
    )


async def race(*calls: Callable[[], Awaitable[T]]) -> list[T]:
    """Start every call at once (a barrier, then gather) and return their results in order."""
    gate = asyncio.Event()

    async def run(call: Callable[[], Awaitable[T]]) -> T:
        await gate.wait()
        return await call()

    tasks = [asyncio.ensure_future(run(c)) for c in calls]
    await asyncio.sleep(0)
    gate.set()
    return list(await asyncio.gather(*tasks))


async def race_settled(*calls: Callable[[], Awaitable[T]]) -> list[T | BaseException]:
    """Like :func:`race` but returns exceptions instead of raising them."""
    gate = asyncio.Event()

    async def run(call: Callable[[], Awaitable[T]]) -> T:
        await gate.wait()
        return await call()

    tasks = [asyncio.ensure_future(run(c)) for c in calls]
    await asyncio.sleep(0)
    gate.set()
    return list(await asyncio.gather(*tasks, return_exceptions=True))
