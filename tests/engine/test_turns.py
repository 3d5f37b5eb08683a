"""The turn loop through ``SessionDriver.drain`` on both stores: commit, tools, errors, limits."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from lash_core.engine.driver import SessionDriver
from lash_core.errors import ProviderError
from lash_core.events import TurnActivity, TurnCommitted
from lash_core.inputs import InputState, NextTurnIngress, TextItem, TurnInput, TurnInputDraft
from lash_core.outcomes import Finished, Stopped
from lash_core.providers.base import ModelDone, ModelRequest, ProviderEvent, ToolCallRequest
from lash_core.store.base import Residency, Store
from lash_core.transcript import ToolCall, active_path, ingress_message_id
from tests.engine.support import agent, new_session_id, owner


async def admit(store: Store, sid: str, text: str, key: str | None = None) -> str:
    adm = await store.enqueue_input(
        TurnInputDraft(
            session_id=sid,
            source_key=key,
            ingress=NextTurnIngress(),
            input=TurnInput(items=[TextItem(text=text)]),
        )
    )
    return adm.record.input_id


async def transcript(store: Store, sid: str) -> list[tuple[str, str]]:
    state = await store.load_state(sid, Residency.FULL)
    return [(n.role, n.text) for n in active_path(state.nodes, state.leaf_node_id)]


async def committed_events(store: Store, sid: str) -> list[TurnCommitted]:
    page = await store.events_after(sid, 0)
    return [e.payload for e in page.events if isinstance(e.payload, TurnCommitted)]


async def test_a_turn_commits_exactly_once_and_reads_back(store: Store) -> None:
    sid = new_session_id()
    input_id = await admit(store, sid, "hello", key="host:1")
    driver = SessionDriver(store, agent(), owner("w1"))

    report = await driver.drain(sid)

    assert report.acquired and not report.lease_lost
    assert len(report.turns) == 1
    turn = report.turns[0]
    assert turn.input_ids == [input_id]
    assert isinstance(turn.outcome, Finished)
    assert turn.outcome.finish.text == "echo: hello"  # type: ignore[union-attr]
    assert [e.type for e in turn.events] == ["turn.started", "turn.committed"]
    assert await transcript(store, sid) == [("user", "hello"), ("assistant", "echo: hello")]
    state = await store.load_state(sid)
    assert any(n.node_id == ingress_message_id(input_id) for n in state.nodes)
    record = await store.get_input(sid, input_id)
    assert record is not None and record.state is InputState.COMPLETED
    # Nothing left: a second drain runs no turn and does not even take the lease.
    again = await driver.drain(sid)
    assert again.idle and not again.acquired and again.turns == []
    assert len(await committed_events(store, sid)) == 1
    lease = await store.read_lease(sid)
    assert lease is not None and lease.lease_token is None


async def test_queued_inputs_merge_into_one_turn_and_context_carries_over(store: Store) -> None:
    sid = new_session_id()
    ids = [await admit(store, sid, f"m{i}") for i in range(3)]
    driver = SessionDriver(store, agent(), owner("w1"))
    report = await driver.drain(sid)
    assert len(report.turns) == 1 and report.turns[0].input_ids == ids
    await admit(store, sid, "next")
    report = await driver.drain(sid)
    assert len(report.turns) == 1
    roles = [r for r, _ in await transcript(store, sid)]
    assert roles == ["user", "user", "user", "assistant", "user", "assistant"]
    usage = (await store.load_state(sid)).usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0


async def test_tool_calls_through_the_echo_tool_trigger(store: Store) -> None:
    sid = new_session_id()
    seen: list[TurnActivity] = []

    async def sink(activity: TurnActivity) -> None:
        seen.append(activity)

    await admit(
        store, sid, '/tool calculate {"expression": "6*7"}\n/tool word_count {"text": "a b c"}'
    )
    driver = SessionDriver(store, agent(), owner("w1"), on_activity=sink)
    report = await driver.drain(sid)
    turn = report.turns[0]
    assert isinstance(turn.outcome, Finished)
    text = turn.outcome.finish.text  # type: ignore[union-attr]
    assert "calculate: 42" in text and "word_count: 3" in text
    state = await store.load_state(sid)
    path = active_path(state.nodes, state.leaf_node_id)
    assert [n.role for n in path] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c.name for c in path[1].tool_calls] == ["calculate", "word_count"]
    assert {n.tool_call_id for n in path[2:4]} == {c.id for c in path[1].tool_calls}
    kinds = [a.activity.kind for a in seen]
    assert kinds.count("tool_call") == 2 and kinds.count("tool_result") == 2
    assert "text_delta" in kinds
    assert all(a.turn_id == turn.turn_id for a in seen)


class FailingProvider:
    provider_id = "failing"
    model = "failing"

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        raise ProviderError("upstream returned 503", retryable=True, status=503)
        yield  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        return None


async def test_provider_error_stops_the_turn_and_completes_the_input(store: Store) -> None:
    sid = new_session_id()
    input_id = await admit(store, sid, "hi")
    driver = SessionDriver(store, agent(provider=FailingProvider()), owner("w1"))
    report = await driver.drain(sid)
    outcome = report.turns[0].outcome
    assert isinstance(outcome, Stopped) and outcome.stop == "provider_error"
    assert "503" in (outcome.message or "")
    record = await store.get_input(sid, input_id)
    assert record is not None and record.state is InputState.COMPLETED
    assert await transcript(store, sid) == [("user", "hi")]
    events = await committed_events(store, sid)
    assert len(events) == 1 and events[0].outcome.kind == "stopped"


class ExplodingTools:
    def specs(self) -> list[Any]:
        return []

    def catalog_hash(self) -> str:
        return "none"

    async def call_many(self, calls: Sequence[ToolCall], *, timeout_s: float | None = None) -> Any:
        raise RuntimeError("tool host crashed")


async def test_unexpected_error_is_a_committed_runtime_error(store: Store) -> None:
    sid = new_session_id()
    input_id = await admit(store, sid, '/tool sleep {"seconds": 0}')
    driver = SessionDriver(store, agent(tools=ExplodingTools()), owner("w1"))
    report = await driver.drain(sid)
    outcome = report.turns[0].outcome
    assert isinstance(outcome, Stopped) and outcome.stop == "runtime_error"
    assert "tool host crashed" in (outcome.message or "")
    record = await store.get_input(sid, input_id)
    assert record is not None and record.state is InputState.COMPLETED
    # The committed transcript never leaves a tool call unanswered.
    roles = [r for r, _ in await transcript(store, sid)]
    assert roles == ["user", "assistant", "tool"]


class LoopingProvider:
    """Asks for a tool on every call: only ``max_iterations`` ends the turn."""

    provider_id = "looping"
    model = "looping"

    async def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        n = sum(1 for m in request.messages if m.role == "assistant")
        yield ToolCallRequest(call=ToolCall(id=f"c{n}", name="sleep", arguments={"seconds": 0}))
        yield ModelDone()

    async def aclose(self) -> None:
        return None


async def test_max_iterations_stops_as_max_turns(store: Store) -> None:
    sid = new_session_id()
    await admit(store, sid, "loop")
    driver = SessionDriver(store, agent(provider=LoopingProvider(), max_iterations=3), owner("w1"))
    report = await driver.drain(sid)
    outcome = report.turns[0].outcome
    assert isinstance(outcome, Stopped) and outcome.stop == "max_turns"
    roles = [r for r, _ in await transcript(store, sid)]
    assert roles == ["user"] + ["assistant", "tool"] * 3


async def test_trace_turn_id_names_the_turn_and_a_reused_one_still_commits(store: Store) -> None:
    sid = new_session_id()
    driver = SessionDriver(store, agent(), owner("w1"))
    for text in ("one", "two"):
        await store.enqueue_input(
            TurnInputDraft(
                session_id=sid,
                input=TurnInput(items=[TextItem(text=text)], trace_turn_id="trace-1"),
            )
        )
        report = await driver.drain(sid)
        assert len(report.turns) == 1
    events = await committed_events(store, sid)
    assert events[0].turn_id == "trace-1"
    assert events[1].turn_id != "trace-1" and len(events) == 2
    assert [t for _, t in await transcript(store, sid)] == ["one", "echo: one", "two", "echo: two"]


async def test_max_turns_bounds_one_drain(store: Store) -> None:
    sid = new_session_id()
    driver = SessionDriver(store, agent(), owner("w1"))
    await admit(store, sid, "a")
    report = await driver.drain(sid, max_turns=0)
    assert report.turns == []
    pending = await store.list_pending_inputs(sid)
    assert len(pending) == 1
    report = await driver.drain(sid, max_turns=1)
    assert len(report.turns) == 1
