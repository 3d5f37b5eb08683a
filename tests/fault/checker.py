"""The invariant checker: what "nothing lost, nothing runs twice" means, checked against
the database (through the Store read API), the observed events and the wire.

Invariants, per session:

1. every submitted source key is one stored input, in state ``completed`` (none lost,
   none stranded pending, none admitted twice);
2. every input id appears in exactly one ``turn.committed`` ``input_ids``;
3. the durable event log has gapless ``seq`` 1..n (and ``session.read`` returns it so);
4. turns never overlap: in ``seq`` order a ``turn.committed`` closes the turn that is
   open, and a ``turn.started`` while another turn is open supersedes it, which needs a
   strictly newer lease generation - a superseded turn must never commit later;
5. the transcript holds every input's user text once and at most one echo of it, and
   exactly the messages the ``turn.committed`` events report (no partial commit);
6. observers saw every ``seq`` 1..n (duplicates allowed, holes not) with ``message_id``
   ``<session_id>:<seq>``;
7. no live lease is held by an owner that is not a running worker.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lash_core.events import DurableEvent
from lash_core.inputs import InputState
from lash_core.store.base import Store
from lash_core.transcript import MessageNode
from tests.fault.bus import Bus


@dataclass
class Workload:
    """What the test submitted: per session, the distinct source keys and their texts."""

    sessions: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, session_id: str, source_key: str, text: str) -> None:
        self.sessions.setdefault(session_id, {})[source_key] = text

    @property
    def input_count(self) -> int:
        return sum(len(v) for v in self.sessions.values())


@dataclass
class CheckReport:
    sessions: int = 0
    inputs: int = 0
    turns_committed: int = 0
    turns_superseded: int = 0
    superseded_turns: list[tuple[str, str, int]] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    stranded: int = 0
    seq_gaps: int = 0
    overlaps: int = 0
    observed_events: int = 0
    observed_holes: int = 0
    observed_duplicates: int = 0
    dangling_leases: int = 0
    transcript_duplicates: int = 0
    violations: list[str] = field(default_factory=list)
    events: dict[str, list[DurableEvent]] = field(default_factory=dict)

    def violation(self, text: str) -> None:
        self.violations.append(text)

    def figures(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "inputs": self.inputs,
            "turns_committed": self.turns_committed,
            "turns_superseded": self.turns_superseded,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "stranded": self.stranded,
            "seq_gaps": self.seq_gaps,
            "overlapping_turns": self.overlaps,
            "observed_events": self.observed_events,
            "observed_holes": self.observed_holes,
            "observed_duplicates": self.observed_duplicates,
            "dangling_leases": self.dangling_leases,
            "transcript_duplicates": self.transcript_duplicates,
            "violations": len(self.violations),
        }

    def assert_ok(self, context: str = "") -> None:
        if self.violations:
            shown = "\n  ".join(self.violations[:40])
            more = len(self.violations) - 40
            raise AssertionError(
                f"{len(self.violations)} invariant violations {context}:\n  {shown}"
                + (f"\n  ... and {more} more" if more > 0 else "")
            )


async def all_events(store: Store, session_id: str) -> tuple[list[DurableEvent], bool]:
    """The whole durable log of a session and whether the store reported a gap."""
    events: list[DurableEvent] = []
    after = 0
    gap = False
    while True:
        page = await store.events_after(session_id, after, limit=1000)
        gap = gap or page.gap
        if not page.events:
            return events, gap
        events.extend(page.events)
        after = page.events[-1].seq


async def wait_quiescent(
    store: Store, workload: Workload, bus: Bus, timeout_s: float
) -> dict[str, str]:
    """Wait until every submitted input is terminal and every durable event was observed.

    Returns the sessions still unsettled at the deadline (empty when all settled) with the
    reason, so a caller reports them instead of hanging.
    """
    deadline = time.monotonic() + timeout_s
    unsettled: dict[str, str] = {}
    while True:
        unsettled = {}
        seen = bus.events_by_session()
        for sid, keys in workload.sessions.items():
            rows = await store.list_inputs(sid)
            by_key = {r.source_key: r for r in rows}
            missing = [k for k in keys if k not in by_key]
            open_rows = [r for r in rows if r.state not in (InputState.COMPLETED,)]
            if missing:
                unsettled[sid] = f"{len(missing)} not admitted"
                continue
            if open_rows:
                unsettled[sid] = f"{len(open_rows)} not completed ({open_rows[0].state})"
                continue
            view = await store.read_session(sid)
            got = {e.seq for e in seen.get(sid, [])}
            if not set(range(1, view.last_seq + 1)) <= got:
                unsettled[sid] = f"observed {len(got)} of {view.last_seq} events"
                continue
            if view.running_turn_id is not None:
                unsettled[sid] = f"turn {view.running_turn_id} still running"
        if not unsettled or time.monotonic() > deadline:
            return unsettled
        await asyncio.sleep(0.25)


def _text_hits(texts: list[str], token: str) -> int:
    return sum(1 for t in texts if token in t)


async def check_invariants(
    store: Store,
    workload: Workload,
    bus: Bus,
    *,
    live_owner_ids: set[str],
    via_wire: bool = True,
) -> CheckReport:
    report = CheckReport(sessions=len(workload.sessions), inputs=workload.input_count)
    observed = bus.events_by_session()
    now_ms = await store.now_ms()
    for sid, keys in workload.sessions.items():
        rows = await store.list_inputs(sid)
        key_counts = Counter(r.source_key for r in rows)
        by_key = {r.source_key: r for r in rows}
        for key, n in key_counts.items():
            if key not in keys:
                report.violation(f"{sid}: unexpected input with source key {key!r}")
            if n > 1:
                report.duplicated += n - 1
                report.violation(f"{sid}: source key {key!r} admitted {n} times")
        for key in keys:
            row = by_key.get(key)
            if row is None:
                report.lost += 1
                report.violation(f"{sid}: source key {key!r} never admitted")
            elif row.state is not InputState.COMPLETED:
                report.stranded += 1
                report.violation(f"{sid}: input {row.input_id} left {row.state}")

        events, gap = await all_events(store, sid)
        report.events[sid] = events
        seqs = [e.seq for e in events]
        if gap or seqs != list(range(1, len(seqs) + 1)):
            report.seq_gaps += 1
            report.violation(f"{sid}: event seq not gapless: gap={gap} seqs={seqs[:50]}")

        committed: Counter[str] = Counter()
        outcome_of: dict[str, str] = {}
        open_turn: tuple[str, int] | None = None
        superseded: set[str] = set()
        for ev in events:
            p = ev.payload
            if p.type == "turn.started":
                if open_turn is not None:
                    old_id, old_gen = open_turn
                    if p.lease_generation <= old_gen:
                        report.overlaps += 1
                        report.violation(
                            f"{sid}: turn {p.turn_id} (gen {p.lease_generation}) started at "
                            f"seq {ev.seq} while {old_id} (gen {old_gen}) was open"
                        )
                    superseded.add(old_id)
                    report.superseded_turns.append((sid, old_id, old_gen))
                open_turn = (p.turn_id, p.lease_generation)
            elif p.type == "turn.committed":
                report.turns_committed += 1
                if open_turn is None or open_turn[0] != p.turn_id:
                    report.overlaps += 1
                    why = "superseded" if p.turn_id in superseded else "not open"
                    report.violation(
                        f"{sid}: turn {p.turn_id} committed at seq {ev.seq} but it was {why} "
                        f"(open: {open_turn})"
                    )
                open_turn = None
                for iid in p.input_ids:
                    committed[iid] += 1
                    outcome_of[iid] = p.outcome.kind
        report.turns_superseded += len(superseded)

        texts_user: list[str] = []
        texts_assistant: list[str] = []
        view = await store.read_session(sid)
        _check_transcript_matches_commits(report, sid, events, view.messages)
        for m in view.messages:
            if m.role == "user":
                texts_user.append(m.text)
            elif m.role == "assistant":
                texts_assistant.append(m.text)
        for key, text in keys.items():
            row = by_key.get(key)
            if row is None:
                continue
            n = committed.get(row.input_id, 0)
            if n == 0 and row.state is InputState.COMPLETED:
                report.lost += 1
                report.violation(f"{sid}: input {row.input_id} completed but in no turn.committed")
            elif n > 1:
                report.duplicated += 1
                report.violation(f"{sid}: input {row.input_id} committed in {n} turns")
            users = _text_hits(texts_user, text)
            echoes = _text_hits(texts_assistant, text)
            if row.state is InputState.COMPLETED and users != 1:
                report.transcript_duplicates += 1
                report.violation(f"{sid}: user text of {key!r} appears {users} times")
            if echoes > 1 or (outcome_of.get(row.input_id) == "finished" and echoes != 1):
                report.transcript_duplicates += 1
                report.violation(f"{sid}: assistant echo of {key!r} appears {echoes} times")

        lease = await store.read_lease(sid)
        if lease is not None and lease.is_live(now_ms):
            owner = lease.owner.owner_id if lease.owner else "?"
            if owner not in live_owner_ids:
                report.dangling_leases += 1
                report.violation(f"{sid}: live lease held by {owner}, which is not running")

        seen = observed.get(sid, [])
        report.observed_events += len(seen)
        distinct = {e.seq for e in seen}
        report.observed_duplicates += len(seen) - len(distinct)
        holes = set(range(1, len(seqs) + 1)) - distinct
        if holes:
            report.observed_holes += len(holes)
            report.violation(f"{sid}: observers never saw seq {sorted(holes)[:20]}")
        db_types = {e.seq: e.type for e in events}
        for ob in seen:
            if ob.message_id != f"{sid}:{ob.seq}":
                report.violation(f"{sid}: event seq {ob.seq} had message_id {ob.message_id!r}")
            if db_types.get(ob.seq) not in (None, ob.type):
                report.violation(
                    f"{sid}: seq {ob.seq} observed as {ob.type}, stored as {db_types.get(ob.seq)}"
                )

    if via_wire:
        await _check_session_read(bus, report)
    return report


def _check_transcript_matches_commits(
    report: CheckReport, sid: str, events: list[DurableEvent], messages: list[MessageNode]
) -> None:
    """No partial commit: the transcript holds exactly the messages the ``turn.committed``
    events report as appended - nothing of a turn that never committed, nothing twice."""
    expected: Counter[tuple[str | None, str, str]] = Counter()
    for ev in events:
        if ev.payload.type == "turn.committed":
            expected.update((m.turn_id, m.role, m.text) for m in ev.payload.messages)
    actual: Counter[tuple[str | None, str, str]] = Counter(
        (m.turn_id, m.role, m.text) for m in messages
    )
    missing, extra = expected - actual, actual - expected
    for (turn_id, role, text), n in list(missing.items())[:5]:
        report.violation(
            f"{sid}: {n}x committed {role} message of {turn_id} not in transcript ({text[:60]!r})"
        )
    for (turn_id, role, text), n in list(extra.items())[:5]:
        report.violation(
            f"{sid}: {n}x {role} message of {turn_id} in the transcript but in no "
            f"turn.committed ({text[:60]!r})"
        )


async def _check_session_read(bus: Bus, report: CheckReport) -> None:
    """``session.read`` with ``after_seq=0`` returns the same gapless log from a worker."""

    async def one(sid: str, events: list[DurableEvent]) -> None:
        result = await bus.session_read(sid, after_seq=0)
        wire = result.get("events") or []
        seqs = [int(e.get("seq", -1)) for e in wire]
        if result.get("gap") or seqs != [e.seq for e in events]:
            report.violation(
                f"{sid}: session.read returned seqs {seqs[:30]} gap={result.get('gap')} "
                f"(stored {len(events)})"
            )
        if int(result.get("last_seq", -1)) != len(events):
            report.violation(f"{sid}: session.read last_seq {result.get('last_seq')}")

    await asyncio.gather(*(one(sid, evs) for sid, evs in report.events.items()))
