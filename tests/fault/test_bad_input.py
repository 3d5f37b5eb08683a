"""Bad input generated with hypothesis: every message is dead-lettered with its reason and
answered ``rejected``, and the same worker keeps serving valid traffic."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fault import figures
from tests.fault.conftest import HarnessFactory

pytestmark = [pytest.mark.fault, pytest.mark.postgres, pytest.mark.rabbitmq]

MAX_BYTES = 16384
EXAMPLES = 40
KNOWN_TYPES = {
    "turn_input.submit",
    "turn_input.cancel",
    "turn_input.cancel_suffix",
    "turn.cancel",
    "session.command",
    "session.read",
}
VALID: dict[str, Any] = {
    "protocol_version": 1,
    "type": "turn_input.submit",
    "session_id": "bad-input-session",
    "source_key": "k",
    "input": {"items": [{"type": "text", "text": "hello"}]},
}
letters = st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=12)


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except ValueError:
        return False


def _with(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(VALID)
    target: Any = body
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return body


def _without(key: str) -> dict[str, Any]:
    body = copy.deepcopy(VALID)
    del body[key]
    return body


WRONG_TYPES: list[tuple[tuple[str | int, ...], Any]] = [
    (("session_id",), 42),
    (("session_id",), ["a"]),
    (("session_id",), None),
    (("session_id",), {"id": "x"}),
    (("session_id",), ""),
    (("session_id",), "x" * 300),
    (("session_id",), "bad\nid"),
    (("session_id",), "nul\x00id"),
    (("input",), "just a string"),
    (("input",), 7),
    (("input", "items"), "x"),
    (("input", "items"), []),
    (("input", "items", 0, "text"), 5),
    (("input", "items", 0, "text"), None),
    (("input", "items", 0, "type"), "video"),
    (("ingress",), "next"),
    (("ingress",), {"scope": "sideways"}),
    (("ingress",), {"scope": "active_turn"}),
    (("source_key",), ["k"]),
]

random_bytes = (
    st.binary(max_size=300)
    .filter(lambda b: not _is_json_object(b))
    .map(lambda b: ("random_bytes", b))
)
not_an_object = st.one_of(st.integers(), st.text(max_size=20), st.lists(st.integers()), st.none())
not_object = not_an_object.map(lambda v: ("not_an_object", json.dumps(v).encode()))
wrong_types = st.sampled_from(WRONG_TYPES).map(
    lambda pv: ("wrong_type", json.dumps(_with(pv[0], pv[1])).encode())
)
missing = st.sampled_from(["protocol_version", "type", "session_id", "input"]).map(
    lambda k: ("missing_field", json.dumps(_without(k)).encode())
)
unknown_version = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40).filter(lambda v: v != 1),
    letters,
    st.none(),
    st.just([1]),
).map(lambda v: ("unknown_version", json.dumps(_with(("protocol_version",), v)).encode()))
unknown_type = letters.filter(lambda t: t not in KNOWN_TYPES).map(
    lambda t: ("unknown_type", json.dumps(_with(("type",), t)).encode())
)
invalid_utf8 = st.sampled_from(
    [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf8\x88"]
).map(
    lambda bad: (
        "invalid_utf8",
        json.dumps(_with(("input", "items", 0, "text"), "@@BAD@@"))
        .encode()
        .replace(b"@@BAD@@", bad),
    )
)
huge = st.integers(min_value=1, max_value=4 * MAX_BYTES).map(
    lambda n: (
        "too_large",
        json.dumps(_with(("input", "items", 0, "text"), "x" * (MAX_BYTES + n))).encode(),
    )
)
KINDS = [
    random_bytes,
    not_object,
    wrong_types,
    missing,
    unknown_version,
    unknown_type,
    invalid_utf8,
    huge,
]


def generate(count: int) -> list[tuple[str, bytes]]:
    """About ``count`` bad messages spread over every kind, reproducibly (derandomized)."""
    out: list[tuple[str, bytes]] = []
    per_kind = max(1, count // len(KINDS))
    for strategy in KINDS:
        found = _collect(strategy, per_kind)
        out.extend(found[:per_kind])
    return out


def _collect(strategy: st.SearchStrategy[tuple[str, bytes]], n: int) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []

    @settings(
        max_examples=n,
        database=None,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: tuple[str, bytes]) -> None:
        if example not in found:
            found.append(example)

    collect()
    return found


async def test_bad_input_is_dead_lettered_and_rejected(make_harness: HarnessFactory) -> None:
    async with make_harness(echo_delay_ms=20, max_message_bytes=MAX_BYTES) as h:
        (worker,) = await h.fleet.start(1)
        await h.bus.watch_dead_letters()
        cases = generate(EXAMPLES)
        kinds: dict[str, str] = {}
        bodies: dict[str, bytes] = {}
        for i, (kind, body) in enumerate(cases):
            case_id = f"{h.namespace}-bad-{i}"
            kinds[case_id], bodies[case_id] = kind, body
            routing_key = "turn_input.submit" if kind != "unknown_type" else "unknown.type"
            await h.bus.publish_raw(
                body,
                routing_key,
                message_id=case_id,
                correlation_id=case_id,
                reply=True,
                headers={"x-test-case": case_id},
            )

        def dead_lettered() -> dict[str, Any]:
            return {str(d.headers.get("x-test-case")): d for d in h.bus.dead_letters}

        await h.bus.wait_for(
            lambda: (
                all(h.bus.receipts.get(c) for c in kinds) and set(kinds) <= set(dead_lettered())
            ),
            60,
            "a receipt and a dead letter for every bad message",
        )
        problems: list[str] = []
        codes: dict[str, int] = {}
        dls = dead_lettered()
        for case_id, kind in kinds.items():
            receipts = h.bus.receipts[case_id]
            r = receipts[0].body
            err = r.get("error") or {}
            if len(receipts) != 1 or r.get("status") != "rejected" or not err.get("code"):
                problems.append(f"{kind} {case_id}: receipts {[x.body for x in receipts]}")
            dl = dls[case_id]
            code = dl.headers.get("x-lash-error-code")
            codes[str(code)] = codes.get(str(code), 0) + 1
            if not code or not dl.headers.get("x-lash-error-message"):
                problems.append(f"{kind} {case_id}: dead letter headers {dl.headers}")
            if dl.body != bodies[case_id]:
                problems.append(f"{kind} {case_id}: dead letter body differs from the original")
        assert worker.alive(), f"worker died on bad input\n{worker.log_tail(60)}"

        # The same worker still serves valid traffic.
        await h.submit_many(h.session_ids(3), 2)
        report = await h.settle_and_check(timeout_s=30)
        for msg in problems:
            report.violation(msg)
        assert worker.alive() and len(h.fleet.workers) == 1
        figures.record(
            "bad_input",
            h.figures(
                report,
                dead_lettered=len(dls),
                bad_messages=len(kinds),
                bad_kinds=sorted(set(kinds.values())),
                error_codes=codes,
            ),
        )
        report.assert_ok(h.diagnostics())
