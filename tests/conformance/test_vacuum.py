"""VAC: vacuum and retention (conformance-cases.md §9), plus event retention (our addition).

Differs from lash: retention is a setting (DESIGN.md difference 8): ``vacuum(older_than_ms)``
removes only tombstones whose terminal time is at least that old by the store clock, and
prunes *published* events older than ``events_older_than_ms`` (default: the same age; never
unpublished ones), so tombstone and event retention are separate settings.
"""

from __future__ import annotations

import pytest

from lash_core.inputs import CancelOutcomeKind, InputIdTarget, SourceKeyTarget
from lash_core.store.base import AdmissionStatus, Store
from tests.conformance.conftest import (
    Harness,
    command_draft,
    commit,
    draft,
    final,
    lease_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_VAC_01_vacuum_prunes_tombstones_and_reports_counts(store: Store) -> None:
    a = await store.enqueue_input(draft("s", "a"))
    b = await store.enqueue_input(draft("s", "b"))
    t = await store.enqueue_input(draft("t", "keep"))
    await store.cancel_inputs(
        "s", [InputIdTarget(value=a.record.input_id), InputIdTarget(value=b.record.input_id)]
    )
    done = await store.enqueue_input(draft("u", "done"))
    lease = await lease_for(store, "u")
    claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert claim is not None
    await store.commit(
        commit("u", lease, turn=final("t1"), completed_input_claims=[claim.completion()])
    )
    report = await store.vacuum(0)
    assert report.removed_input_tombstones == 3
    assert [p.input_id for p in await store.list_pending_inputs("t")] == [t.record.input_id]
    assert await store.list_inputs("s") == []
    assert await store.get_input("u", done.record.input_id) is None


async def test_VAC_02_after_vacuum_cancel_targets_are_not_found(store: Store) -> None:
    a = await store.enqueue_input(draft("s", "a"))
    await store.cancel_inputs("s", [InputIdTarget(value=a.record.input_id)])
    await store.vacuum(0, "s")
    [res] = await store.cancel_inputs("s", [InputIdTarget(value=a.record.input_id)])
    assert res.outcome is CancelOutcomeKind.NOT_FOUND


async def test_VAC_03_vacuum_ends_the_idempotency_window(store: Store) -> None:
    first = await store.enqueue_input(draft("s", "x", source_key="k"))
    await store.cancel_inputs("s", [SourceKeyTarget(value="k")])
    assert (await store.enqueue_input(draft("s", "x", source_key="k"))).status == "duplicate"
    await store.vacuum(0, "s")
    again = await store.enqueue_input(draft("s", "x", source_key="k"))
    assert again.status is AdmissionStatus.ADMITTED
    assert again.record.input_id != first.record.input_id
    # Commands too: a vacuumed command tombstone no longer dedupes its key.
    c = await store.enqueue_command(command_draft("s", "ck"))
    await store.cancel_command("s", c.command.batch_id)
    report = await store.vacuum(0, "s")
    assert report.removed_command_tombstones == 1
    c2 = await store.enqueue_command(command_draft("s", "ck"))
    assert c2.status is AdmissionStatus.ADMITTED and c2.command.batch_id != c.command.batch_id


async def test_VAC_retention_age_is_respected(harness: Harness) -> None:
    store = harness.store
    a = await store.enqueue_input(draft("s", "a"))
    pending = await store.enqueue_input(draft("s", "pending"))
    await store.cancel_inputs("s", [InputIdTarget(value=a.record.input_id)])
    await store.mark_published(await store.unpublished_events())
    report = await store.vacuum(3_600_000)
    assert report.removed_input_tombstones == 0 and report.removed_events == 0
    await harness.advance(20)
    report = await store.vacuum(10)
    assert report.removed_input_tombstones == 1
    assert report.removed_events == 3
    assert [p.input_id for p in await store.list_pending_inputs("s")] == [pending.record.input_id]


async def test_VAC_unpublished_events_are_never_vacuumed(store: Store) -> None:
    await store.enqueue_input(draft("s", "a"))
    await store.enqueue_input(draft("s", "b"))
    [first, _second] = await store.unpublished_events()
    await store.mark_published([first])
    report = await store.vacuum(0)
    assert report.removed_events == 1
    [left] = await store.unpublished_events()
    assert left.seq == 2
    page = await store.events_after("s", 0)
    assert [e.seq for e in page.events] == [2] and page.gap  # seq 1 is gone
    page = await store.events_after("s", 1)
    assert [e.seq for e in page.events] == [2] and not page.gap


async def test_VAC_07_events_after_reports_a_gap_after_vacuum(store: Store) -> None:
    for n in range(3):
        await store.enqueue_input(draft("s", f"m{n}"))
    await store.mark_published(await store.unpublished_events())
    await store.vacuum(0)
    page = await store.events_after("s", 0)
    assert page.gap and page.events == [] and page.last_seq == 3
    up_to_date = await store.events_after("s", 3)
    assert not up_to_date.gap and up_to_date.events == []
    await store.enqueue_input(draft("s", "m3"))
    page = await store.events_after("s", 1)
    assert page.gap and [e.seq for e in page.events] == [4]
    page = await store.events_after("s", 3)
    assert not page.gap and [e.seq for e in page.events] == [4] and page.last_seq == 4
    view = await store.read_session("s", after_seq=0)
    assert view.events is not None and view.events.gap and view.last_seq == 4


async def test_VAC_tombstones_and_events_have_separate_retentions(store: Store) -> None:
    a = await store.enqueue_input(draft("s", "a"))
    await store.cancel_inputs("s", [InputIdTarget(value=a.record.input_id)])
    await store.mark_published(await store.unpublished_events())
    # Events kept for an hour, tombstones not: only the tombstone goes.
    report = await store.vacuum(0, events_older_than_ms=3_600_000)
    assert (report.removed_input_tombstones, report.removed_events) == (1, 0)
    assert [e.seq for e in (await store.events_after("s", 0)).events] == [1, 2]
    # And the other way round.
    b = await store.enqueue_input(draft("s", "b"))
    await store.cancel_inputs("s", [InputIdTarget(value=b.record.input_id)])
    await store.mark_published(await store.unpublished_events())
    report = await store.vacuum(3_600_000, events_older_than_ms=0)
    assert (report.removed_input_tombstones, report.removed_events) == (0, 4)
    assert await store.get_input("s", b.record.input_id) is not None
