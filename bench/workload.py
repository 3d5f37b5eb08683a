"""The benchmark's input: ``turn_input.submit`` messages for S sessions x K inputs.

Every input carries a caller-chosen ``input_id`` and a unique ``source_key`` so a commit
observed on the observation exchange can be matched to its publish. Messages are ordered
round-robin over sessions (every session's first input, then every second input, ...),
which spreads load across sessions the way many independent conversations would.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

SUBMIT_TYPE = "turn_input.submit"


@dataclass(frozen=True, slots=True)
class Submission:
    """One input to publish: its identity and its wire body."""

    session_id: str
    source_key: str
    input_id: str
    body: bytes


def submit_body(session_id: str, source_key: str, input_id: str, text: str) -> bytes:
    """The CONTRACT.md ``turn_input.submit`` body for one next-turn text input."""
    return json.dumps(
        {
            "protocol_version": 1,
            "type": SUBMIT_TYPE,
            "session_id": session_id,
            "source_key": source_key,
            "input_id": input_id,
            "ingress": {"scope": "next_turn"},
            "input": {"items": [{"type": "text", "text": text}]},
        },
        separators=(",", ":"),
    ).encode()


def build_workload(
    sessions: int, inputs_per_session: int, tag: str | None = None
) -> list[Submission]:
    """All submissions of one run, round-robin over sessions."""
    tag = tag or uuid.uuid4().hex[:8]
    out: list[Submission] = []
    for k in range(inputs_per_session):
        for s in range(sessions):
            session_id = f"bench-{tag}-s{s}"
            source_key = f"bench:{tag}:{s}:{k}"
            input_id = f"ti_bench_{tag}_{s}_{k}"
            text = f"bench input {k} of session {s}"
            out.append(
                Submission(
                    session_id,
                    source_key,
                    input_id,
                    submit_body(session_id, source_key, input_id, text),
                )
            )
    return out
