"""The model's view of a session: the active path as chat messages.

The transcript stores messages as graph nodes; a model call sees the system prompt and
then every node of the active path, in order, as :class:`ChatMessage`. An assistant
message whose tool calls have no tool result (a turn stopped in the middle of its tools)
gets synthetic error results so the conversation stays well formed for providers that
require every call to be answered.
"""

from __future__ import annotations

from collections.abc import Iterable

from lash_core.providers.base import ChatMessage
from lash_core.transcript import MessageNode


def node_message(node: MessageNode) -> ChatMessage:
    return ChatMessage(
        role=node.role,
        content=node.text,
        tool_calls=list(node.tool_calls),
        tool_call_id=node.tool_call_id,
        name=node.tool_name,
    )


def build_context(system_prompt: str | None, nodes: Iterable[MessageNode]) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    if system_prompt:
        messages.append(ChatMessage(role="system", content=system_prompt))
    open_calls: dict[str, str] = {}
    for node in nodes:
        if node.role != "tool" and open_calls:
            messages.extend(_unanswered(open_calls))
            open_calls = {}
        messages.append(node_message(node))
        if node.role == "assistant":
            open_calls = {c.id: c.name for c in node.tool_calls}
        elif node.role == "tool" and node.tool_call_id is not None:
            open_calls.pop(node.tool_call_id, None)
    if open_calls:
        messages.extend(_unanswered(open_calls))
    return messages


def _unanswered(open_calls: dict[str, str]) -> list[ChatMessage]:
    return [
        ChatMessage(role="tool", content="error: no result (turn stopped)", tool_call_id=i, name=n)
        for i, n in open_calls.items()
    ]
