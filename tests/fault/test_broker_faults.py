"""The broker drops the workers' connections during admission, during turns and while the
outbox publishes: workers reconnect, nothing is admitted twice, observers see no hole."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests import services
from tests.fault import figures
from tests.fault.conftest import HarnessFactory
from tests.fault.faults import have_rabbitmqctl
from tests.fault.harness import Harness

pytestmark = [pytest.mark.fault, pytest.mark.postgres, pytest.mark.rabbitmq]


async def _consuming_again(h: Harness) -> None:
    count = await h.bus.wait_consumers(2, timeout_s=30)
    assert count == 2, f"{count} ingress consumers 30 s after a broker drop, not 2"


async def test_broker_connection_drops(make_harness: HarnessFactory) -> None:
    if not have_rabbitmqctl():
        services.missing("rabbitmqctl (to close the workers' broker connections)")
    async with make_harness(echo_delay_ms=500, lease_ttl_ms=2500, sweep_interval_ms=500) as h:
        await h.fleet.start(2)
        sessions = h.session_ids(8)
        feeder = asyncio.create_task(h.submit_many(sessions, 12, spacing_s=0.8))
        # Admission: drop while the first burst is being consumed.
        await asyncio.sleep(0.15)
        dropped = [await h.drop_broker()]
        # Each later drop waits until both workers consume again (aio-pika reconnects
        # after its reconnect interval): a drop of nothing would test nothing.
        await _consuming_again(h)
        # During turns: as soon as a turn runs somewhere, drop.
        running = await h.wait_any_running_turn(sessions, timeout_s=10)
        dropped.append(await h.drop_broker())
        await _consuming_again(h)
        # While the outbox publishes: as soon as fresh events flow, drop.
        seen = len(h.bus.observed)
        with contextlib.suppress(AssertionError):
            await h.bus.wait_for(lambda: len(h.bus.observed) > seen + 2, 5, "events flowing")
        flowing = len(h.bus.observed) > seen + 2
        dropped.append(await h.drop_broker())
        await _consuming_again(h)
        await feeder
        dropped.append(await h.drop_broker())

        report = await h.settle_and_check(timeout_s=60)
        for w in h.fleet.workers:
            if not w.alive():
                report.violation(f"{w.owner_id} exited ({w.returncode}) instead of reconnecting")
        consumers = await h.bus.wait_consumers(2, timeout_s=20)
        if consumers < 2:
            report.violation(f"only {consumers} ingress consumers after reconnecting")
        figures.record(
            "broker_connection_drops",
            h.figures(
                report,
                connections_closed=sum(dropped),
                turns_running_at_drop=running,
                events_flowing_at_drop=flowing,
            ),
        )
        assert all(dropped), f"a drop found no worker connection to close: {dropped}"
        report.assert_ok(h.diagnostics())
