"""Session execution leases and their fencing rules (lash-semantics §2).

One row per session decides who may run that session's turns. A generation
(``fencing_token``) names one continuous tenure of one owner incarnation; every write a
holder makes is fenced by (owner incarnation, token, generation) and checked against the
database clock. The functions here are the whole decision table; stores only read the row
under a lock, call them, and write back what they return.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from lash_core._model import Frozen
from lash_core.errors import LeaseLost, SessionMismatch


class OpaqueLiveness(Frozen):
    """Nothing is known about the holder's process: only TTL expiry frees its lease."""

    kind: Literal["opaque"] = "opaque"


class LocalProcessLiveness(Frozen):
    """The holder is a process on a known host and boot; it can be proven dead early."""

    kind: Literal["local_process"] = "local_process"
    host_id: str
    boot_id: str
    pid: int
    process_start: int


Liveness = Annotated[OpaqueLiveness | LocalProcessLiveness, Field(discriminator="kind")]


class LeaseOwner(Frozen):
    """Who holds a lease: a logical owner and one incarnation (process lifetime) of it."""

    owner_id: str = Field(min_length=1)
    incarnation_id: str = Field(min_length=1)
    liveness: Liveness = Field(default_factory=OpaqueLiveness)

    def same_incarnation(self, other: LeaseOwner | None) -> bool:
        return (
            other is not None
            and self.owner_id == other.owner_id
            and self.incarnation_id == other.incarnation_id
        )


class LeaseFence(Frozen):
    """Proof of holding a lease, presented with every guarded write (and to release)."""

    session_id: str
    owner: LeaseOwner
    lease_token: str
    fencing_token: int


class Lease(Frozen):
    """A live lease as handed to its holder. Client-side expiry is informational only."""

    session_id: str
    owner: LeaseOwner
    lease_token: str
    fencing_token: int
    claimed_at_ms: int
    expires_at_ms: int

    def fence(self) -> LeaseFence:
        return LeaseFence(
            session_id=self.session_id,
            owner=self.owner,
            lease_token=self.lease_token,
            fencing_token=self.fencing_token,
        )


class LeaseRow(Frozen):
    """The stored lease row, live or released.

    A released row keeps ``fencing_token`` (so the next tenure is strictly newer) and clears
    owner, token and times. ``running_turn_id`` and ``cancel_requested`` belong to the
    current tenure and are cleared with it.
    """

    session_id: str
    owner: LeaseOwner | None = None
    lease_token: str | None = None
    fencing_token: int = 0
    claimed_at_ms: int = 0
    expires_at_ms: int = 0
    running_turn_id: str | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None

    def is_live(self, now_ms: int) -> bool:
        return self.lease_token is not None and self.expires_at_ms > now_ms

    def as_lease(self) -> Lease:
        assert self.owner is not None and self.lease_token is not None
        return Lease(
            session_id=self.session_id,
            owner=self.owner,
            lease_token=self.lease_token,
            fencing_token=self.fencing_token,
            claimed_at_ms=self.claimed_at_ms,
            expires_at_ms=self.expires_at_ms,
        )


class Acquired(Frozen):
    kind: Literal["acquired"] = "acquired"
    lease: Lease


class Busy(Frozen):
    kind: Literal["busy"] = "busy"
    holder: Lease


LeaseClaimResult = Acquired | Busy


# --------------------------------------------------------------------------- pure decisions


def lease_token(session_id: str, owner: LeaseOwner, now_ms: int, fencing_token: int) -> str:
    return f"{session_id}:{owner.owner_id}:{owner.incarnation_id}:{now_ms}:{fencing_token}"


def _fresh(session_id: str, owner: LeaseOwner, previous: int, now_ms: int, ttl_ms: int) -> LeaseRow:
    generation = previous + 1
    return LeaseRow(
        session_id=session_id,
        owner=owner,
        lease_token=lease_token(session_id, owner, now_ms, generation),
        fencing_token=generation,
        claimed_at_ms=now_ms,
        expires_at_ms=now_ms + ttl_ms,
    )


@dataclass(frozen=True)
class LeaseDecision:
    """A decision: the result for the caller and the row to write (``None``: no write)."""

    result: LeaseClaimResult
    write: LeaseRow | None


def decide_try_claim(
    row: LeaseRow | None, session_id: str, owner: LeaseOwner, now_ms: int, ttl_ms: int
) -> LeaseDecision:
    """``try_claim`` (§2.3): re-enter own live lease, busy on another live holder, else acquire."""
    if row is None:
        new = _fresh(session_id, owner, 0, now_ms, ttl_ms)
        return LeaseDecision(Acquired(lease=new.as_lease()), new)
    if row.is_live(now_ms):
        if owner.same_incarnation(row.owner):
            new = row.model_copy(update={"expires_at_ms": now_ms + ttl_ms})
            return LeaseDecision(Acquired(lease=new.as_lease()), new)
        return LeaseDecision(Busy(holder=row.as_lease()), None)
    new = _fresh(session_id, owner, row.fencing_token, now_ms, ttl_ms)
    return LeaseDecision(Acquired(lease=new.as_lease()), new)


DeadCheck = Callable[[LeaseOwner, LeaseOwner], bool]


def decide_reclaim(
    row: LeaseRow | None,
    session_id: str,
    owner: LeaseOwner,
    observed: LeaseFence,
    now_ms: int,
    ttl_ms: int,
    holder_is_dead: DeadCheck,
) -> LeaseDecision:
    """``reclaim`` (§2.3): take over a dead holder's live lease, only if it is the one observed.

    ``holder_is_dead(holder, claimant)`` decides provable death; a stale observation (the
    row moved on since) is ``Busy`` so it can never clear a newer lease.
    """
    if row is None or not row.is_live(now_ms):
        return decide_try_claim(row, session_id, owner, now_ms, ttl_ms)
    assert row.owner is not None
    matches = (
        row.owner.same_incarnation(observed.owner)
        and row.lease_token == observed.lease_token
        and row.fencing_token == observed.fencing_token
        and observed.session_id == session_id
    )
    if matches and holder_is_dead(row.owner, owner):
        new = _fresh(session_id, owner, row.fencing_token, now_ms, ttl_ms)
        return LeaseDecision(Acquired(lease=new.as_lease()), new)
    return LeaseDecision(Busy(holder=row.as_lease()), None)


def validate_fence(
    row: LeaseRow | None, fence: LeaseFence, session_id: str, now_ms: int
) -> LeaseRow:
    """Check a fence against the stored row (§2.6). Returns the row; raises :class:`LeaseLost`."""
    if fence.session_id != session_id:
        raise SessionMismatch(f"fence for {fence.session_id!r} used on session {session_id!r}")
    if row is None:
        raise LeaseLost(session_id, "no lease row")
    if not fence.owner.same_incarnation(row.owner):
        raise LeaseLost(session_id, "held by another incarnation")
    if row.lease_token != fence.lease_token or row.fencing_token != fence.fencing_token:
        raise LeaseLost(session_id, "token or generation changed")
    if row.expires_at_ms <= now_ms:
        raise LeaseLost(session_id, "expired")
    return row


def decide_renew(row: LeaseRow | None, fence: LeaseFence, now_ms: int, ttl_ms: int) -> LeaseRow:
    """Renewal extends expiry only; an expired lease cannot be resurrected."""
    live = validate_fence(row, fence, fence.session_id, now_ms)
    return live.model_copy(update={"expires_at_ms": now_ms + ttl_ms})


def fence_matches(row: LeaseRow | None, fence: LeaseFence) -> bool:
    """Whether ``fence`` names the tenure stored in ``row`` (expiry not considered)."""
    return (
        row is not None
        and fence.owner.same_incarnation(row.owner)
        and row.lease_token == fence.lease_token
        and row.fencing_token == fence.fencing_token
    )


def decide_release(row: LeaseRow | None, fence: LeaseFence) -> LeaseRow | None:
    """Release is a CAS on the full tenure; a stale or repeated release writes nothing."""
    if row is None or not fence_matches(row, fence):
        return None
    return released(row)


def released(row: LeaseRow) -> LeaseRow:
    return LeaseRow(session_id=row.session_id, fencing_token=row.fencing_token)


# --------------------------------------------------------------------------- dead holders


def read_process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid`` from ``/proc``, or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = stat.rsplit(")", 1)[-1].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def holder_is_definitely_dead(
    holder: LeaseOwner,
    claimant: LeaseOwner,
    process_start_of: Callable[[int], int | None] = read_process_start,
) -> bool:
    """True only if both are local processes on the same host and boot and the holder's
    pid is gone or belongs to a different process start. Opaque holders never are."""
    h, c = holder.liveness, claimant.liveness
    if not isinstance(h, LocalProcessLiveness) or not isinstance(c, LocalProcessLiveness):
        return False
    if h.host_id != c.host_id or h.boot_id != c.boot_id:
        return False
    start = process_start_of(h.pid)
    return start is None or start != h.process_start


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown-boot"


def local_process_owner(owner_id: str, incarnation_id: str) -> LeaseOwner:
    """An owner identity for this process, provably dead to peers on the same host once gone."""
    pid = os.getpid()
    return LeaseOwner(
        owner_id=owner_id,
        incarnation_id=incarnation_id,
        liveness=LocalProcessLiveness(
            host_id=os.uname().nodename,
            boot_id=_boot_id(),
            pid=pid,
            process_start=read_process_start(pid) or 0,
        ),
    )
