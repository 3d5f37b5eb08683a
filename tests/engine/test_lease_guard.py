"""The lease guard: renewal cadence, transient errors retried, loss detected."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from lash_core.engine.lease_guard import LeaseGuard
from lash_core.errors import LeaseLost, StoreUnavailable
from lash_core.leases import Lease, LeaseFence, LeaseOwner, LeaseRow

OWNER = LeaseOwner(owner_id="w", incarnation_id="w-1")
LEASE = Lease(
    session_id="s",
    owner=OWNER,
    lease_token="tok",
    fencing_token=3,
    claimed_at_ms=0,
    expires_at_ms=1,
)


class FakeStore:
    """Renewals follow a script: an exception to raise, or a row to return."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.calls = 0

    async def renew_lease(self, fence: LeaseFence, ttl_ms: int) -> LeaseRow:
        self.calls += 1
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        return step or LeaseRow(session_id="s", owner=OWNER, lease_token="tok", fencing_token=3)


def guard(store: FakeStore, ttl_ms: int, **kwargs: Any) -> LeaseGuard:
    return LeaseGuard(store, LEASE, ttl_ms, acquired_at=time.monotonic(), **kwargs)  # type: ignore[arg-type]


async def test_transient_renewal_errors_are_retried_within_the_ttl() -> None:
    store = FakeStore([StoreUnavailable("blip"), StoreUnavailable("blip"), None])
    g = guard(store, 3_000)
    await g.renew_once()
    assert not g.is_lost and store.calls == 3


async def test_a_rejected_fence_loses_the_lease_at_once() -> None:
    store = FakeStore([LeaseLost("s", "token changed")])
    g = guard(store, 3_000)
    await g.renew_once()
    assert g.is_lost and store.calls == 1 and "token changed" in (g.lost_reason or "")


async def test_renewal_failing_until_the_ttl_passes_loses_the_lease() -> None:
    store = FakeStore([StoreUnavailable("down")] * 1000)
    g = guard(store, 300)
    g.start()
    await asyncio.wait_for(g.lost.wait(), 3)
    await g.stop()
    assert "TTL" in (g.lost_reason or "")


async def test_background_renewal_runs_every_third_of_the_ttl_and_forwards_cancel() -> None:
    cancel_row = LeaseRow(
        session_id="s",
        owner=OWNER,
        lease_token="tok",
        fencing_token=3,
        running_turn_id="t1",
        cancel_requested=True,
        cancel_reason="stop",
    )
    seen: list[tuple[str | None, str | None]] = []
    forwarded = asyncio.Event()

    def on_cancel(turn_id: str | None, reason: str | None) -> None:
        seen.append((turn_id, reason))
        forwarded.set()

    store = FakeStore([None, None, cancel_row])
    g = guard(store, 300, on_cancel_requested=on_cancel)
    g.start()
    await asyncio.wait_for(forwarded.wait(), 3)
    await g.stop()
    assert seen == [("t1", "stop")] and store.calls >= 3 and not g.is_lost
