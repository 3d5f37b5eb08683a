"""The PostgreSQL implementation of the lash store (SQLAlchemy async Core on psycopg 3)."""

from lash_core.store.postgres.migrate import migrate, upgrade
from lash_core.store.postgres.store import PostgresStore

__all__ = ["PostgresStore", "migrate", "upgrade"]
