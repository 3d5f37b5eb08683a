"""Generate the contract's JSON Schema files from the pydantic models.

Inbound messages are described as validated (what a producer may send); receipts and
events as serialized (what a worker emits). Output is deterministic so the committed files
can be compared byte for byte. Run ``python -m schemas.generate`` (``--check`` exits 1 and
names the drifted files instead of writing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter

from consumer import wire
from schemas import SCHEMA_DIR

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

Mode = Literal["validation", "serialization"]

# file stem -> (type or model, mode, description)
SCHEMAS: dict[str, tuple[Any, Mode, str]] = {
    "turn_input.submit": (wire.SubmitMessage, "validation", "Producer message"),
    "turn_input.cancel": (wire.TurnInputCancelMessage, "validation", "Producer message"),
    "turn_input.cancel_suffix": (
        wire.TurnInputCancelSuffixMessage,
        "validation",
        "Producer message",
    ),
    "turn.cancel": (wire.TurnCancelMessage, "validation", "Producer message"),
    "session.command": (wire.SessionCommandMessage, "validation", "Producer message"),
    "session.read": (wire.SessionReadMessage, "validation", "Producer message"),
    "producer_message": (
        wire.ProducerMessage,
        "validation",
        "Any message published to {ns}.ingress (routing key = type)",
    ),
    "receipt": (wire.Receipt, "serialization", "Receipt sent to reply_to"),
    "session.read.result": (
        wire.SessionReadResult,
        "serialization",
        "Answer to session.read sent to reply_to",
    ),
    "input.admitted": (wire.InputAdmittedEvent, "serialization", "Durable observation event"),
    "input.cancelled": (wire.InputCancelledEvent, "serialization", "Durable observation event"),
    "turn.started": (wire.TurnStartedEvent, "serialization", "Durable observation event"),
    "input.accepted": (wire.InputAcceptedEvent, "serialization", "Durable observation event"),
    "turn.committed": (wire.TurnCommittedEvent, "serialization", "Durable observation event"),
    "session.command_applied": (
        wire.CommandAppliedEvent,
        "serialization",
        "Durable observation event",
    ),
    "turn.activity": (wire.TurnActivityEvent, "serialization", "Live observation event"),
    "observation_event": (
        wire.ObservationEvent,
        "serialization",
        "Any message published to {ns}.observations",
    ),
}


def _require_constants(node: Any) -> None:
    """Mark every constant field with a default as required, recursively.

    The models default their tags (``protocol_version``, ``type``, ``kind``, ``scope``,
    ``durable``) so Python callers need not repeat them, but they are always present on the
    wire and pydantic needs the tag of a discriminated union, so the schema requires them.
    """
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            required = list(node.get("required", []))
            for name, prop in props.items():
                if isinstance(prop, dict) and "const" in prop and name not in required:
                    required.append(name)
            if required:
                node["required"] = required
        for value in node.values():
            _require_constants(value)
    elif isinstance(node, list):
        for value in node:
            _require_constants(value)


def schema_for(stem: str) -> dict[str, Any]:
    target, mode, description = SCHEMAS[stem]
    if isinstance(target, type) and issubclass(target, BaseModel):
        body = target.model_json_schema(mode=mode)
    else:
        body = TypeAdapter(target).json_schema(mode=mode)
    _require_constants(body)
    head: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"https://lash-consumer.invalid/schemas/{stem}.json",
        "title": stem,
    }
    if "description" not in body:
        head["description"] = description
    head.update({k: v for k, v in body.items() if k != "title"})
    return head


def render(stem: str) -> str:
    return json.dumps(schema_for(stem), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def expected_files() -> dict[str, str]:
    return {f"{stem}.json": render(stem) for stem in SCHEMAS}


def drifted(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing or differ from what the models generate."""
    out = []
    for name, text in expected_files().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            out.append(name)
    return out


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    written = []
    for name, text in expected_files().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--check" in args:
        stale = drifted()
        for name in stale:
            print(f"drifted: schemas/{name}")
        return 1 if stale else 0
    for name in write():
        print(f"wrote schemas/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
