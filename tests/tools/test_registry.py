"""The tool registry: registration, schemas, catalog hash and typed call results."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel, Field

from lash_core.errors import InvalidRequest, ToolError
from lash_core.providers.base import RAW_ARGUMENTS_KEY
from lash_core.tools import ToolRegistry, ToolResult
from lash_core.transcript import ToolCall


class EchoArgs(BaseModel):
    text: str = Field(description="What to repeat")
    times: int = Field(default=1, ge=1, le=5)


class Empty(BaseModel):
    pass


class Nap(BaseModel):
    label: str = ""
    seconds: float = 0.0


class Label(BaseModel):
    label: str


def make_registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool
    async def repeat(args: EchoArgs) -> str:
        """Repeat a text."""
        return " ".join([args.text] * args.times)

    @registry.tool(name="boom", description="Always fails.")
    async def explode(args: Empty) -> str:
        raise RuntimeError("kaboom")

    @registry.tool
    async def refuse(args: Empty) -> str:
        """Raises the typed tool error."""
        raise ToolError("not allowed here")

    @registry.tool
    async def structured(args: Empty) -> dict[str, object]:
        """Returns data, not text."""
        return {"answer": 42, "items": [1, 2]}

    return registry


def call(name: str, call_id: str = "c1", **arguments: object) -> ToolCall:
    return ToolCall(id=call_id, name=name, arguments=arguments)


def test_names_descriptions_and_schemas() -> None:
    registry = make_registry()
    assert registry.names() == ["repeat", "boom", "refuse", "structured"]
    assert "repeat" in registry
    assert len(registry) == 4
    specs = {spec.name: spec for spec in registry.specs()}
    assert specs["repeat"].description == "Repeat a text."
    assert specs["boom"].description == "Always fails."
    schema = specs["repeat"].parameters
    assert schema["type"] == "object"
    assert schema["required"] == ["text"]
    assert schema["properties"]["text"]["description"] == "What to repeat"
    assert schema["properties"]["times"]["maximum"] == 5
    assert specs["boom"].parameters["type"] == "object"


def test_register_without_decorator() -> None:
    registry = ToolRegistry()

    async def shout(args: EchoArgs) -> str:
        return args.text.upper()

    tool = registry.register(shout, description="Uppercase")
    assert tool.name == "shout"
    assert tool.args_model is EchoArgs
    assert registry.specs()[0].description == "Uppercase"


def test_specs_are_built_once_and_rebuilt_after_a_registration() -> None:
    registry = make_registry()
    first = registry.specs()
    again = registry.specs()
    assert first == again and all(a is b for a, b in zip(first, again, strict=True))
    again.clear()  # callers get their own list
    assert len(registry.specs()) == 4
    digest = registry.catalog_hash()

    async def late(args: Empty) -> str:
        return "late"

    registry.register(late, description="Registered after first use")
    assert [s.name for s in registry.specs()] == ["repeat", "boom", "refuse", "structured", "late"]
    assert registry.catalog_hash() != digest


def test_catalog_hash_is_stable_and_sensitive() -> None:
    first = make_registry().catalog_hash()
    assert first == make_registry().catalog_hash()
    assert len(first) == 64

    # Registration order does not matter.
    reordered = ToolRegistry()
    for name in reversed(make_registry().names()):
        tool = make_registry().get(name)
        assert tool is not None
        reordered.register(tool.func, name=tool.name, description=tool.description)
    assert reordered.catalog_hash() == first

    # Any change of the catalog does.
    extended = make_registry()

    @extended.tool
    async def extra(args: Empty) -> str:
        return ""

    assert extended.catalog_hash() != first
    assert ToolRegistry().catalog_hash() != first


@pytest.mark.parametrize(
    "bad",
    [
        "sync",
        "no_annotation",
        "not_a_model",
        "two_args",
        "bad_name",
        "duplicate",
    ],
)
def test_registration_errors(bad: str) -> None:
    registry = make_registry()

    def sync(args: Empty) -> str:
        return ""

    async def no_annotation(args):  # type: ignore[no-untyped-def]
        return ""

    async def not_a_model(args: dict[str, str]) -> str:
        return ""

    async def two_args(a: Empty, b: Empty) -> str:
        return ""

    async def fine(args: Empty) -> str:
        return ""

    with pytest.raises(InvalidRequest):
        if bad == "sync":
            registry.register(sync)  # type: ignore[arg-type]
        elif bad == "no_annotation":
            registry.register(no_annotation)
        elif bad == "not_a_model":
            registry.register(not_a_model)
        elif bad == "two_args":
            registry.register(two_args)  # type: ignore[arg-type]
        elif bad == "bad_name":
            registry.register(fine, name="has space")
        else:
            registry.register(fine, name="repeat")


def test_unresolvable_local_model_needs_args_model() -> None:
    class LocalArgs(BaseModel):
        n: int

    registry = ToolRegistry()

    async def local(args: LocalArgs) -> str:
        return str(args.n)

    with pytest.raises(InvalidRequest, match="args_model"):
        registry.register(local)

    @registry.tool(args_model=LocalArgs)
    async def local_ok(args: LocalArgs) -> str:
        return str(args.n)

    assert registry.specs()[0].parameters["required"] == ["n"]


def test_async_callable_object_is_accepted() -> None:
    class Counter:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(self, args: Empty) -> str:
            self.calls += 1
            return str(self.calls)

    registry = ToolRegistry()
    registry.register(Counter(), name="counter")
    assert registry.names() == ["counter"]


async def test_successful_call() -> None:
    result = await make_registry().call(call("repeat", text="hi", times=3))
    assert result == ToolResult(
        call_id="c1", tool_name="repeat", ok=True, output="hi hi hi", error_kind=None
    )


async def test_structured_output_is_json() -> None:
    result = await make_registry().call(call("structured"))
    assert result.ok
    assert result.output == '{"answer": 42, "items": [1, 2]}'


async def test_unknown_tool_is_a_result() -> None:
    result = await make_registry().call(call("missing"))
    assert not result.ok
    assert result.error_kind == "unknown_tool"
    assert "missing" in result.output
    assert result.tool_name == "missing"


async def test_invalid_arguments_are_a_result() -> None:
    registry = make_registry()
    wrong_type = await registry.call(call("repeat", text="hi", times="many"))
    assert wrong_type.error_kind == "invalid_arguments"
    assert "times" in wrong_type.output
    missing = await registry.call(call("repeat"))
    assert missing.error_kind == "invalid_arguments"
    assert "text" in missing.output
    out_of_range = await registry.call(call("repeat", text="x", times=9))
    assert out_of_range.error_kind == "invalid_arguments"


async def test_unparseable_model_arguments_are_invalid() -> None:
    result = await make_registry().call(
        ToolCall(id="c9", name="repeat", arguments={RAW_ARGUMENTS_KEY: "{text: hi"})
    )
    assert result.error_kind == "invalid_arguments"
    assert "{text: hi" in result.output


async def test_tool_exceptions_are_results() -> None:
    registry = make_registry()
    crashed = await registry.call(call("boom"))
    assert crashed.error_kind == "tool_error"
    assert crashed.output == "RuntimeError: kaboom"
    refused = await registry.call(call("refuse"))
    assert refused.error_kind == "tool_error"
    assert refused.output == "not allowed here"


async def test_timeout_is_a_result() -> None:
    registry = ToolRegistry()

    @registry.tool
    async def slow(args: Empty) -> str:
        await asyncio.sleep(30)
        return "done"

    @registry.tool
    async def raises_timeout(args: Empty) -> str:
        raise TimeoutError("upstream timed out")

    started = time.monotonic()
    result = await registry.call(call("slow"), timeout_s=0.1)
    assert time.monotonic() - started < 2
    assert result.error_kind == "timeout"
    assert not result.ok
    # A TimeoutError raised by the tool itself is a tool error, not our timeout.
    own = await registry.call(call("raises_timeout"), timeout_s=5)
    assert own.error_kind == "tool_error"
    assert "upstream timed out" in own.output


async def test_cancellation_propagates() -> None:
    registry = ToolRegistry()
    started_event = asyncio.Event()

    @registry.tool
    async def wait(args: Empty) -> str:
        started_event.set()
        await asyncio.sleep(30)
        return "never"

    task = asyncio.create_task(registry.call(call("wait")))
    await started_event.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_call_many_runs_concurrently_and_keeps_order() -> None:
    registry = ToolRegistry()
    running = 0
    peak = 0
    all_started = asyncio.Event()

    @registry.tool
    async def nap(args: Nap) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 3:
            all_started.set()
        # Each call waits until all three run at once: only concurrent execution finishes.
        await asyncio.wait_for(all_started.wait(), timeout=5)
        await asyncio.sleep(args.seconds)
        running -= 1
        return args.label

    calls = [
        call("nap", "a", label="first", seconds=0.15),
        call("nap", "b", label="second", seconds=0.0),
        call("missing", "c"),
        call("nap", "d", label="third", seconds=0.05),
    ]
    results = await registry.call_many(calls)
    assert [r.call_id for r in results] == ["a", "b", "c", "d"]
    assert [r.output for r in results if r.ok] == ["first", "second", "third"]
    assert results[2].error_kind == "unknown_tool"
    assert peak == 3
    assert await registry.call_many([]) == []


async def test_call_many_applies_the_timeout_per_call() -> None:
    registry = ToolRegistry()

    @registry.tool
    async def nap(args: Nap) -> str:
        await asyncio.sleep(args.seconds)
        return "ok"

    results = await registry.call_many(
        [call("nap", "fast", seconds=0), call("nap", "slow", seconds=30)], timeout_s=0.1
    )
    assert [r.error_kind for r in results] == [None, "timeout"]


async def test_cancelling_call_many_cancels_every_call() -> None:
    registry = ToolRegistry()
    cancelled: list[str] = []
    started = asyncio.Event()
    count = 0

    @registry.tool
    async def wait(args: Label) -> str:
        nonlocal count
        count += 1
        if count == 2:
            started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(args.label)
            raise
        return "never"

    task = asyncio.create_task(
        registry.call_many([call("wait", "1", label="x"), call("wait", "2", label="y")])
    )
    await asyncio.wait_for(started.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == ["x", "y"]
