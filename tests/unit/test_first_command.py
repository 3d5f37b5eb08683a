"""The earliest pending command a turn start must stop before (``store._first_command``):
the open-rows statement reads commands without knowing the lease generation, so that it
can travel with ``BEGIN`` and the lease lock; the generation is applied afterwards."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lash_core.store.postgres.store import _first_command


def test_no_pending_command() -> None:
    assert _first_command(None, None, None, 3) is None


def test_unclaimed_command_counts_whatever_the_generation() -> None:
    assert _first_command(7, None, None, 3) == 7


def test_own_claim_is_being_applied_and_does_not_block() -> None:
    assert _first_command(None, [4], [3], 3) is None
    assert _first_command(9, [4], [3], 3) == 9


def test_a_claim_of_another_generation_blocks() -> None:
    assert _first_command(9, [4, 6], [2, 3], 3) == 4


@given(
    unclaimed=st.none() | st.integers(1, 100),
    claims=st.lists(st.tuples(st.integers(1, 100), st.integers(0, 5)), max_size=6),
    generation=st.integers(0, 5),
)
def test_matches_the_filtered_minimum(
    unclaimed: int | None, claims: list[tuple[int, int]], generation: int
) -> None:
    """As the old per-generation SQL filter computed it: the least ``enqueue_seq`` among
    unclaimed commands and commands claimed by another generation."""
    claims.sort()
    seqs = [s for s, _ in claims] or None
    gens = [g for _, g in claims] or None
    eligible = [s for s, g in claims if g != generation] + ([unclaimed] if unclaimed else [])
    assert _first_command(unclaimed, seqs, gens, generation) == (
        min(eligible) if eligible else None
    )
