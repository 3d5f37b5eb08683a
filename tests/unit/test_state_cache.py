"""The state cache keeps the most recently used sessions within both of its bounds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lash_core.engine.state_cache import NODE_BYTES, StateCache, nodes_size
from lash_core.transcript import MessageNode, ToolCall


def test_size_counts_each_message_its_text_and_tool_arguments() -> None:
    plain = MessageNode(node_id="a", role="user", text="x" * 100)
    call = MessageNode(
        node_id="b",
        role="assistant",
        tool_calls=[ToolCall(id="c", name="grep", arguments={"q": "y" * 50})],
    )
    assert nodes_size([]) == 0
    assert nodes_size([plain]) == NODE_BYTES + 100
    assert nodes_size([call]) > NODE_BYTES + len("grep") + 50


def test_least_recently_used_go_first_when_either_bound_is_passed() -> None:
    cache: StateCache[str] = StateCache(max_sessions=3, max_bytes=1000)
    for sid in "abc":
        cache.put(sid, sid.upper(), 100)
    assert cache.get("a") == "A"  # now the most recently used
    cache.put("d", "D", 100)  # four sessions: "b" goes
    assert cache.get("b") is None and len(cache) == 3 and cache.bytes == 300
    cache.put("e", "E", 800)  # 1,100 bytes: "c" goes, then the bound holds
    assert cache.get("c") is None and cache.get("a") == "A" and cache.bytes == 1000
    cache.put("a", "A2", 50)  # put again at a new size
    assert cache.bytes == 950 and cache.get("a") == "A2"
    cache.pop("e")
    cache.pop("missing")
    assert cache.bytes == 150 and len(cache) == 2


def test_an_entry_larger_than_the_byte_bound_stays_alone() -> None:
    cache: StateCache[str] = StateCache(max_sessions=10, max_bytes=100)
    cache.put("small", "s", 10)
    cache.put("huge", "h", 500)
    assert len(cache) == 1 and cache.get("huge") == "h" and cache.bytes == 500


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 400)), max_size=60))
def test_bounds_hold_and_the_last_put_is_kept(puts: list[tuple[str, int]]) -> None:
    cache: StateCache[int] = StateCache(max_sessions=4, max_bytes=1000)
    sizes: dict[str, int] = {}
    for sid, size in puts:
        cache.put(sid, size, size)
        sizes[sid] = size
        assert cache.get(sid) == size
        assert len(cache) <= 4
        assert cache.bytes <= 1000 or len(cache) == 1
        held = [s for s in "abcdefgh" if cache.get(s) is not None]
        assert cache.bytes == sum(sizes[s] for s in held)
