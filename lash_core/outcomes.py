"""Turn outcomes and usage (lash-semantics §7, CONTRACT.md ``outcome``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from lash_core._model import Frozen


class AssistantMessageFinish(Frozen):
    kind: Literal["assistant_message"] = "assistant_message"
    text: str


class FinalValueFinish(Frozen):
    kind: Literal["final_value"] = "final_value"
    value: Any


class ToolValueFinish(Frozen):
    kind: Literal["tool_value"] = "tool_value"
    tool_name: str
    value: Any


TurnFinish = Annotated[
    AssistantMessageFinish | FinalValueFinish | ToolValueFinish, Field(discriminator="kind")
]

StopReason = Literal[
    "cancelled",
    "incomplete",
    "invalid_input",
    "max_turns",
    "tool_failure",
    "provider_error",
    "runtime_error",
]


class Finished(Frozen):
    kind: Literal["finished"] = "finished"
    finish: TurnFinish


class Stopped(Frozen):
    kind: Literal["stopped"] = "stopped"
    stop: StopReason
    message: str | None = None


TurnOutcome = Annotated[Finished | Stopped, Field(discriminator="kind")]


class Usage(Frozen):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    reasoning_output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
            cache_write_input_tokens=self.cache_write_input_tokens + other.cache_write_input_tokens,
            reasoning_output_tokens=self.reasoning_output_tokens + other.reasoning_output_tokens,
        )
