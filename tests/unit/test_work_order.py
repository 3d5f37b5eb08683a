"""Property: a session's work runs in admission order, whatever the interleaving.

Hypothesis interleaves admissions of next-turn input and session commands with the steps a
lease holder takes (``SessionDriver``'s order: a leading command if the store reports one,
else a turn over the claimable input, committed with ``release_lease_if_idle``) on an
:class:`InMemoryStore`, and checks after every step that everything executed so far ran
in ``enqueue_seq`` order (a turn's inputs being one contiguous group) and that an idle
release happened exactly when nothing was left. Draining at the end runs every item once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lash_core.clock import ManualClock, SequentialIds
from lash_core.commands import CommandDraft, RefreshToolCatalog
from lash_core.commit import FinalTurn, RuntimeCommit
from lash_core.inputs import NextTurnIngress, TextItem, TurnInput, TurnInputDraft
from lash_core.leases import Acquired, Lease, LeaseOwner
from lash_core.outcomes import Stopped
from lash_core.store.memory import InMemoryStore

T = TypeVar("T")
SID = "s"
OWNER = LeaseOwner(owner_id="w", incarnation_id="w-1")

Op = tuple[str, int]


class Holder:
    """A lease holder stepping through a session's work like the driver does."""

    def __init__(self, store: InMemoryStore) -> None:
        self.store = store
        self.lease: Lease | None = None
        self.command_pending = True
        self.executed: list[list[int]] = []  # enqueue_seq groups, in execution order
        self.admitted = 0

    async def admit(self, kind: str, n: int) -> None:
        self.admitted += 1
        if kind == "input":
            await self.store.enqueue_input(
                TurnInputDraft(
                    session_id=SID,
                    ingress=NextTurnIngress(),
                    input=TurnInput(items=[TextItem(text=f"m{n}")]),
                )
            )
        else:
            await self.store.enqueue_command(
                CommandDraft(session_id=SID, idempotency_key=f"c{n}", command=RefreshToolCatalog())
            )

    async def step(self) -> bool:
        """One unit of work; False when there was nothing to do (the lease is released)."""
        store = self.store
        if self.lease is None:
            opened = await store.acquire_and_start_turn(SID, OWNER, 60_000)
            assert isinstance(opened.lease, Acquired)
            self.lease = opened.lease.lease
            self.command_pending = opened.command_pending
            if opened.turn is not None:
                return await self._finish_turn(opened.turn.turn_id, opened.turn.claim)
        fence = self.lease.fence()
        if self.command_pending:
            claim = await store.claim_leading_command(fence, OWNER)
            if claim is not None:
                result = await store.commit(
                    RuntimeCommit(
                        session_id=SID,
                        fence=fence,
                        applied_command=claim.command.command,
                        completed_command_claims=[claim.completion()],
                    )
                )
                self.executed.append([claim.command.enqueue_seq])
                assert not result.released
                return True
            self.command_pending = False
        start = await store.start_turn(fence)
        if start is None:
            await store.release_lease(fence)
            self.lease = None
            return False
        return await self._finish_turn(start.turn_id, start.claim)

    async def _finish_turn(self, turn_id: str, claim: Any) -> bool:
        assert self.lease is not None and claim is not None
        result = await self.store.commit(
            RuntimeCommit(
                session_id=SID,
                fence=self.lease.fence(),
                turn=FinalTurn(turn_id=turn_id, outcome=Stopped(stop="cancelled")),
                completed_input_claims=[claim.completion()],
                defer_active_inputs_of_turn=turn_id,
                release_lease_if_idle=True,
            )
        )
        self.executed.append([r.enqueue_seq for r in claim.inputs])
        left = await self.store.list_pending_inputs(SID)
        commands = await self.store.list_commands(SID, pending_only=True)
        assert result.released == (not left and not commands)
        assert result.command_pending == bool(commands)
        if result.released:
            self.lease = None
        self.command_pending = result.command_pending
        return True

    def check_order(self) -> None:
        flat = [seq for group in self.executed for seq in group]
        assert flat == sorted(flat) and len(flat) == len(set(flat)), self.executed


ops = st.lists(
    st.one_of(
        st.tuples(st.just("input"), st.integers(0, 9)),
        st.tuples(st.just("command"), st.integers(0, 9)),
        st.tuples(st.just("step"), st.just(0)),
    ),
    max_size=40,
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_work_runs_in_admission_order(script: list[Op]) -> None:
    async def scenario() -> None:
        holder = Holder(InMemoryStore(clock=ManualClock(), ids=SequentialIds()))
        for index, (kind, _) in enumerate(script):
            if kind == "step":
                await holder.step()
            else:
                await holder.admit(kind, index)
            holder.check_order()
        for _ in range(2 * holder.admitted + 2):
            if not await holder.step() and holder.lease is None:
                break
        holder.check_order()
        assert sum(len(group) for group in holder.executed) == holder.admitted
        assert await holder.store.list_pending_inputs(SID) == []
        assert await holder.store.list_commands(SID, pending_only=True) == []

    run(scenario())
