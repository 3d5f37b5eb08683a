"""Model providers behind one streaming interface."""

from lash_core.providers.base import (
    RAW_ARGUMENTS_KEY,
    ChatMessage,
    ModelDone,
    ModelRequest,
    Provider,
    ProviderEvent,
    TextChunk,
    ToolCallRequest,
    ToolSpec,
)
from lash_core.providers.echo import EchoProvider
from lash_core.providers.factory import PROVIDER_NAMES, build_provider
from lash_core.providers.openai import OpenAIProvider

__all__ = [
    "PROVIDER_NAMES",
    "RAW_ARGUMENTS_KEY",
    "ChatMessage",
    "EchoProvider",
    "ModelDone",
    "ModelRequest",
    "OpenAIProvider",
    "Provider",
    "ProviderEvent",
    "TextChunk",
    "ToolCallRequest",
    "ToolSpec",
    "build_provider",
]
