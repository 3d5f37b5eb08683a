"""The session transcript as a graph of message nodes (lash-semantics §5.3).

Each node points at its parent; the active path is the parent chain from the leaf. A
commit appends nodes (the normal turn) or replaces the whole graph (reset, fresh open).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import Field

from lash_core._model import Frozen

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(Frozen):
    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class MessageNode(Frozen):
    """One message. ``node_id``, ``parent_node_id`` and ``created_at_ms`` are volatile:
    they are excluded from the turn-commit hash so a regenerated retry hashes the same."""

    node_id: str
    parent_node_id: str | None = None
    turn_id: str | None = None
    role: Role
    text: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    tool_name: str | None = None
    is_error: bool = False
    input_ids: list[str] = Field(default_factory=list)
    created_at_ms: int = 0


class TranscriptMessage(Frozen):
    """What readers and observers see of a message."""

    role: Role
    text: str
    turn_id: str | None = None


def to_transcript(node: MessageNode) -> TranscriptMessage:
    return TranscriptMessage(role=node.role, text=node.text, turn_id=node.turn_id)


class GraphUnchanged(Frozen):
    kind: Literal["unchanged"] = "unchanged"


class GraphAppend(Frozen):
    kind: Literal["append"] = "append"
    nodes: list[MessageNode]
    leaf_node_id: str


class GraphReplace(Frozen):
    kind: Literal["replace"] = "replace"
    nodes: list[MessageNode] = Field(default_factory=list)
    leaf_node_id: str | None = None


GraphDelta = Annotated[GraphUnchanged | GraphAppend | GraphReplace, Field(discriminator="kind")]


def active_path(nodes: Iterable[MessageNode], leaf_node_id: str | None) -> list[MessageNode]:
    """The parent chain from the leaf, oldest first."""
    by_id = {n.node_id: n for n in nodes}
    path: list[MessageNode] = []
    cur = by_id.get(leaf_node_id) if leaf_node_id else None
    seen: set[str] = set()
    while cur is not None and cur.node_id not in seen:
        seen.add(cur.node_id)
        path.append(cur)
        cur = by_id.get(cur.parent_node_id) if cur.parent_node_id else None
    path.reverse()
    return path


def ingress_message_id(input_id: str) -> str:
    """The node id of the user message an accepted steering input becomes."""
    return f"m_ingress_{input_id}"
