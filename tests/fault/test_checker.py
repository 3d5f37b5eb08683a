"""The invariant checker itself: it passes a clean history and catches every kind of
violation it claims to check (a checker that cannot fail proves nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lash_core.events import (
    DurableEvent,
    EventPayload,
    InputAdmitted,
    TurnCommitted,
    TurnStarted,
)
from lash_core.inputs import InputState, NextTurnIngress, PendingTurnInput, TextItem, TurnInput
from lash_core.leases import LeaseOwner, LeaseRow
from lash_core.outcomes import AssistantMessageFinish, Finished, Usage
from lash_core.store.base import EventPage, SessionView
from lash_core.transcript import MessageNode, to_transcript
from tests.fault.bus import Bus, Observed
from tests.fault.checker import CheckReport, Workload, check_invariants

SID = "s1"


@dataclass
class FakeStore:
    """Just the read side the checker uses, over a hand-written history."""

    inputs: list[PendingTurnInput] = field(default_factory=list)
    events: list[DurableEvent] = field(default_factory=list)
    messages: list[MessageNode] = field(default_factory=list)
    lease: LeaseRow | None = None

    async def now_ms(self) -> int:
        return 1_000

    async def list_inputs(self, session_id: str) -> list[PendingTurnInput]:
        return list(self.inputs)

    async def events_after(self, session_id: str, after_seq: int, limit: int = 1000) -> EventPage:
        evs = [e for e in self.events if e.seq > after_seq][:limit]
        return EventPage(session_id=session_id, after_seq=after_seq, events=evs)

    async def read_session(self, session_id: str, after_seq: int | None = None) -> SessionView:
        return SessionView(
            session_id=session_id,
            head_revision=0,
            last_seq=len(self.events),
            running_turn_id=None,
            messages=self.messages,
            pending_inputs=[],
        )

    async def read_lease(self, session_id: str) -> LeaseRow | None:
        return self.lease


class History:
    def __init__(self) -> None:
        self.store = FakeStore()
        self.workload = Workload()
        self.bus = Bus("amqp://unused", "ns")

    def _event(self, payload: EventPayload) -> None:
        seq = len(self.store.events) + 1
        ev = DurableEvent(session_id=SID, seq=seq, revision=0, payload=payload)
        self.store.events.append(ev)

    def admit(self, key: str, state: InputState = InputState.COMPLETED) -> str:
        text = f"<{key}>"
        self.workload.add(SID, key, text)
        rec = PendingTurnInput(
            input_id=f"ti_{key}",
            session_id=SID,
            source_key=key,
            ingress=NextTurnIngress(),
            submitted_ingress=NextTurnIngress(),
            state=state,
            enqueue_seq=len(self.store.inputs) + 1,
            input=TurnInput(items=[TextItem(text=text)]),
            enqueued_at_ms=0,
        )
        self.store.inputs.append(rec)
        self._event(InputAdmitted(input=rec.public()))
        return rec.input_id

    def start(self, turn: str, ids: list[str], gen: int) -> None:
        self._event(TurnStarted(turn_id=turn, input_ids=ids, lease_generation=gen))

    def commit(self, turn: str, ids: list[str], transcript: bool = True) -> None:
        texts = [f"<{i.removeprefix('ti_')}>" for i in ids]
        reply = "echo: " + "\n".join(texts)
        appended = [
            *(MessageNode(node_id=f"{turn}-{t}", turn_id=turn, role="user", text=t) for t in texts),
            MessageNode(node_id=turn, turn_id=turn, role="assistant", text=reply),
        ]
        if transcript:
            self.store.messages.extend(appended)
        self._event(
            TurnCommitted(
                turn_id=turn,
                outcome=Finished(finish=AssistantMessageFinish(text=reply)),
                messages=[to_transcript(n) for n in appended],
                usage=Usage(),
                input_ids=ids,
            )
        )

    def observe_all(self, skip: set[int] | None = None, twice: set[int] | None = None) -> None:
        for ev in self.store.events:
            if skip and ev.seq in skip:
                continue
            for _ in range(2 if twice and ev.seq in twice else 1):
                self.bus.observed.append(
                    Observed(SID, ev.seq, ev.type, f"{SID}:{ev.seq}", ev.to_wire(), 0.0)
                )

    async def check(self, **kw: Any) -> CheckReport:
        store: Any = self.store
        return await check_invariants(
            store, self.workload, self.bus, live_owner_ids=kw.get("live", set()), via_wire=False
        )


async def test_clean_history_with_a_superseded_turn_passes() -> None:
    h = History()
    a, b = h.admit("a"), h.admit("b")
    h.start("T1", [a, b], gen=1)  # its worker died
    h.start("T2", [a, b], gen=2)
    h.commit("T2", [a, b])
    h.observe_all(twice={2})
    report = await h.check()
    report.assert_ok()
    assert report.turns_superseded == 1 and report.observed_duplicates == 1
    assert report.turns_committed == 1


async def test_superseded_turn_that_commits_is_an_overlap() -> None:
    h = History()
    a = h.admit("a")
    h.start("T1", [a], gen=1)
    h.start("T2", [a], gen=2)
    h.commit("T2", [a])
    h.commit("T1", [a], transcript=False)
    h.observe_all()
    report = await h.check()
    assert report.overlaps == 1 and report.duplicated == 1


async def test_second_turn_of_the_same_generation_while_one_is_open_is_an_overlap() -> None:
    h = History()
    a, b = h.admit("a"), h.admit("b")
    h.start("T1", [a], gen=1)
    h.start("T2", [b], gen=1)
    h.commit("T2", [b])
    h.commit("T1", [a])
    h.observe_all()
    report = await h.check()
    assert report.overlaps >= 1


async def test_lost_stranded_holes_and_dangling_leases_are_caught() -> None:
    h = History()
    a = h.admit("a")
    h.admit("b", state=InputState.DEFERRED_NEXT_TURN)
    h.workload.add(SID, "never", "<never>")
    h.start("T1", [a], gen=1)
    h.commit("T1", [a])
    h.observe_all(skip={3})
    h.store.lease = LeaseRow(
        session_id=SID,
        owner=LeaseOwner(owner_id="gone", incarnation_id="i"),
        lease_token="t",
        fencing_token=1,
        expires_at_ms=5_000,
    )
    report = await h.check()
    assert report.stranded == 1
    assert report.lost == 1
    assert report.observed_holes == 1
    assert report.dangling_leases == 1
    assert (await h.check(live={"gone"})).dangling_leases == 0


async def test_message_of_an_uncommitted_turn_is_a_partial_commit() -> None:
    h = History()
    a = h.admit("a")
    h.start("T1", [a], gen=1)
    h.commit("T1", [a])
    h.store.messages.append(MessageNode(node_id="z", turn_id="T9", role="assistant", text="x"))
    h.observe_all()
    report = await h.check()
    assert any("in no turn.committed" in v for v in report.violations)


async def test_duplicated_transcript_message_is_caught() -> None:
    h = History()
    a = h.admit("a")
    h.start("T1", [a], gen=1)
    h.commit("T1", [a])
    h.store.messages.append(MessageNode(node_id="dup", role="user", text="<a>"))
    h.observe_all()
    report = await h.check()
    assert report.transcript_duplicates == 1 and report.violations
