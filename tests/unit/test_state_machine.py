"""A hypothesis state machine over the pending-input rules and lease decisions.

The system under test is :class:`InMemoryStore` on a :class:`ManualClock` (the store applies
the pure rules of ``lash_core.inputs`` / ``leases`` / ``claims``); hypothesis drives
random interleavings of admission, leasing, claiming, committing, abandoning, cancelling and
time passing by three competing owners, and checks after every step:

* at most one presented fence is valid at a time (one live lease);
* fencing tokens strictly increase across tenures and are kept by re-entry;
* every input is in exactly one known state; terminal states are absorbing;
* only pending rows are ever claimed or cancelled; ``accepted`` rows always carry a claim;
* a stale or repeated release never changes a newer lease;
* live-claimed rows are hidden from ``list_pending_inputs`` and every other pending row is
  listed;
* the event log stays gapless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lash_core.claims import TurnInputClaim
from lash_core.clock import ManualClock, SequentialIds
from lash_core.commit import FinalTurn, RuntimeCommit
from lash_core.errors import LeaseLost, SourceKeyConflict, Superseded
from lash_core.inputs import (
    PENDING_STATES,
    TERMINAL_STATES,
    ActiveTurnIngress,
    CancelOutcomeKind,
    InputIdTarget,
    InputState,
    NextTurnIngress,
    PendingTurnInput,
    TextItem,
    TurnInput,
    TurnInputDraft,
    claim_is_live,
)
from lash_core.leases import Acquired, Lease, LeaseOwner, LeaseRow, fence_matches
from lash_core.outcomes import Stopped
from lash_core.store.memory import InMemoryStore

T = TypeVar("T")
SID = "s"
OWNERS = [LeaseOwner(owner_id=name, incarnation_id=f"{name}-1") for name in ("a", "b", "c")]
owners = st.sampled_from(range(len(OWNERS)))


class LeaseAndInputMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock()
        self.store = InMemoryStore(clock=self.clock, ids=SequentialIds())
        self.fences: dict[int, Lease] = {}
        self.claims: dict[int, list[TurnInputClaim]] = {}
        self.turns: dict[int, str] = {}
        self.max_generation = 0
        self.tokens: dict[str, int] = {}
        self.terminal: dict[str, InputState] = {}
        self.turn_counter = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.loop.close()

    # ------------------------------------------------------------------ helpers

    def inputs(self) -> dict[str, PendingTurnInput]:
        return {r.input_id: r for r in self.run(self.store.list_inputs(SID))}

    def lease_row(self) -> LeaseRow | None:
        return self.run(self.store.read_lease(SID))

    def record_lease(self, who: int, lease: Lease) -> None:
        known = self.tokens.get(lease.lease_token)
        if known is None:
            assert lease.fencing_token > self.max_generation, "generation must grow per tenure"
            self.tokens[lease.lease_token] = lease.fencing_token
            self.max_generation = lease.fencing_token
        else:
            assert known == lease.fencing_token, "re-entry keeps the generation"
        self.fences[who] = lease

    def assert_claimed_from_pending(
        self, before: dict[str, PendingTurnInput], claim: TurnInputClaim | None
    ) -> None:
        if claim is None:
            return
        for row in claim.inputs:
            assert before[row.input_id].state in PENDING_STATES, "claimed a non-pending row"

    # ------------------------------------------------------------------ rules

    @rule(
        text=st.sampled_from(["x", "y"]),
        key=st.sampled_from([None, "k1", "k2"]),
        steer=st.booleans(),
        turn=st.sampled_from(["t1", "t2", "t3"]),
    )
    def enqueue(self, text: str, key: str | None, steer: bool, turn: str) -> None:
        ingress = ActiveTurnIngress(turn_id=turn) if steer else NextTurnIngress()
        draft = TurnInputDraft(
            session_id=SID,
            source_key=key,
            ingress=ingress,
            input=TurnInput(items=[TextItem(text=text)]),
        )
        with contextlib.suppress(SourceKeyConflict):
            self.run(self.store.enqueue_input(draft))

    @rule(who=owners, ttl=st.sampled_from([0, 50, 1_000]))
    def try_claim(self, who: int, ttl: int) -> None:
        result = self.run(self.store.try_claim_lease(SID, OWNERS[who], ttl))
        if isinstance(result, Acquired):
            self.record_lease(who, result.lease)

    @rule(who=owners)
    def release(self, who: int) -> None:
        fence = self.fences.get(who)
        if fence is None:
            return
        before = self.lease_row()
        self.run(self.store.release_lease(fence.fence()))
        after = self.lease_row()
        if not fence_matches(before, fence.fence()):
            assert after == before, "a stale release changed the lease"
        else:
            assert after is not None and after.lease_token is None
            assert before is not None and after.fencing_token == before.fencing_token

    @rule(who=owners)
    def renew(self, who: int) -> None:
        fence = self.fences.get(who)
        if fence is None:
            return
        with contextlib.suppress(LeaseLost):
            self.run(self.store.renew_lease(fence.fence(), 1_000))

    @rule(ms=st.integers(min_value=1, max_value=1_500))
    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    @rule(who=owners)
    def start_turn(self, who: int) -> None:
        fence = self.fences.get(who)
        if fence is None:
            return
        before = self.inputs()
        self.turn_counter += 1
        turn_id = f"t{self.turn_counter % 3 + 1}"
        try:
            start = self.run(self.store.start_turn(fence.fence(), turn_id, require_inputs=False))
        except LeaseLost:
            return
        assert start is not None
        self.turns[who] = turn_id
        for input_id in start.resolved_input_ids:
            assert before[input_id].state in (InputState.ACCEPTED, InputState.PENDING_ACTIVE)
        if start.claim is not None:
            for row in start.claim.inputs:
                assert before[row.input_id].state in PENDING_STATES | {InputState.ACCEPTED}
            self.claims.setdefault(who, []).append(start.claim)

    @rule(who=owners, checkpoint=st.sampled_from(["after_work", "before_completion"]))
    def claim_active(self, who: int, checkpoint: Any) -> None:
        fence, turn_id = self.fences.get(who), self.turns.get(who)
        if fence is None or turn_id is None:
            return
        before = self.inputs()
        try:
            claim = self.run(
                self.store.claim_active_turn_inputs(fence.fence(), OWNERS[who], turn_id, checkpoint)
            )
        except LeaseLost:
            return
        self.assert_claimed_from_pending(before, claim)
        if claim is not None:
            self.claims.setdefault(who, []).append(claim)

    @rule(who=owners, limit=st.integers(min_value=1, max_value=3))
    def claim_next(self, who: int, limit: int) -> None:
        fence = self.fences.get(who)
        if fence is None:
            return
        before = self.inputs()
        try:
            claim = self.run(self.store.claim_next_turn_inputs(fence.fence(), OWNERS[who], limit))
        except LeaseLost:
            return
        self.assert_claimed_from_pending(before, claim)
        if claim is not None:
            self.claims.setdefault(who, []).append(claim)

    @rule(who=owners, release=st.booleans())
    def commit(self, who: int, release: bool) -> None:
        fence = self.fences.get(who)
        if fence is None:
            return
        held = self.claims.pop(who, [])
        turn_id = self.turns.pop(who, None)
        commit = RuntimeCommit(
            session_id=SID,
            fence=fence.fence(),
            release_lease=release,
            turn=FinalTurn(
                turn_id=f"{turn_id}-{self.turn_counter}", outcome=Stopped(stop="cancelled")
            )
            if turn_id
            else None,
            completed_input_claims=[c.completion() for c in held],
            defer_active_inputs_of_turn=turn_id,
        )
        try:
            self.run(self.store.commit(commit))
        except (LeaseLost, Superseded):
            return

    @rule(who=owners)
    def abandon(self, who: int) -> None:
        for claim in self.claims.pop(who, []):
            self.run(self.store.abandon_input_claim(claim))

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        before = self.inputs()
        if not before:
            return
        input_id = data.draw(st.sampled_from(sorted(before)))
        [result] = self.run(self.store.cancel_inputs(SID, [InputIdTarget(value=input_id)]))
        if result.outcome is CancelOutcomeKind.CANCELLED:
            assert before[input_id].state in PENDING_STATES, "cancelled a non-pending row"

    # ------------------------------------------------------------------ invariants

    @invariant()
    def one_live_lease(self) -> None:
        row = self.lease_row()
        now = self.clock.now_ms()
        valid = [
            who
            for who, lease in self.fences.items()
            if row is not None and fence_matches(row, lease.fence()) and row.is_live(now)
        ]
        assert len(valid) <= 1
        if row is not None:
            assert row.fencing_token <= self.max_generation

    @invariant()
    def input_states_are_consistent(self) -> None:
        rows = self.inputs()
        seqs = [r.enqueue_seq for r in rows.values()]
        assert len(set(seqs)) == len(seqs)
        for input_id, row in rows.items():
            assert row.state in InputState
            if row.state is InputState.ACCEPTED:
                assert row.claim is not None, "accepted rows carry their claim"
            if row.state in TERMINAL_STATES:
                assert row.claim is None
            previous = self.terminal.get(input_id)
            if previous is not None:
                assert row.state is previous, "terminal states are absorbing"
            elif row.state in TERMINAL_STATES:
                self.terminal[input_id] = row.state
        assert set(self.terminal) <= set(rows)

    @invariant()
    def live_claims_are_hidden(self) -> None:
        rows = self.inputs()
        lease = self.lease_row()
        now = self.clock.now_ms()
        listed = {r.input_id for r in self.run(self.store.list_pending_inputs(SID))}
        expected = {
            r.input_id
            for r in rows.values()
            if r.state in PENDING_STATES and not claim_is_live(r.claim, lease, now)
        }
        assert listed == expected

    @invariant()
    def event_log_is_gapless(self) -> None:
        page = self.run(self.store.events_after(SID, 0))
        assert [e.seq for e in page.events] == list(range(1, page.last_seq + 1))


LeaseAndInputMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lease_and_input_state_machine = LeaseAndInputMachine.TestCase
