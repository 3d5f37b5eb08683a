"""The driver's lean hot path on both stores: which store calls one drain makes, and the
committed-state cache that spares a reload (and never serves stale state)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from lash_core.commands import CommandDraft, ResetSession
from lash_core.engine.driver import SessionDriver
from lash_core.engine.state_cache import StateCache, nodes_size
from lash_core.store.base import Store
from lash_core.transcript import MessageNode
from tests.engine.support import agent, new_session_id, owner
from tests.engine.test_turns import admit, transcript

_CALLS = (
    "acquire_and_start_turn",
    "try_claim_lease",
    "load_state",
    "claim_leading_command",
    "list_pending_inputs",
    "list_commands",
    "start_turn",
    "has_active_input",
    "commit",
    "release_lease",
)


def counted(store: Store) -> Counter[str]:
    """Count calls of the driver-facing operations on this store instance."""
    calls: Counter[str] = Counter()
    for name in _CALLS:
        method = getattr(store, name)

        def wrap(m: Callable[..., Awaitable[Any]], n: str) -> Callable[..., Awaitable[Any]]:
            async def call(*args: Any, **kwargs: Any) -> Any:
                calls[n] += 1
                return await m(*args, **kwargs)

            return call

        setattr(store, name, wrap(method, name))
    return calls


async def test_a_single_input_drain_is_two_store_calls(store: Store) -> None:
    sid = new_session_id()
    await admit(store, sid, "hello")
    calls = counted(store)
    report = await SessionDriver(store, agent(), owner("w1")).drain(sid)
    assert len(report.turns) == 1
    # Acquire + start, and the final commit that checks the last steering checkpoint and
    # releases the lease: no steering probe, no command lookups, no peeks, no separate
    # release and no re-check after it.
    assert calls == Counter({"acquire_and_start_turn": 1, "commit": 1})
    lease = await store.read_lease(sid)
    assert lease is not None and lease.lease_token is None


async def test_queued_turns_continue_without_releasing(store: Store) -> None:
    sid = new_session_id()
    driver = SessionDriver(store, agent(), owner("w1"))
    first = await admit(store, sid, "one")
    calls = counted(store)

    async def admit_during_turn(*args: Any, **kwargs: Any) -> Any:
        if calls["commit"] == 0:  # the first turn is about to commit
            await admit(store, sid, "two")
        return await commit(*args, **kwargs)

    commit = store.commit
    store.commit = admit_during_turn  # type: ignore[method-assign]
    report = await driver.drain(sid)
    assert [t.input_ids[0] == first for t in report.turns] == [True, False]
    assert calls["acquire_and_start_turn"] == 1 and calls["start_turn"] == 1
    assert calls["commit"] == 2 and calls["release_lease"] == 0
    assert calls["claim_leading_command"] == 0 and calls["list_pending_inputs"] == 0


async def test_a_pending_command_is_claimed_only_when_reported(store: Store) -> None:
    sid = new_session_id()
    driver = SessionDriver(store, agent(), owner("w1"))
    await admit(store, sid, "x")
    await store.enqueue_command(
        CommandDraft(session_id=sid, idempotency_key="r", command=ResetSession())
    )
    await admit(store, sid, "y")
    calls = counted(store)
    report = await driver.drain(sid)
    assert report.commands_applied == 1 and len(report.turns) == 2
    # After x's turn the commit reported the command: claimed (once more to see none left).
    assert calls["claim_leading_command"] == 2
    assert await transcript(store, sid) == [("user", "y"), ("assistant", "echo: y")]


async def test_cached_state_is_reused_only_while_current(store: Store) -> None:
    sid = new_session_id()
    a = SessionDriver(store, agent(), owner("a"))
    b = SessionDriver(store, agent(), owner("b"))
    calls = counted(store)
    await admit(store, sid, "one")
    await a.drain(sid)
    assert calls["load_state"] == 0  # a new session has nothing to load
    await admit(store, sid, "two")
    await a.drain(sid)
    assert calls["load_state"] == 0  # a's cache is exactly the committed state
    await admit(store, sid, "three")
    await b.drain(sid)
    assert calls["load_state"] == 1  # b never ran the session
    await admit(store, sid, "four")
    await a.drain(sid)
    assert calls["load_state"] == 2  # a's cache is behind b's commit: reloaded
    assert [t for _, t in await transcript(store, sid)] == [
        "one",
        "echo: one",
        "two",
        "echo: two",
        "three",
        "echo: three",
        "four",
        "echo: four",
    ]


async def test_the_state_cache_keeps_recent_sessions_within_its_bounds(store: Store) -> None:
    """Sessions beyond the cache's bound are loaded again on their next turn; the ones it
    kept are not, and a turn that grows a session counts its new size (here the byte
    bound, a little over one short exchange, keeps only the session just run)."""
    sessions = [new_session_id() for _ in range(3)]
    small = SessionDriver(store, agent(), owner("s"), state_cache=StateCache(max_sessions=2))
    calls = counted(store)
    for sid in sessions:
        await admit(store, sid, "one")
        await small.drain(sid)
    for sid in sessions[1:]:  # the last two are cached
        await admit(store, sid, "two")
        await small.drain(sid)
    assert calls["load_state"] == 0
    await admit(store, sessions[0], "two")
    await small.drain(sessions[0])  # evicted: loaded
    assert calls["load_state"] == 1

    exchange = nodes_size([MessageNode(node_id="n", role="user", text="one")]) * 2
    tight = SessionDriver(
        store, agent(), owner("t"), state_cache=StateCache(max_bytes=exchange + 100)
    )
    for sid in sessions[:2]:
        await admit(store, sid, "three")
        await tight.drain(sid)  # never ran here: loaded
    assert calls["load_state"] == 3
    await admit(store, sessions[1], "four")
    await tight.drain(sessions[1])  # the one it kept (grown past the bound, alone)
    await admit(store, sessions[0], "four")
    await tight.drain(sessions[0])  # evicted by the other's size
    assert calls["load_state"] == 4
