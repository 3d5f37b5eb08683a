"""A bounded, least-recently-used cache of sessions' committed state.

A worker that runs a session's next turn from the state it holds in memory saves reading
the session's transcript back (a statement, and parsing every message again). Sessions
differ by orders of magnitude in size (an echo test session holds a few short messages, an
agent session can hold hundreds of long ones), so the cache is bounded both by how many
sessions it holds and by an estimate of their memory: counting sessions alone would
either cache too few small ones or let a few large ones take the process's memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Generic, TypeVar

from lash_core import jsontext
from lash_core.transcript import MessageNode

T = TypeVar("T")

MAX_SESSIONS = 1024
"""By default, at most this many sessions' state is cached (per driver, so per worker;
``LASH_STATE_CACHE_SESSIONS``)."""
MAX_BYTES = 8 * 1024 * 1024
"""By default, at most about this much memory (:func:`nodes_size`) is held by cached
state (``LASH_STATE_CACHE_MIB``)."""
NODE_BYTES = 1536
"""The memory of one cached message besides its text: measured with tracemalloc at about
1.8 KB for a short message with its ids and one input id (Python 3.11, pydantic 2)."""


def nodes_size(nodes: Iterable[MessageNode]) -> int:
    """The estimated memory of cached messages: :data:`NODE_BYTES` each, plus their text
    and tool-call arguments (as JSON)."""
    size = 0
    for node in nodes:
        size += NODE_BYTES + len(node.text)
        for call in node.tool_calls:
            size += len(call.name) + len(jsontext.dumps(call.arguments))
    return size


class StateCache(Generic[T]):
    """Session id -> state, least recently used first out, within both bounds.

    Entries are put with their size; an entry that changed in place must be put again so
    its size is counted. The most recently put entry always stays, even alone above the
    byte bound (the turn it serves is running now)."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, max_bytes: int = MAX_BYTES) -> None:
        self._entries: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._max_sessions = max_sessions
        self._max_bytes = max_bytes
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_sessions(self) -> int:
        return self._max_sessions

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def bytes(self) -> int:
        """The estimated memory of the cached entries."""
        return self._bytes

    def get(self, session_id: str) -> T | None:
        """The cached state of ``session_id`` (now the most recently used), if any."""
        found = self._entries.get(session_id)
        if found is None:
            return None
        self._entries.move_to_end(session_id)
        return found[0]

    def put(self, session_id: str, state: T, size: int) -> None:
        """Cache ``state`` of ``size`` bytes, then evict from the least recently used end
        while either bound is exceeded."""
        self.pop(session_id)
        self._entries[session_id] = (state, size)
        self._bytes += size
        while len(self._entries) > 1 and (
            len(self._entries) > self._max_sessions or self._bytes > self._max_bytes
        ):
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def pop(self, session_id: str) -> None:
        """Forget ``session_id``'s state, if cached."""
        found = self._entries.pop(session_id, None)
        if found is not None:
            self._bytes -= found[1]
