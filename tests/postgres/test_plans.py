"""The store's connections keep keyed access in the plans they cache.

With ``plan_cache_mode=force_generic_plan`` a connection plans a statement once and keeps
the plan. Planned on an empty table (a new database, or one autovacuum has not analyzed
yet), a join by key becomes a sequential scan with a hash join, kept while the table grows;
the store's connections turn those methods off (``_KEYED_ACCESS_ONLY`` in ``store.py``).
A temporary table stands in for a new ``lash_events``: autovacuum never analyzes it.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from lash_core.store.postgres import PostgresStore
from lash_core.store.postgres.db import text
from lash_core.store.postgres.store import _BULK_ACCESS
from lash_core.store.postgres.urls import libpq_url

pytestmark = pytest.mark.postgres

_SETUP = "CREATE TEMP TABLE fresh_events (LIKE lash_events INCLUDING ALL)"
_MARK = (
    "PREPARE mark_fresh(text[], bigint[]) AS UPDATE fresh_events e SET published = true"
    " FROM unnest($1, $2) AS k(session_id, seq)"
    " WHERE e.session_id = k.session_id AND e.seq = k.seq"
)
_GROW = (
    "INSERT INTO fresh_events (session_id, seq, revision, type, payload, created_at_ms, shard)"
    " SELECT 's-' || (i / 10), i % 10, 0, 't', '{}', 0, 0 FROM generate_series(1, 20000) i"
)
_EXPLAIN = "EXPLAIN EXECUTE mark_fresh('{s-5}', '{1}')"
_SETTINGS = text(
    "SELECT current_setting('enable_seqscan'), current_setting('enable_hashjoin'),"
    " current_setting('enable_mergejoin')"
)


async def _plan_after_growth(conn: psycopg.AsyncConnection[Any]) -> str:
    """Prepare on the empty table, plan once, grow the table, show the kept plan."""
    await conn.execute(_SETUP)
    await conn.execute(_MARK)
    await conn.execute("EXECUTE mark_fresh('{s-1}', '{1}')")  # planned now, on no rows
    await conn.execute(_GROW)
    rows = await (await conn.execute(_EXPLAIN)).fetchall()
    return "\n".join(str(r[0]) for r in rows)


async def test_a_plan_made_on_an_empty_table_stays_keyed_on_store_connections(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    store, _ = stores
    async with store.database.single() as conn:
        raw = conn._raw  # the pooled psycopg connection, with the store's options
        plan = await _plan_after_growth(raw)
        await raw.execute("DISCARD TEMP")
        await raw.execute("DEALLOCATE mark_fresh")
    assert "Index Scan using fresh_events_pkey" in plan, plan
    assert "Seq Scan" not in plan and "Hash Join" not in plan, plan


async def test_without_those_settings_the_kept_plan_scans_the_table(pg_url: str) -> None:
    """The control: what the settings prevent (so the test above can fail)."""
    conn = await psycopg.AsyncConnection.connect(
        libpq_url(pg_url), autocommit=True, options="-c plan_cache_mode=force_generic_plan"
    )
    try:
        plan = await _plan_after_growth(conn)
    finally:
        await conn.close()
    assert "Seq Scan on fresh_events" in plan, plan


async def test_bulk_access_turns_them_on_for_its_transaction_only(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """What ``PostgresStore.vacuum`` runs first, so its deletes by age may scan."""
    store, _ = stores
    async with store.database.transaction() as conn:
        await conn.execute(_BULK_ACCESS)
        inside = list((await conn.execute(_SETTINGS)).one())
    async with store.database.single() as conn:
        after = list((await conn.execute(_SETTINGS)).one())
    assert inside == ["on", "on", "on"]
    assert after == ["off", "off", "off"]
