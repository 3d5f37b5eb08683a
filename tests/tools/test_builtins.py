"""The built-in tools and the safe calculator."""

from __future__ import annotations

import asyncio
import time

import pytest

from lash_core.clock import ManualClock
from lash_core.tools import default_registry
from lash_core.tools.calculator import CalculationError, calculate, format_number
from lash_core.transcript import ToolCall


def call(name: str, **arguments: object) -> ToolCall:
    return ToolCall(id="c1", name=name, arguments=arguments)


def test_default_catalog() -> None:
    registry = default_registry()
    assert registry.names() == ["current_time", "calculate", "sleep", "word_count"]
    assert all(spec.description for spec in registry.specs())
    assert default_registry().catalog_hash() == registry.catalog_hash()


async def test_current_time_uses_the_clock() -> None:
    clock = ManualClock(start_ms=1_700_000_000_123)
    result = await default_registry(clock=clock).call(call("current_time"))
    assert result.ok
    assert result.output == "2023-11-14T22:13:20.123+00:00"


async def test_calculate_tool() -> None:
    registry = default_registry()
    ok = await registry.call(call("calculate", expression="(3 + 4) * 2 ** 3 / sqrt(16)"))
    assert (ok.ok, ok.output) == (True, "14")
    bad = await registry.call(call("calculate", expression="__import__('os').system('true')"))
    assert bad.error_kind == "tool_error"
    zero = await registry.call(call("calculate", expression="1/0"))
    assert (zero.error_kind, zero.output) == ("tool_error", "division by zero")
    missing = await registry.call(call("calculate"))
    assert missing.error_kind == "invalid_arguments"


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("-(2 - 5)", 3),
        ("7 // 2", 3),
        ("7 % 4", 3),
        ("2 ** 10", 1024),
        ("1 / 4", 0.25),
        ("abs(-3) + max(1, 5, 2) - min(4, 2)", 6),
        ("round(2.567, 2)", 2.57),
        ("floor(2.7) + ceil(2.1)", 5),
    ],
)
def test_calculator_evaluates(expression: str, expected: float) -> None:
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "import os",
        "os.system('x')",
        "__import__('os')",
        "(1).__class__",
        "[1, 2]",
        "'text' * 3",
        "x + 1",
        "2 ** 100000",
        "10 ** 10 ** 10",
        "(-8) ** 0.5",
        "sqrt(-1)",
        "exp(100000)",
        "True + 1",
        "max()",
        "lambda: 1",
        "1 if 1 else 2",
        "1" * 1001,
        "-" * 60 + "1",
        "1+" * 499 + "1",
    ],
)
def test_calculator_rejects(expression: str) -> None:
    with pytest.raises(CalculationError):
        calculate(expression)


def test_format_number() -> None:
    assert format_number(14.0) == "14"
    assert format_number(0.1 + 0.2) == "0.30000000000000004"
    assert format_number(10**20) == "100000000000000000000"
    assert format_number(1e20) == "1e+20"


async def test_sleep_is_capped_and_cancellable() -> None:
    registry = default_registry(max_sleep_s=0.05)
    started = time.monotonic()
    result = await registry.call(call("sleep", seconds=100))
    assert result.output == "slept 0.05s"
    assert time.monotonic() - started < 2
    negative = await registry.call(call("sleep", seconds=-1))
    assert negative.error_kind == "invalid_arguments"

    long = default_registry(max_sleep_s=60)
    task = asyncio.create_task(long.call(call("sleep", seconds=60)))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1


async def test_sleep_times_out_under_a_call_timeout() -> None:
    result = await default_registry().call(call("sleep", seconds=10), timeout_s=0.05)
    assert result.error_kind == "timeout"


async def test_word_count() -> None:
    result = await default_registry().call(call("word_count", text="  one two\nthree\tfour "))
    assert (result.ok, result.output) == (True, "4")
    extra = await default_registry().call(call("word_count", text="a", unexpected=1))
    assert extra.error_kind == "invalid_arguments"
