"""Apply the Alembic migrations of the lash schema, safely from many workers at once.

Migrations run on one dedicated connection holding a session-level advisory lock, so
concurrent starts serialise and the later ones find the schema at head. A database whose
schema revision this code does not know (a newer release migrated it) is refused with
:class:`~lash_core.errors.SchemaVersionError` rather than used.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from lash_core.errors import LashError, SchemaVersionError
from lash_core.store.postgres.errors import is_driver_error, translate
from lash_core.store.postgres.urls import async_url, sync_url

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "lash_alembic_version"
#: Arbitrary constant naming the migration lock ("lashmig" in ASCII).
MIGRATION_LOCK_KEY = 0x6C6173686D6967


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _check_version(conn: Connection, cfg: Config) -> None:
    current = MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE}
    ).get_current_heads()
    script = ScriptDirectory.from_config(cfg)
    for rev in current:
        try:
            known = script.get_revision(rev)
        except CommandError:
            known = None
        if known is None:
            raise SchemaVersionError(
                f"database schema revision {rev!r} is newer than this code "
                f"(knows up to {script.get_current_head()!r})"
            )


def _upgrade_locked(conn: Connection) -> None:
    """Run on a sync connection: lock, check, upgrade to head, unlock."""
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
    conn.commit()
    try:
        cfg = alembic_config()
        _check_version(conn, cfg)
        conn.commit()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()
    finally:
        if conn.in_transaction():
            conn.rollback()
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
        conn.commit()


async def upgrade_engine(engine: AsyncEngine) -> None:
    """Migrate through an existing async engine (what ``PostgresStore.start`` uses)."""
    try:
        async with engine.connect() as conn:
            await _run_sync(conn)
    except LashError:
        raise
    except Exception as exc:
        if is_driver_error(exc) or isinstance(exc, CommandError):
            raise translate(exc) from exc
        raise


async def _run_sync(conn: AsyncConnection) -> None:
    await conn.run_sync(_upgrade_locked)


async def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (async entry point for the CLI)."""
    engine = create_async_engine(async_url(url), pool_size=1, max_overflow=0)
    try:
        await upgrade_engine(engine)
    finally:
        await engine.dispose()


def upgrade(url: str) -> None:
    """Synchronous variant of :func:`migrate`."""
    engine = create_engine(sync_url(url), pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            _upgrade_locked(conn)
    except LashError:
        raise
    except Exception as exc:
        if is_driver_error(exc) or isinstance(exc, CommandError):
            raise translate(exc) from exc
        raise
    finally:
        engine.dispose()
