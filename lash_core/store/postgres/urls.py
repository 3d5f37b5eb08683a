"""Database URL normalisation: callers pass plain ``postgresql://`` URLs."""

from __future__ import annotations

_PREFIXES = ("postgresql+psycopg://", "postgresql+psycopg2://", "postgresql://", "postgres://")


def _rest(url: str) -> str:
    for prefix in _PREFIXES:
        if url.startswith(prefix):
            return url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url.split('://', 1)[0]}://...")


def async_url(url: str) -> str:
    """The SQLAlchemy URL of the psycopg 3 async dialect."""
    return "postgresql+psycopg://" + _rest(url)


def sync_url(url: str) -> str:
    """The SQLAlchemy URL of the psycopg 3 sync dialect (Alembic from the CLI)."""
    return "postgresql+psycopg://" + _rest(url)


def libpq_url(url: str) -> str:
    """A plain libpq URL for direct psycopg connections (LISTEN)."""
    return "postgresql://" + _rest(url)
