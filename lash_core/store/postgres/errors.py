"""Translate driver errors into :mod:`lash_core.errors` so no psycopg/SQLAlchemy type leaks.

Serialization failures, deadlocks, lock and statement timeouts are transient
(:class:`RetryableStoreError`); a lost or refused connection is :class:`StoreUnavailable`;
everything else is a :class:`StoreError`.
"""

from __future__ import annotations

import psycopg
from sqlalchemy import exc as sa_exc

from lash_core.errors import LashError, RetryableStoreError, StoreError, StoreUnavailable

#: serialization_failure, deadlock_detected, lock_not_available, query_canceled (timeouts),
#: invalid_sql_statement_name (a statement the connection had prepared was dropped behind
#: the store's back: the next attempt prepares it again).
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014", "26000"})
#: The SQLSTATEs of the transient subset that lash maps to a head conflict inside commit.
CAS_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE behind a driver error, if any."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    if isinstance(orig, psycopg.Error):
        return orig.sqlstate
    return None


def is_driver_error(exc: BaseException) -> bool:
    return isinstance(exc, sa_exc.SQLAlchemyError | psycopg.Error | OSError)


def translate(exc: BaseException) -> LashError:
    """The lash_core error for a driver exception (``LashError`` passes through)."""
    if isinstance(exc, LashError):
        return exc
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return StoreUnavailable(f"database connection lost: {exc.orig}")
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    state = sqlstate(exc)
    if state in RETRYABLE_SQLSTATES:
        return RetryableStoreError(f"transient database error {state}: {orig}")
    if state is not None and state.startswith(("08", "57P")):
        return StoreUnavailable(f"database unavailable ({state}): {orig}")
    if isinstance(orig, psycopg.OperationalError | OSError) or isinstance(
        exc, sa_exc.TimeoutError | sa_exc.DisconnectionError
    ):
        return StoreUnavailable(f"database unavailable: {orig}")
    return StoreError(f"database error{f' {state}' if state else ''}: {orig}")
