"""Invariant checks over observed events, shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from consumer.producer import Observer, Producer


def durable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Durable events, deduplicated by ``(session_id, seq)`` (delivery is at least once)."""
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for event in events:
        if event.get("durable") is False:
            continue
        key = (event["session_id"], event["seq"])
        if key in seen:
            assert seen[key] == event, f"two different events share {key}"
        seen[key] = event
    return [seen[k] for k in sorted(seen)]


def by_session(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in durable(events):
        out[event["session_id"]].append(event)
    return out


def assert_gapless(events: list[dict[str, Any]]) -> None:
    for session_id, evs in by_session(events).items():
        seqs = [e["seq"] for e in evs]
        assert seqs == list(range(1, len(seqs) + 1)), f"{session_id}: seq has holes: {seqs}"


def assert_turns_never_overlap(events: list[dict[str, Any]]) -> None:
    """Per session, in seq order: started t1, committed t1, started t2, committed t2, ..."""
    for session_id, evs in by_session(events).items():
        running: str | None = None
        for e in evs:
            if e["type"] == "turn.started":
                assert running is None, f"{session_id}: {e['turn_id']} started during {running}"
                running = e["turn_id"]
            elif e["type"] == "turn.committed":
                assert running == e["turn_id"], (
                    f"{session_id}: commit of {e['turn_id']} while {running}"
                )
                running = None


def committed_inputs(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per session, the input ids completed by committed turns, in commit order."""
    out: dict[str, list[str]] = defaultdict(list)
    for session_id, evs in by_session(events).items():
        for e in evs:
            if e["type"] == "turn.committed":
                out[session_id].extend(e["input_ids"])
    return out


def assert_message_properties(observer: Observer) -> None:
    """Every durable event: message_id <session>:<seq>, type property, session_id header."""
    for env in observer.envelopes:
        body = env["body"]
        assert env["type"] == body["type"]
        assert env["headers"].get("session_id") == body["session_id"]
        if body.get("durable") is not False:
            assert env["message_id"] == f"{body['session_id']}:{body['seq']}"


async def collect_until(
    observer: Observer,
    events: list[dict[str, Any]],
    done: Any,
    timeout_s: float = 60.0,
) -> None:
    """Append observed events to ``events`` until ``done(events)`` or the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not done(events):
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"condition not reached in {timeout_s}s; saw {len(events)} events")
        try:
            events.append(await observer.next(timeout_s=min(remaining, 1.0)))
        except TimeoutError:
            continue


async def wait_for_event(
    observer: Observer, events: list[dict[str, Any]], predicate: Any, timeout_s: float = 30.0
) -> dict[str, Any]:
    """The first event (already seen or arriving) matching ``predicate``."""
    found: list[dict[str, Any]] = []

    def done(evs: list[dict[str, Any]]) -> bool:
        found[:] = [e for e in evs if predicate(e)]
        return bool(found)

    await collect_until(observer, events, done, timeout_s)
    return found[0]


async def read_all_events(producer: Producer, session_id: str) -> list[dict[str, Any]]:
    read = await producer.read(session_id, after_seq=0)
    assert read.gap is False
    return [e.model_dump(mode="json") for e in read.events or []]
