"""The one streaming interface every model provider implements.

A provider turns a :class:`ModelRequest` (the conversation so far plus the tools on offer)
into a stream of :data:`ProviderEvent`: text chunks, tool-call requests, and exactly one
final :class:`ModelDone` carrying usage. Failures raise
:class:`lash_core.errors.ProviderError` (with ``retryable`` set where a retry may help);
providers retry transient failures themselves before raising.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field

from lash_core._model import Frozen
from lash_core.outcomes import Usage
from lash_core.transcript import Role, ToolCall

RAW_ARGUMENTS_KEY = "_raw"
"""When a model's tool-call arguments are not a JSON object, providers pass them on as
``{RAW_ARGUMENTS_KEY: "<the text>"}`` so the tool layer can report invalid arguments."""


class ChatMessage(Frozen):
    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


class ToolSpec(Frozen):
    """A tool as offered to the model: name, description, JSON Schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ModelRequest(Frozen):
    model: str
    messages: list[ChatMessage]
    tools: list[ToolSpec] = Field(default_factory=list)
    max_output_tokens: int | None = None


class TextChunk(Frozen):
    kind: Literal["text"] = "text"
    text: str


class ToolCallRequest(Frozen):
    kind: Literal["tool_call"] = "tool_call"
    call: ToolCall


class ModelDone(Frozen):
    kind: Literal["done"] = "done"
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str = "stop"


ProviderEvent = Annotated[TextChunk | ToolCallRequest | ModelDone, Field(discriminator="kind")]


class Provider(Protocol):
    """A model provider. ``provider_id`` is recorded in the session config."""

    @property
    def provider_id(self) -> str: ...

    @property
    def model(self) -> str: ...

    def stream(self, request: ModelRequest) -> AsyncIterator[ProviderEvent]:
        """Stream one model call. Cancelling the consuming task cancels the call."""
        ...

    async def aclose(self) -> None: ...
