"""Model providers behind one streaming interface."""

from lash_core.providers.base import (
    ChatMessage,
    ModelDone,
    ModelRequest,
    Provider,
    ProviderEvent,
    TextChunk,
    ToolCallRequest,
    ToolSpec,
)

__all__ = [
    "ChatMessage",
    "ModelDone",
    "ModelRequest",
    "Provider",
    "ProviderEvent",
    "TextChunk",
    "ToolCallRequest",
    "ToolSpec",
]
