"""Long soak: ``python scripts/soak.py --minutes 20 --kill-every 30``.

Runs the same code as the CI soak (``tests/soak/runner.py``) for longer against the local
PostgreSQL and RabbitMQ, on a fresh database and a fresh namespace (both removed
afterwards), then prints the invariant report and the figures and merges them into
``.fault-figures.json`` under the key ``soak_long``. Exit status 0 means every invariant
held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests import services  # noqa: E402
from tests.fault import figures  # noqa: E402
from tests.fault.harness import harness  # noqa: E402
from tests.soak.runner import SoakPlan, run_soak  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="chaos duration (default 20)")
    p.add_argument(
        "--kill-every", type=float, default=30.0, help="mean seconds between faults (default 30)"
    )
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--sessions", type=int, default=40)
    p.add_argument("--rate", type=float, default=3.0, help="inputs per second while feeding")
    p.add_argument("--echo-delay-ms", type=int, default=200)
    p.add_argument("--lease-ttl-ms", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--only",
        choices=["kill9", "sigterm", "broker_drop", "db_drop"],
        action="append",
        help="restrict the chaos to these actions (repeatable)",
    )
    return p.parse_args(argv)


def plan_from(args: argparse.Namespace) -> SoakPlan:
    duration = args.minutes * 60
    plan = SoakPlan(
        workers=args.workers,
        sessions=args.sessions,
        duration_s=duration,
        chaos_every_s=args.kill_every,
        echo_delay_ms=args.echo_delay_ms,
        lease_ttl_ms=args.lease_ttl_ms,
        seed=args.seed,
        settle_timeout_s=180,
    )
    total = args.rate * duration * plan.feed_fraction
    plan.inputs_per_session = max(1, math.ceil(total / plan.sessions))
    if args.only:
        plan.weights = {k: v for k, v in plan.weights.items() if k in args.only}
    return plan


async def main(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    print(f"soak plan: {plan}", file=sys.stderr)
    amqp_url = services.base_amqp_url()
    namespace = services.unique_namespace("lashsoak")
    with (
        services.fresh_database("lash_soak") as db_url,
        tempfile.TemporaryDirectory(prefix="lash-soak-") as logs,
    ):
        async with harness(db_url, amqp_url, namespace, Path(logs), **plan.worker_settings()) as h:
            report, figs = await run_soak(
                h, plan, progress=lambda line: print(line, file=sys.stderr, flush=True)
            )
            figures.record("soak_long", figs)
            path = figures.write({"soak_long": figs})
            print(json.dumps(figs, indent=2, sort_keys=True))
            for line in figures.summary_lines({"soak_long": figs}):
                print(line)
            print(f"figures written to {path}", file=sys.stderr)
            if report.violations:
                print(f"{len(report.violations)} INVARIANT VIOLATIONS:", file=sys.stderr)
                for v in report.violations:
                    print(f"  {v}", file=sys.stderr)
                print(h.diagnostics(), file=sys.stderr)
                return 1
    print("all invariants held", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
