"""Keeps a session execution lease alive while its holder works (lash-semantics §2.5).

Renews every TTL/3. Unlike lash, a transient renewal error is retried (DESIGN.md
difference 2): the lease is only declared lost when the store rejects the fence or when the
TTL has really passed since the last renewal that succeeded (measured from *before* that
call was issued, so the local deadline is never later than the store's expiry). A renewal
that reports ``cancel_requested`` forwards the request to the running turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from lash_core.errors import LeaseLost
from lash_core.leases import Lease, LeaseFence
from lash_core.store.base import Store

log = structlog.get_logger(__name__)

CancelRequested = Callable[[str | None, str | None], None]
"""``(running_turn_id, reason)`` of a cancellation seen by a renewal."""


class LeaseGuard:
    """Background renewal of one lease tenure; ``lost`` is set once the tenure is over."""

    def __init__(
        self,
        store: Store,
        lease: Lease,
        ttl_ms: int,
        *,
        acquired_at: float,
        on_cancel_requested: CancelRequested | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.lease = lease
        self.fence: LeaseFence = lease.fence()
        self._ttl_ms = ttl_ms
        self._ttl_s = ttl_ms / 1000.0
        self._interval_s = max(self._ttl_s / 3.0, 0.001)
        self._monotonic = monotonic
        self._deadline = acquired_at + self._ttl_s
        self._on_cancel = on_cancel_requested
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def generation(self) -> int:
        return self.fence.fencing_token

    @property
    def is_lost(self) -> bool:
        return self.lost.is_set()

    def can_still_be_valid(self) -> bool:
        """False once the lease is known lost or the TTL has passed since the last renewal."""
        return not self.is_lost and self._monotonic() < self._deadline

    def mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            log.warning("lease_lost", session_id=self.fence.session_id, reason=reason)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the tenure is over."""
        if self.is_lost:
            raise LeaseLost(self.fence.session_id, self.lost_reason or "")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"lease-guard:{self.fence.session_id}"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while not self.is_lost:
            await asyncio.sleep(self._interval_s)
            await self.renew_once()

    async def renew_once(self) -> None:
        """One renewal, retrying transient errors until the TTL has really passed."""
        backoff = min(self._interval_s / 4.0, 0.05)
        while not self.is_lost:
            started = self._monotonic()
            try:
                row = await self._store.renew_lease(self.fence, self._ttl_ms)
            except LeaseLost as exc:
                self.mark_lost(str(exc))
                return
            except Exception as exc:
                if self._monotonic() >= self._deadline:
                    self.mark_lost(f"renewal failing until the TTL passed: {exc!r}")
                    return
                log.info("lease_renew_retry", session_id=self.fence.session_id, error=repr(exc))
                await asyncio.sleep(max(0.0, min(backoff, self._deadline - self._monotonic())))
                backoff = min(backoff * 2, self._interval_s)
                continue
            self._deadline = started + self._ttl_s
            if row.cancel_requested and self._on_cancel is not None:
                self._on_cancel(row.running_turn_id, row.cancel_reason)
            return
