"""What an agent is made of: a provider, its tools, a system prompt and turn limits.

The engine only needs a narrow view of the tool registry (``specs``, ``catalog_hash`` and
``call_many``), so it is typed here as a structural protocol that
:class:`lash_core.tools.ToolRegistry` satisfies; tests may pass any object of that shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from lash_core.providers.base import Provider, ToolSpec
from lash_core.transcript import ToolCall


class ToolOutcome(Protocol):
    """The shape of one tool result (``lash_core.tools.ToolResult``)."""

    @property
    def call_id(self) -> str: ...

    @property
    def tool_name(self) -> str: ...

    @property
    def ok(self) -> bool: ...

    @property
    def output(self) -> str: ...


class ToolBox(Protocol):
    """The part of ``lash_core.tools.ToolRegistry`` the turn engine uses."""

    def specs(self) -> list[ToolSpec]: ...

    def catalog_hash(self) -> str: ...

    async def call_many(
        self, calls: Sequence[ToolCall], *, timeout_s: float | None = None
    ) -> Sequence[ToolOutcome]: ...


SpanFactory = Callable[..., AbstractContextManager[Any]]
"""``span(name, **attributes)``: a context manager around one traced step. The engine names
its spans ``lash.turn``, ``lash.model_call``, ``lash.tool_call`` and ``lash.commit``; a host
plugs in its tracer (the service passes OpenTelemetry's), the library default does nothing."""


@contextlib.contextmanager
def no_span(name: str, **attributes: Any) -> Iterator[None]:
    """The default :data:`SpanFactory`: traces nothing."""
    yield


@dataclass(frozen=True)
class AgentConfig:
    """The agent a driver runs. Immutable: one config serves many sessions concurrently."""

    provider: Provider
    tools: ToolBox
    system_prompt: str | None = None
    max_iterations: int = 16
    tool_timeout_s: float = 60.0
    span: SpanFactory = no_span
