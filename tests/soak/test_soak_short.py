"""The CI soak: 3 workers, 20 sessions, 5 inputs each, random kills, restarts and
connection drops for about a minute, then every invariant over the whole run."""

from __future__ import annotations

import pytest

from tests.fault import figures
from tests.fault.conftest import HarnessFactory
from tests.soak.runner import SoakPlan, run_soak

pytestmark = [pytest.mark.soak, pytest.mark.fault, pytest.mark.postgres, pytest.mark.rabbitmq]


@pytest.mark.timeout(240)
async def test_soak_short(make_harness: HarnessFactory) -> None:
    plan = SoakPlan(
        workers=3,
        sessions=20,
        inputs_per_session=5,
        duration_s=60,
        chaos_every_s=6,
        echo_delay_ms=500,
    )
    async with make_harness(**plan.worker_settings()) as h:
        report, figs = await run_soak(h, plan)
        figures.record("soak_short", figs)
        report.assert_ok(h.diagnostics())
