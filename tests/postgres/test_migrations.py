"""Schema migrations: concurrent starts are safe, re-running is a no-op, newer schemas refused."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from lash_core.errors import SchemaVersionError
from lash_core.store.postgres import PostgresStore, migrate, upgrade
from tests import services

pytestmark = pytest.mark.postgres


def _version(url: str) -> list[tuple[str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version_num FROM lash_alembic_version").fetchall()


async def test_concurrent_starts_on_an_empty_database_migrate_once() -> None:
    with services.fresh_database("lash_mig") as url:
        stores = [PostgresStore(url, pool_size=2) for _ in range(4)]
        try:
            await asyncio.gather(*(s.start() for s in stores))
            assert _version(url) == [("0001",)]
            # Every handle works against the one schema.
            assert await stores[0].now_ms() > 0
            await migrate(url)
            await asyncio.to_thread(upgrade, url)
            assert _version(url) == [("0001",)]
        finally:
            await asyncio.gather(*(s.close() for s in stores))


async def test_a_schema_newer_than_the_code_is_refused() -> None:
    with services.fresh_database("lash_mig") as url:
        await migrate(url)
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE lash_alembic_version SET version_num = '9999_future'")
        store = PostgresStore(url)
        with pytest.raises(SchemaVersionError):
            await store.start()
        with pytest.raises(SchemaVersionError):
            await asyncio.to_thread(upgrade, url)


def test_table_definitions_match_the_migrated_schema(pg_url: str) -> None:
    """``tables.py`` and the migrations describe the same schema (autogenerate finds no diff)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from lash_core.store.postgres.migrate import VERSION_TABLE
    from lash_core.store.postgres.tables import metadata
    from lash_core.store.postgres.urls import sync_url

    upgrade(pg_url)
    engine = create_engine(sync_url(pg_url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()
