"""The turn-commit hash (lash_core.commit) and event identity (lash_core.events)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lash_core.commit import FinalTurn, RuntimeCommit, turn_commit_hash
from lash_core.events import (
    CURSOR_PREFIX,
    CursorError,
    DurableEvent,
    InputCancelled,
    TextDelta,
    TurnActivity,
    make_cursor,
    parse_cursor,
    session_shard,
    wire_body,
    wire_envelope,
)
from lash_core.leases import LeaseFence, LeaseOwner
from lash_core.outcomes import AssistantMessageFinish, Finished, Usage
from lash_core.transcript import GraphAppend, MessageNode

OWNER = LeaseOwner(owner_id="w", incarnation_id="w1")


def _commit(**changes: object) -> RuntimeCommit:
    base = RuntimeCommit(
        session_id="s",
        graph=GraphAppend(
            nodes=[
                MessageNode(node_id="n1", role="user", text="hi", created_at_ms=1),
                MessageNode(
                    node_id="n2", parent_node_id="n1", role="assistant", text="yo", created_at_ms=2
                ),
            ],
            leaf_node_id="n2",
        ),
        checkpoint={"turn_index": 3, "timestamp": 111},
        usage=Usage(input_tokens=1),
        turn=FinalTurn(turn_id="t", outcome=Finished(finish=AssistantMessageFinish(text="yo"))),
    )
    return base.model_copy(update=changes)


def test_hash_ignores_lease_cas_fields() -> None:
    fence = LeaseFence(session_id="s", owner=OWNER, lease_token="x", fencing_token=4)
    h = turn_commit_hash(_commit())
    assert _commit(fence=fence, release_lease=True, expected_head_revision=9).commit_hash() == h


def test_hash_ignores_volatile_ids_and_timestamps() -> None:
    regenerated = GraphAppend(
        nodes=[
            MessageNode(node_id="x1", role="user", text="hi", created_at_ms=50),
            MessageNode(
                node_id="x2", parent_node_id="x1", role="assistant", text="yo", created_at_ms=51
            ),
        ],
        leaf_node_id="x2",
    )
    h = _commit().commit_hash()
    assert _commit(graph=regenerated).commit_hash() == h
    assert _commit(checkpoint={"turn_index": 3, "timestamp": 999}).commit_hash() == h


@pytest.mark.parametrize(
    "change",
    [
        {"checkpoint": {"turn_index": 4}},
        {"usage": Usage(input_tokens=2)},
        {"defer_active_inputs_of_turn": "t"},
        {"session_id": "other"},
        {
            "graph": GraphAppend(
                nodes=[MessageNode(node_id="n", role="user", text="HI")], leaf_node_id="n"
            )
        },
    ],
)
def test_hash_covers_content(change: dict[str, object]) -> None:
    assert _commit(**change).commit_hash() != _commit().commit_hash()


def test_cursor_round_trip_with_colons_in_the_session_id() -> None:
    cursor = make_cursor("tenant:chat:42", 5, 17)
    assert cursor == f"{CURSOR_PREFIX}:5:17:tenant:chat:42"
    assert parse_cursor(cursor) == ("tenant:chat:42", 5, 17)
    assert parse_cursor(cursor, "tenant:chat:42")[2] == 17


@pytest.mark.parametrize(
    "bad", ["", "lashsc1:1:2:", "lashsc2:1:2:s", "lashsc1:x:2:s", "lashsc1:1:y:s", "lashsc1:1"]
)
def test_malformed_cursors_are_rejected(bad: str) -> None:
    with pytest.raises(CursorError):
        parse_cursor(bad)


def test_cursor_of_another_session_is_rejected() -> None:
    with pytest.raises(CursorError):
        parse_cursor(make_cursor("a", 1, 1), "b")


def test_event_identity_and_wire_form() -> None:
    event = DurableEvent(
        session_id="chat:1", seq=3, revision=2, payload=InputCancelled(input_ids=["i"])
    )
    assert event.type == "input.cancelled"
    assert event.message_id == "chat:1:3"
    wire = event.to_wire()
    assert wire == {
        "protocol_version": 1,
        "session_id": "chat:1",
        "seq": 3,
        "revision": 2,
        "cursor": make_cursor("chat:1", 2, 3),
        "type": "input.cancelled",
        "input_ids": ["i"],
    }
    live = TurnActivity(
        session_id="chat:1", seq=3, revision=2, turn_id="t", activity=TextDelta(text="x")
    )
    body = live.to_wire()
    assert body["durable"] is False and body["seq"] == 3 and body["type"] == "turn.activity"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    payload=st.dictionaries(st.text().filter(lambda k: k not in wire_envelope("s", 1, 0)), _JSON),
    indent=st.sampled_from([None, 1]),
    sid=st.text(min_size=1),
)
def test_wire_body_splices_the_payload_after_the_envelope(
    payload: dict[str, object], indent: int | None, sid: str
) -> None:
    """Whatever the payload text's layout (PostgreSQL's jsonb output has spaces), the body
    is the envelope followed by the payload's fields, as ``to_wire`` builds it."""
    body = wire_body(sid, 7, 3, json.dumps(payload, indent=indent))
    assert json.loads(body) == {**wire_envelope(sid, 7, 3), **payload}
    assert list(json.loads(body))[:5] == list(wire_envelope(sid, 7, 3))


@pytest.mark.parametrize("bad", ["[1]", '"x"', "", "{"])
def test_wire_body_refuses_what_is_not_an_object(bad: str) -> None:
    with pytest.raises(ValueError):
        wire_body("s", 1, 0, bad)


def test_session_shard_is_stable_and_non_negative() -> None:
    assert session_shard("chat-42") == session_shard("chat-42")
    assert session_shard("chat-42") >= 0
    assert len({session_shard(f"s{n}") % 4 for n in range(64)}) == 4
