"""Producer-side faults: the same messages published several times and out of order, and
messages published while no worker runs."""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections import Counter

import pytest

from tests.fault import figures
from tests.fault.conftest import HarnessFactory

pytestmark = [pytest.mark.fault, pytest.mark.postgres, pytest.mark.rabbitmq]


async def test_duplicate_and_reordered_publishing_admits_once(make_harness: HarnessFactory) -> None:
    async with make_harness(echo_delay_ms=50) as h:
        await h.fleet.start(2)
        rng = random.Random(5)
        sessions = h.session_ids(5)
        copies: list[tuple[str, str, str]] = []  # (session, key, text)
        for sid in sessions:
            for k in range(4):
                key = f"k{k}"
                text = h.text_for(sid, key)
                h.workload.add(sid, key, text)
                copies.extend([(sid, key, text)] * 3)
        rng.shuffle(copies)
        corr_by_key: dict[tuple[str, str], list[str]] = {}
        for sid, key, text in copies:
            corr = await h.bus.submit(sid, text, source_key=key, reply=True)
            corr_by_key.setdefault((sid, key), []).append(corr)

        # No source key: the AMQP message_id is the idempotency key (amqp:<message_id>).
        by_mid: dict[tuple[str, str], list[str]] = {}
        mids = [(sid, uuid.uuid4().hex) for sid in sessions]
        plan = [m for m in mids for _ in range(2)]
        rng.shuffle(plan)
        texts = {mid: h.text_for(sid, f"amqp:{mid}") for sid, mid in mids}
        for sid, mid in mids:
            h.workload.add(sid, f"amqp:{mid}", texts[mid])
        for sid, mid in plan:
            corr = await h.bus.submit(sid, texts[mid], source_key=None, message_id=mid, reply=True)
            by_mid.setdefault((sid, mid), []).append(corr)

        every = [c for cs in (*corr_by_key.values(), *by_mid.values()) for c in cs]
        await h.bus.wait_for(lambda: all(h.bus.receipts.get(c) for c in every), 30, "every receipt")

        # Same source key, different content: a conflict, nothing written.
        conflicts = []
        for sid in sessions[:3]:
            conflicts.append(
                await h.bus.submit(sid, h.text_for(sid, "other"), source_key="k0", reply=True)
            )
        await h.bus.wait_for(
            lambda: all(h.bus.receipts.get(c) for c in conflicts), 30, "conflict receipts"
        )

        report = await h.settle_and_check(timeout_s=60)
        statuses: Counter[str] = Counter()
        for group in (*corr_by_key.values(), *by_mid.values()):
            got = Counter(str(h.bus.receipts[c][0].body.get("status")) for c in group)
            statuses.update(got)
            if got != Counter({"admitted": 1, "duplicate": len(group) - 1}):
                report.violation(f"receipts of one submission: {dict(got)}")
        for c in conflicts:
            status = h.bus.receipts[c][0].body.get("status")
            statuses[str(status)] += 1
            if status != "conflict":
                report.violation(f"changed content under a used source key got {status!r}")
        for c in every + conflicts:
            if len(h.bus.receipts[c]) != 1:
                report.violation(f"{len(h.bus.receipts[c])} receipts for one request")
        figures.record(
            "duplicate_publishing",
            h.figures(
                report,
                messages_published=h.bus.published,
                receipts=dict(statuses),
            ),
        )
        report.assert_ok(h.diagnostics())


async def test_messages_published_while_no_worker_runs(make_harness: HarnessFactory) -> None:
    async with make_harness(echo_delay_ms=50) as h:
        # One worker declares the topology and leaves; then nobody consumes.
        (first,) = await h.fleet.start(1)
        first.signal(signal.SIGTERM)
        assert await first.wait_exit(20) == 0, first.log_tail(60)
        assert await h.bus.ingress_consumers() == 0

        sessions = h.session_ids(6)
        await h.submit_many(sessions, 3)
        await asyncio.sleep(1.0)
        assert not h.bus.observed, "events appeared while no worker ran"
        for sid in sessions:
            assert await h.store.list_inputs(sid) == []

        await h.fleet.start(2)
        report = await h.settle_and_check(timeout_s=60)
        figures.record("published_while_down", h.figures(report))
        report.assert_ok(h.diagnostics())
