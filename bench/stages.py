"""Where each input's latency went: publish, admission, turn start, commit, observation.

The publish-to-committed latency alone says how slow the slowest inputs were, not why.
The stored events say more: ``input.admitted``, ``turn.started`` and ``turn.committed``
each carry ``created_at_ms``. The first two are the start of the transaction that wrote
them (PostgreSQL's ``transaction_timestamp()``), the third the moment the worker built
the commit. Read from the run's database after the run (so measuring costs the workers
nothing) and joined with the bench's own publish and observation times (the same
machine's wall clock), they split every input's latency into four stages:

``ingress``
    publish call -> admission transaction begins: the broker, the worker's prefetch
    and its admission batch.
``wait``
    -> acquiring transaction begins: the admission transaction, the wake-up (a kick, or
    a ``work`` notification to the worker that publishes the session) and a drain slot.
``turn``
    -> commit built: the lease acquisition and turn start, and running the turn (the
    echo model).
``egress``
    -> ``turn.committed`` seen: the commit transaction, the outbox relay's publish and
    the fanout to the bench's observer.

Timestamps have millisecond resolution, so stages under a millisecond read as 0 or 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from bench.stats import latency_summary

STAGES = ("ingress", "wait", "turn", "egress")

#: The stored events that stamp an input, and the name of the stamp each gives.
_STAMPS = {"input.admitted": "admitted", "turn.started": "started", "turn.committed": "committed"}

_EVENTS_SQL = "SELECT type, created_at_ms, payload FROM lash_events WHERE type = ANY(%s)"


@dataclass
class WallClock:
    """Maps the bench's ``perf_counter`` readings onto the wall clock workers stamp with."""

    offset_s: float

    @classmethod
    def now(cls) -> WallClock:
        return cls(time.time() - time.perf_counter())

    def ms(self, perf_s: float) -> float:
        return (perf_s + self.offset_s) * 1000.0


def stamps_from_events(rows: Iterable[tuple[str, int, Any]]) -> dict[str, dict[str, int]]:
    """Per input id: the ``created_at_ms`` of its admission, turn start and commit events.

    An input a turn started with is named by that ``turn.started`` (the first one, if a
    replay started it again); its commit is the ``turn.committed`` naming it."""
    stamps: dict[str, dict[str, int]] = {}
    for event_type, created_at_ms, payload in rows:
        key = _STAMPS.get(event_type)
        if key is None or not isinstance(payload, dict):
            continue
        if key == "admitted":
            record = payload.get("input")
            input_ids = [record.get("input_id")] if isinstance(record, dict) else []
        else:
            input_ids = list(payload.get("input_ids") or [])
        for input_id in input_ids:
            if input_id is None:
                continue
            seen = stamps.setdefault(str(input_id), {})
            if key not in seen or created_at_ms < seen[key]:
                seen[key] = int(created_at_ms)
    return stamps


def breakdown(
    stamps: Mapping[str, Mapping[str, int]],
    published_ms: Mapping[str, float],
    observed_ms: Mapping[str, float],
    *,
    slowest_share: float = 0.01,
) -> dict[str, Any]:
    """Stage percentiles over every input, and the stages of the slowest inputs.

    ``slowest`` averages each stage over the slowest ``slowest_share`` of inputs (at
    least one), by total latency: the stage that dominates there is what sets the p99.
    """
    rows: list[tuple[float, dict[str, float]]] = []
    for input_id, seen in stamps.items():
        published = published_ms.get(input_id)
        observed = observed_ms.get(input_id)
        if published is None or observed is None:
            continue
        if not seen.keys() >= set(_STAMPS.values()):
            continue
        stages = {
            "ingress": seen["admitted"] - published,
            "wait": float(seen["started"] - seen["admitted"]),
            "turn": float(seen["committed"] - seen["started"]),
            "egress": observed - seen["committed"],
        }
        rows.append((observed - published, stages))
    if not rows:
        return {"count": 0}
    rows.sort(key=lambda row: row[0])
    per_stage = {stage: latency_summary([s[stage] for _, s in rows]) for stage in STAGES}
    slowest = rows[-max(1, round(len(rows) * slowest_share)) :]
    return {
        "count": len(rows),
        "stages": per_stage,
        "slowest": {
            "count": len(slowest),
            "total_ms_min": round(slowest[0][0], 1),
            "mean_ms": {
                stage: round(sum(s[stage] for _, s in slowest) / len(slowest), 1)
                for stage in STAGES
            },
        },
    }


async def read_stamps(database_url: str) -> dict[str, dict[str, int]]:
    """The stamps of every input in the run's database (see :func:`stamps_from_events`)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(_EVENTS_SQL, (list(_STAMPS),))
        rows = await cur.fetchall()
    return stamps_from_events(rows)
