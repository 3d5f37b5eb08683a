"""The PostgreSQL implementation of the lash store (psycopg 3 pool at run time; SQLAlchemy
and Alembic for the schema and migrations)."""

from lash_core.store.postgres.migrate import migrate, upgrade
from lash_core.store.postgres.store import PostgresStore

__all__ = ["PostgresStore", "migrate", "upgrade"]
