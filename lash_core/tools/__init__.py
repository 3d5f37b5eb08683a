"""Tools a model can call: the registry and the built-ins."""

from lash_core.tools.builtins import default_registry
from lash_core.tools.registry import RegisteredTool, ToolErrorKind, ToolRegistry, ToolResult

__all__ = ["RegisteredTool", "ToolErrorKind", "ToolRegistry", "ToolResult", "default_registry"]
