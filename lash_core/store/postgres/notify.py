"""Wake-ups between workers over PostgreSQL ``LISTEN/NOTIFY``.

Writers call ``pg_notify`` inside their transaction, so a wake-up is delivered exactly when
the change it announces is committed. A listener holds one dedicated autocommit connection
(outside the pool) and reconnects with capped exponential backoff forever: a missed
wake-up only delays work, since workers also poll and sweep.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from pydantic import ValidationError

from lash_core import jsontext
from lash_core.store.base import Notification

CHANNEL = "lash_events"
MAX_PAYLOAD_BYTES = 7900
"""The largest notification a writer sends: PostgreSQL refuses payloads of 8000 bytes or
more (failing the transaction), so larger ones are sent without what they would carry."""
log = logging.getLogger(__name__)


def payload(
    kind: str, session_id: str, turn_id: str | None = None, *, for_publisher: bool = False
) -> str:
    """The JSON body of one notification (well under PostgreSQL's 8000-byte limit)."""
    body: dict[str, Any] = {"kind": kind, "session_id": session_id}
    if turn_id is not None:
        body["turn_id"] = turn_id
    if for_publisher:
        body["for_publisher"] = True
    return jsontext.dumps(body)


def parse(raw: str) -> Notification | None:
    try:
        return Notification.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        log.warning("ignoring malformed notification %r", raw[:200])
        return None


async def listen(
    url: str,
    *,
    ready: asyncio.Event | None = None,
    initial_backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
) -> AsyncIterator[Notification]:
    """Yield notifications forever; ``ready`` is set each time ``LISTEN`` is in place."""
    backoff = initial_backoff_s
    while True:
        try:
            # TCP keepalives make a silently dead peer surface as an error, so the
            # listener reconnects instead of waiting forever on a half-open socket.
            conn = await psycopg.AsyncConnection.connect(
                url,
                autocommit=True,
                application_name="lash-notify",
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        except (psycopg.Error, OSError) as exc:
            log.warning("notification listener cannot connect: %s", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff_s)
            continue
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
            backoff = initial_backoff_s
            if ready is not None:
                ready.set()
            async for note in conn.notifies():
                parsed = parse(note.payload)
                if parsed is not None:
                    yield parsed
        except (psycopg.Error, OSError) as exc:
            log.warning("notification listener lost its connection: %s", exc)
            if ready is not None:
                ready.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff_s)
        finally:
            await conn.close()
