"""Built-in tools every session can offer: time, arithmetic, sleeping, counting words.

They are small on purpose: enough for demos and for exercising the turn engine (``sleep``
makes a tool call that takes a while, to test cancellation and timeouts) without any
network or filesystem access.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from lash_core.clock import Clock, SystemClock
from lash_core.errors import ToolError
from lash_core.tools.calculator import (
    MAX_EXPRESSION_CHARS,
    CalculationError,
    calculate,
    format_number,
)
from lash_core.tools.registry import ToolRegistry

DEFAULT_MAX_SLEEP_S = 60.0


class NoArguments(BaseModel):
    """For tools that take no arguments."""

    model_config = ConfigDict(extra="forbid")


class CalculateArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: str = Field(
        min_length=1,
        max_length=MAX_EXPRESSION_CHARS,
        description="Arithmetic expression, e.g. '(3 + 4) * 2 ** 3 / sqrt(16)'",
    )


class SleepArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, description="How long to sleep, in seconds (capped)")


class WordCountArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="The text whose words to count")


def default_registry(
    *, clock: Clock | None = None, max_sleep_s: float = DEFAULT_MAX_SLEEP_S
) -> ToolRegistry:
    """A fresh registry with the built-in tools.

    ``clock`` feeds ``current_time`` (inject a manual clock for deterministic tests);
    ``max_sleep_s`` caps the ``sleep`` tool.
    """
    source = clock or SystemClock()
    registry = ToolRegistry()

    @registry.tool
    async def current_time(args: NoArguments) -> str:
        """The current date and time in UTC, as ISO 8601."""
        return datetime.fromtimestamp(source.now_ms() / 1000, tz=UTC).isoformat(
            timespec="milliseconds"
        )

    @registry.tool(name="calculate")
    async def calculate_tool(args: CalculateArgs) -> str:
        """Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses,
        pi, e, tau and abs, round, min, max, sqrt, floor, ceil, log, exp, sin, cos, tan."""
        try:
            return format_number(calculate(args.expression))
        except CalculationError as exc:
            raise ToolError(str(exc)) from exc

    @registry.tool(
        description="Wait for the given number of seconds, then report how long it slept. "
        f"At most {format_number(max_sleep_s)}s."
    )
    async def sleep(args: SleepArgs) -> str:
        seconds = min(args.seconds, max_sleep_s)
        await asyncio.sleep(seconds)
        return f"slept {format_number(seconds)}s"

    @registry.tool
    async def word_count(args: WordCountArgs) -> str:
        """Count the whitespace-separated words in a text."""
        return str(len(args.text.split()))

    return registry
