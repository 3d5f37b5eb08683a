"""Alembic environment of the lash store.

The store passes an open connection in ``config.attributes["connection"]`` (it already holds
the migration advisory lock); the ``alembic`` command line passes ``-x url=...`` instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from lash_core.store.postgres.tables import metadata
from lash_core.store.postgres.urls import sync_url

VERSION_TABLE = "lash_alembic_version"

config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("pass the database with: alembic -x url=postgresql://... upgrade head")
    engine = create_engine(sync_url(url))
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()
