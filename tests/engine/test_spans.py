"""The engine traces its steps through ``AgentConfig.span`` (the service plugs in
OpenTelemetry): one ``lash.turn`` per turn, around its ``lash.model_call``s and
``lash.tool_call``s, and a ``lash.commit`` for the final commit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from lash_core.engine.driver import SessionDriver
from lash_core.store.memory import InMemoryStore
from tests.engine.support import agent, new_session_id, owner
from tests.engine.test_turns import admit


async def test_a_tool_turn_is_traced_step_by_step() -> None:
    spans: list[tuple[str, str, dict[str, Any]]] = []
    depth: list[str] = []

    @contextlib.contextmanager
    def record(name: str, **attributes: Any) -> Iterator[None]:
        spans.append((name, depth[-1] if depth else "", attributes))
        depth.append(name)
        try:
            yield
        finally:
            depth.pop()

    store = InMemoryStore()
    sid = new_session_id()
    await admit(store, sid, '/tool calculate {"expression": "6*7"}')
    report = await SessionDriver(store, agent(span=record), owner("w")).drain(sid)
    assert len(report.turns) == 1
    turn_id = report.turns[0].turn_id
    assert [(name, parent) for name, parent, _ in spans] == [
        ("lash.turn", ""),
        ("lash.model_call", "lash.turn"),
        ("lash.tool_call", "lash.turn"),
        ("lash.model_call", "lash.turn"),
        ("lash.commit", ""),
    ]
    assert spans[0][2] == {"session_id": sid, "turn_id": turn_id, "lease_generation": 1}
    assert spans[1][2]["provider"] == "echo"
    assert spans[2][2]["tools"] == "calculate" and spans[2][2]["calls"] == 1
    assert spans[4][2] == {"session_id": sid}
