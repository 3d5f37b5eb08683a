"""Embed lash_core in a host process: PostgreSQL store, echo provider, one session.

Runs a short conversation (a plain turn and a tool turn), then streams a slow turn and
sends a steering message (active-turn ingress) while it runs, and prints the committed
transcript and the session's durable events.

    LASH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        python examples/embedded_session.py

Environment: ``LASH_DATABASE_URL`` (default as above), ``LASH_ECHO_DELAY_MS`` (default 800:
how long each model call takes, so there is time to steer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from lash_core.engine import AgentConfig, TurnReport
from lash_core.events import TurnActivity
from lash_core.providers.echo import EchoProvider
from lash_core.session import LashCore
from lash_core.store.postgres import PostgresStore
from lash_core.tools import default_registry

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def describe(report: TurnReport) -> str:
    outcome = report.outcome
    detail = outcome.finish.kind if outcome.kind == "finished" else outcome.stop
    return f"turn {report.turn_id}: {outcome.kind}/{detail}, inputs {report.input_ids}"


async def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    url = os.environ.get("LASH_DATABASE_URL", DEFAULT_URL)
    delay_ms = int(os.environ.get("LASH_ECHO_DELAY_MS", "800"))
    store = PostgresStore(url)
    await store.start()
    try:
        agent = AgentConfig(
            provider=EchoProvider(delay_ms=delay_ms),
            tools=default_registry(),
            system_prompt="You are a helpful echo.",
        )
        core = LashCore(store, agent)
        session = await core.open(f"example-{uuid.uuid4().hex[:8]}")
        print(f"session {session.session_id}")

        print(describe(await session.run_turn("Hello there")))
        print(describe(await session.run_turn('/tool calculate {"expression": "6*7"}')))

        print("streaming a slow turn and steering it:")
        steered = False
        async for item in session.stream_turn("Tell me something slowly"):
            if isinstance(item, TurnActivity):
                if item.activity.kind == "text_delta":
                    print(f"  delta {item.activity.text!r}")
                if not steered:
                    admission = await session.steer("Also mention the weather")
                    print(
                        f"  steering input {admission.record.input_id} ({admission.record.state})"
                    )
                    steered = True
            else:
                print(describe(item))

        print("\ntranscript:")
        for node in await session.transcript():
            calls = ", ".join(f"{c.name}({c.arguments})" for c in node.tool_calls)
            print(f"  {node.role:9} {node.text!r}" + (f" -> {calls}" if calls else ""))

        print("\nevents:")
        page = await store.events_after(session.session_id, 0)
        for event in page.events:
            print(f"  #{event.seq} rev {event.revision} {event.type}")
        print(f"\nusage: {(await session.usage()).model_dump()}")
        await session.close()
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
