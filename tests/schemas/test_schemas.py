"""The committed JSON Schemas match the models, and every example validates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

from consumer import wire
from lash_core.events import DurableEvent, InputAdmitted, TextDelta, TurnActivity
from lash_core.inputs import InputRecord, InputState, NextTurnIngress, TextItem, TurnInput
from schemas import EXAMPLES_DIR, SCHEMA_DIR
from schemas.generate import SCHEMAS, drifted, expected_files

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.json"))


def load_schema(stem: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{stem}.json").read_text(encoding="utf-8"))


def validator(stem: str) -> jsonschema.protocols.Validator:
    schema = load_schema(stem)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(
        schema, registry=Registry().with_resource(schema["$id"], Resource.from_contents(schema))
    )


def test_committed_schemas_match_the_models() -> None:
    stale = drifted()
    assert not stale, f"run `python -m schemas.generate`; drifted: {stale}"


def test_no_stray_schema_files() -> None:
    committed = {p.name for p in SCHEMA_DIR.glob("*.json")}
    assert committed == set(expected_files())


@pytest.mark.parametrize("stem", sorted(SCHEMAS))
def test_every_schema_is_valid_json_schema(stem: str) -> None:
    validator(stem)


def test_examples_cover_every_message_receipt_and_event_type() -> None:
    types = {json.loads(p.read_text())["type"] for p in EXAMPLES}
    expected = set(wire.MESSAGE_TYPES) | {"receipt", "session.read.result", "turn.activity"}
    expected |= {
        "input.admitted",
        "input.cancelled",
        "turn.started",
        "input.accepted",
        "turn.committed",
        "session.command_applied",
    }
    assert expected <= types


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates(path: Path) -> None:
    body = json.loads(path.read_text(encoding="utf-8"))
    kind = body["type"]
    validator(kind).validate(body)
    if kind in wire.MESSAGE_TYPES:
        validator("producer_message").validate(body)
        decoded = wire.decode_message(path.read_bytes(), 1 << 20)
        assert decoded.type == kind
    elif kind == "receipt":
        wire.Receipt.model_validate(body)
    elif kind == "session.read.result":
        wire.SessionReadResult.model_validate(body)
    else:
        validator("observation_event").validate(body)
        assert wire.parse_observation(body).type == kind


def test_required_tags_are_required_in_schemas() -> None:
    submit = load_schema("turn_input.submit")
    assert {"protocol_version", "type", "session_id", "input"} <= set(submit["required"])
    with pytest.raises(jsonschema.ValidationError):
        validator("turn_input.submit").validate(
            {"type": "turn_input.submit", "session_id": "s", "input": {"items": []}}
        )


def test_domain_wire_forms_match_the_event_schemas() -> None:
    record = InputRecord(
        input_id="ti_1",
        session_id="s",
        source_key="k",
        ingress=NextTurnIngress(),
        state=InputState.DEFERRED_NEXT_TURN,
        enqueue_seq=1,
        input=TurnInput(items=[TextItem(text="hi")]),
    )
    durable = DurableEvent(session_id="s", seq=1, revision=1, payload=InputAdmitted(input=record))
    validator("input.admitted").validate(durable.to_wire())
    validator("observation_event").validate(durable.to_wire())
    live = TurnActivity(
        session_id="s", seq=1, revision=1, turn_id="t", activity=TextDelta(text="x")
    )
    validator("turn.activity").validate(live.to_wire())
    assert wire.parse_observation(json.dumps(live.to_wire())).type == "turn.activity"
