"""The store's run-time database access: a psycopg 3 connection pool, named-parameter SQL,
transactions and single-statement calls.

Why not SQLAlchemy at run time: the store only ever sends hand-written SQL, and on this
hot path SQLAlchemy's async Core (greenlet bridge, compiled-cache lookups, result
wrapping, pool events) doubled psycopg's own CPU: about 280 µs against 140 µs per
statement and 720 µs against 390 µs per one-statement transaction, measured on the
development machine with ``SELECT`` of a lease row. A turn sends about ten statements, so
that was a large share of a worker's CPU. Migrations still use SQLAlchemy with Alembic
(:mod:`lash_core.store.postgres.migrate`), which is where they are good.

The statements keep SQLAlchemy's ``:name`` parameter style (readable, and shared by the
migrations); :func:`text` turns them into psycopg's ``%(name)s`` once per distinct string.
Connections are in autocommit mode: :meth:`Database.transaction` sends ``BEGIN`` and
``COMMIT`` (or ``ROLLBACK`` when its block raises) around a block, and
:meth:`Database.single` runs one statement as its own transaction, without either;
:meth:`Connection.after_commit` defers a callback until the work is committed. Rows
are named tuples: ``row.column``, ``row[0]`` and ``row._asdict()``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.adapt
import psycopg.errors
from psycopg import pq
from psycopg.rows import RowMaker
from psycopg.types.array import ListBinaryDumper
from psycopg_pool import AsyncConnectionPool

from lash_core.errors import StoreError

#: ``:name`` outside ``::type`` casts (the rule SQLAlchemy's ``text()`` uses).
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")

StatementListener = Callable[[str], None]

#: The status of a result that carries rows.
_TUPLES_OK = pq.ExecStatus.TUPLES_OK


@dataclass(frozen=True, slots=True)
class Sql:
    """One statement: its source (``:name`` parameters) and its psycopg form."""

    source: str
    query: str


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement prepared by name with SQL ``PREPARE`` on each connection that runs it,
    so that :meth:`Database.transaction` can send ``BEGIN`` and its ``EXECUTE`` in one
    message. ``source`` has ``$1``, ``$2`` ... parameters of ``types``."""

    name: str
    types: tuple[str, ...]
    source: str

    @property
    def prepare_sql(self) -> str:
        return f"PREPARE {self.name}({', '.join(self.types)}) AS {self.source}"


@dataclass(frozen=True, slots=True)
class Opening:
    """A statement a transaction opens with: ``statement`` with ``args``, sent with
    ``BEGIN``; its result is kept on the :class:`Connection` under ``key`` until taken."""

    statement: Prepared
    args: tuple[Any, ...]
    key: object


@functools.lru_cache(maxsize=1024)
def _positional(source: str) -> tuple[tuple[str, ...], str]:
    """The parameter names of ``source`` in order of first use, and ``source`` with
    ``$1``, ``$2`` ... in their place."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    numbered = _BIND.sub(number, source)
    return tuple(names), numbered


def _sql_type(value: Any) -> str:
    """The type a final statement (:meth:`Connection.execute_and_commit`) declares for a
    parameter with ``value``: what psycopg's extended protocol would send, with strings
    and ``NULL`` left ``unknown`` for the server to infer from where they are used."""
    if value is None or isinstance(value, str):
        return "unknown"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, float):
        return "double precision"
    if isinstance(value, list):
        numbers = value and all(type(v) is int for v in value)
        return "bigint[]" if numbers else "text[]"
    raise TypeError(f"no SQL type for a final statement's parameter {value!r}")


@functools.lru_cache(maxsize=1024)
def _final_statement(numbered: str, types: tuple[str, ...], epoch: int) -> Prepared:
    """``numbered`` with parameter ``types`` as a statement prepared by name; the name is
    new for each ``epoch`` of a connection's prepared statements
    (:attr:`PooledConnection.prepared_epoch`)."""
    digest = hashlib.blake2b(f"{types}{numbered}".encode(), digest_size=8).hexdigest()
    return Prepared(f"lash_f{digest}_{epoch}", types, numbered)


def prepared(name: str, source: str, **types: str) -> Prepared:
    """``source`` (``:name`` parameters, as for :func:`text`) as the :class:`Prepared`
    statement ``name``; ``types`` maps each parameter to its SQL type, in the order of the
    ``EXECUTE`` arguments."""
    order = list(types)
    numbered = _BIND.sub(lambda m: f"${order.index(m.group(1)) + 1}", source)
    return Prepared(name, tuple(types.values()), numbered)


@functools.lru_cache(maxsize=2048)
def text(source: str) -> Sql:
    """The statement ``source`` with ``:name`` parameters, converted once per string.

    Many statements are assembled per call from a few fixed shapes, so the conversion is
    memoised; literal ``%`` signs are escaped for psycopg."""
    return Sql(source, _BIND.sub(r"%(\1)s", source.replace("%", "%%")))


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> Callable[[Sequence[Any]], Any]:
    # rename: a name used twice (several ``pg_notify(...)`` columns) or not an identifier
    # becomes ``_<position>``; every other column keeps its name.
    factory: Any = namedtuple  # its field names vary per query: not a literal mypy can check
    cls: Any = factory("Row", names, rename=True)
    make: Callable[[Sequence[Any]], Any] = cls._make
    return make


def named_rows(cursor: psycopg.AsyncCursor[Any]) -> RowMaker[Any]:
    """psycopg row factory: named tuples, tolerant of repeated column names.

    Reads the column names off the result itself: ``cursor.description`` would build a
    ``Column`` object per column on every call, a measurable share of a statement's CPU."""
    result = cursor.pgresult
    if result is None or result.status != _TUPLES_OK:
        return tuple
    names = tuple(_column_name(result.fname(i)) for i in range(result.nfields))
    return _row_class(names)


@functools.lru_cache(maxsize=1024)
def _column_name(raw: bytes | None) -> str:
    return raw.decode() if raw is not None else ""


class Result:
    """The rows of one statement, fetched eagerly (statements here return few rows)."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)

    def all(self) -> list[Any]:
        return self._rows

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise StoreError(f"expected exactly one row, got {len(self._rows)}")
        return self._rows[0]

    def one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise StoreError(f"expected at most one row, got {len(self._rows)}")
        return self._rows[0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]


class PooledConnection(psycopg.AsyncConnection[Any]):
    """A pool's connection, with what the store keeps per connection: one cursor for all
    its statements, and the names of the :class:`Prepared` statements it holds.

    A fresh cursor per statement (what ``AsyncConnection.execute`` makes) was about a fifth
    of psycopg's client CPU per statement: measured on the development machine, 121-131 us
    against 98-104 us for one statement with four parameters on a reused cursor. A
    connection is lent to one task at a time, and each statement's rows are read before
    the next is sent, so one cursor serves them all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._statement_cursor: psycopg.AsyncCursor[Any] | None = None
        self.prepared_names: set[str] = set()
        #: Counts :meth:`forget_prepared` calls. Final statements
        #: (:meth:`Connection.execute_and_commit`) are named per epoch: one prepared inside
        #: a transaction never meets a leftover of the same name the server kept (the
        #: error would end the transaction).
        self.prepared_epoch = 0

    def forget_prepared(self) -> None:
        """The server may have dropped every statement this connection prepared (psycopg
        sends ``DEALLOCATE ALL`` after a rollback when it holds prepared statements of its
        own), or may not have: prepare each again, under a new name if final."""
        self.prepared_names.clear()
        self.prepared_epoch += 1

    def statement_cursor(self) -> psycopg.AsyncCursor[Any]:
        cursor = self._statement_cursor
        if cursor is None or cursor.closed:
            cursor = self._statement_cursor = self.cursor()
        return cursor


class Connection:
    """A pooled connection lent for one transaction or one statement."""

    __slots__ = ("_committed", "_listeners", "_opened", "_raw")

    def __init__(
        self,
        raw: PooledConnection,
        listeners: Sequence[StatementListener],
        opened: dict[object, Result] | None = None,
    ) -> None:
        self._raw = raw
        self._listeners = listeners
        self._opened = opened
        self._committed: list[Callable[[], None]] | None = None  # most have none

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the work done on this connection is committed (never
        if the block raises): to tell this process about a change only when others can
        see it. Callbacks run in the order given and must not raise."""
        if self._committed is None:
            self._committed = []
        self._committed.append(callback)

    def run_committed(self) -> None:
        """Run (and forget) the :meth:`after_commit` callbacks: the work is committed."""
        callbacks, self._committed = self._committed, None
        for callback in callbacks or ():
            callback()

    def opened(self, key: object) -> Result:
        """:meth:`take_opened` for a transaction that certainly opened under ``key``."""
        result = self.take_opened(key)
        if result is None:
            raise StoreError(f"the transaction did not open with {key!r}")
        return result

    def take_opened(self, key: object) -> Result | None:
        """The result of a statement the transaction opened with, if one was opened under
        ``key`` and not taken yet (once: later reads must see this transaction's writes)."""
        if not self._opened:
            return None
        return self._opened.pop(key, None)

    async def execute(self, sql: Sql, params: Mapping[str, Any] | None = None) -> Result:
        for listener in self._listeners:
            listener(sql.source)
        cursor = self._raw.statement_cursor()
        # Always with a mapping, so the escaped ``%%`` of a parameterless query is undone.
        await cursor.execute(sql.query, params or {})
        result = cursor.pgresult
        rows = await cursor.fetchall() if result and result.status == _TUPLES_OK else []
        return Result(rows, cursor.rowcount)

    async def execute_and_commit(self, sql: Sql, params: Mapping[str, Any] | None = None) -> Result:
        """``sql`` as the transaction's last statement, sent with its ``COMMIT`` as one
        simple-protocol message, ``EXECUTE name(literals); COMMIT``: one round trip
        fewer. The statement is prepared on the connection the first time (in the
        transaction: ``PREPARE`` is not transactional).

        If it fails, ``COMMIT`` is not run and the transaction rolls back as usual. The
        caller must not need to undo anything once it returns: it is committed (later
        statements on ``self`` each commit alone). Outside a transaction opened with
        statements (:meth:`Database.transaction`), it is a plain :meth:`execute` and the
        commit follows the block.

        Arguments go as SQL literals: right for scalars and short lists of ids, not for
        lists of documents (psycopg quotes a text array's elements one by one in Python;
        bound in binary they cost a fifth as much, see ``_configure``)."""
        if self._opened is None:
            return await self.execute(sql, params)
        for listener in self._listeners:
            listener(sql.source)
        raw = self._raw
        names, numbered = _positional(sql.source)
        values = params or {}
        args = [values[name] for name in names]
        types = tuple(_sql_type(arg) for arg in args)
        statement = _final_statement(numbered, types, raw.prepared_epoch)
        if statement.name not in raw.prepared_names:
            await raw.execute(statement.prepare_sql.encode(), prepare=False)
            raw.prepared_names.add(statement.name)
        query = _execute_sql(statement, args, _literal(raw)) + b"; COMMIT"
        cursor = raw.statement_cursor()
        try:
            await cursor.execute(query, prepare=False)
        except psycopg.errors.InvalidSqlStatementName:
            raw.forget_prepared()
            raise
        result = cursor.pgresult
        rows = await cursor.fetchall() if result and result.status == _TUPLES_OK else []
        return Result(rows, cursor.rowcount)


def _literal(raw: PooledConnection) -> Callable[[Any], bytes]:
    """Quotes values as SQL literals for ``raw``, through one adapter context for them all
    (``sql.Literal`` builds one per value)."""
    quote: Callable[[Any], bytes] = psycopg.adapt.Transformer.from_context(raw).as_literal
    return quote


def _execute_sql(
    statement: Prepared, args: Sequence[Any], literal: Callable[[Any], bytes]
) -> bytes:
    """``EXECUTE name(literals)``: ``statement`` with ``args``, for a simple-protocol
    message."""
    name = statement.name.encode()
    if not args:
        return b"EXECUTE " + name
    return b"EXECUTE " + name + b"(" + b", ".join(literal(arg) for arg in args) + b")"


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Set up a new pooled connection.

    Every statement is prepared on its first use (psycopg's default waits for the fifth):
    the store's statements come from a few dozen fixed shapes, each run thousands of times,
    so a pooled connection should plan each once. With the connections'
    ``plan_cache_mode=force_generic_plan`` (see ``PostgresStore.start``) the server then
    reuses that plan instead of planning again for each execution.

    Lists are sent as binary arrays. psycopg's default for ``%s`` is its text array
    format, which quotes each element that needs it and backslash-escapes its quotes with a
    regular-expression substitution per quote: the store's batches pass arrays of JSON
    documents, where that dominated binding. Measured on the development machine, a
    statement with 30 small JSON documents in a ``text[]`` took 629 us against 121 us in
    binary (values, ``NULL`` elements and empty arrays round-trip the same)."""
    conn.prepare_threshold = 0
    conn.prepared_max = 256
    conn.adapters.register_dumper(list, ListBinaryDumper)


class Database:
    """A psycopg connection pool with transactions and statement listeners.

    ``min_size`` connections are opened at :meth:`open` and kept; the pool grows to
    ``max_size`` under load. ``options`` are libpq ``-c`` settings for every connection
    (the store's lock and statement timeouts)."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int,
        max_size: int,
        options: str = "",
        max_lifetime_s: float = 1800.0,
        timeout_s: float = 30.0,
        application_name: str = "lash",
    ) -> None:
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "row_factory": named_rows,
            "application_name": application_name,
        }
        if options:
            kwargs["options"] = options
        self._pool: AsyncConnectionPool[PooledConnection] = AsyncConnectionPool(
            conninfo,
            connection_class=PooledConnection,
            configure=_configure,
            kwargs=kwargs,
            min_size=min_size,
            max_size=max(min_size, max_size),
            max_lifetime=max_lifetime_s,
            timeout=timeout_s,
            open=False,
            name="lash-store",
        )
        self._listeners: list[StatementListener] = []
        self._begin_listeners: list[Callable[[], None]] = []

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    def add_listener(self, listener: StatementListener) -> None:
        """Call ``listener(sql)`` before every statement (instrumentation, tests);
        ``BEGIN`` and ``COMMIT`` are not statements here."""
        self._listeners.append(listener)

    def remove_listener(self, listener: StatementListener) -> None:
        self._listeners.remove(listener)

    def add_begin_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when :meth:`transaction` begins one (instrumentation)."""
        self._begin_listeners.append(listener)

    def remove_begin_listener(self, listener: Callable[[], None]) -> None:
        self._begin_listeners.remove(listener)

    @asynccontextmanager
    async def transaction(self, *openings: Opening) -> AsyncIterator[Connection]:
        """``BEGIN`` ... ``COMMIT`` on one pooled connection; ``ROLLBACK`` if the block raises.

        With ``openings``, ``BEGIN`` and the ``EXECUTE`` of each of their prepared
        statements go as one simple-protocol message: one network round trip instead of one
        each (a statement is prepared on the connection the first time, with its own round
        trip). They run in order, each with its own snapshot (READ COMMITTED), so a later
        one sees what an earlier one waited for. Their results wait on the connection
        (:meth:`Connection.take_opened`)."""
        for listener in self._begin_listeners:
            listener()
        if not openings:
            async with self._pool.connection() as raw:
                async with raw.transaction():
                    conn = Connection(raw, self._listeners)
                    yield conn
                conn.run_committed()
            return
        async with self._pool.connection() as raw:
            opened = await self._open(raw, openings)
            conn = Connection(raw, self._listeners, opened)
            try:
                yield conn
            except BaseException:
                await self._rollback(raw)
                raise
            if raw.pgconn.transaction_status != pq.TransactionStatus.IDLE:
                await raw.commit()  # else its last statement committed it
            conn.run_committed()

    async def _open(
        self, raw: PooledConnection, openings: Sequence[Opening]
    ) -> dict[object, Result]:
        """``BEGIN; EXECUTE a(literals); EXECUTE b(literals)``; each ``EXECUTE``'s rows.

        psycopg answers every ``ROLLBACK`` it sends (its own transactions' too) with
        ``DEALLOCATE ALL``, so a statement prepared here can be gone: then it is prepared
        again and the transaction opened once more."""
        parts = [b"BEGIN"]
        literal = _literal(raw)
        for opening in openings:
            statement = opening.statement
            for listener in self._listeners:
                listener(statement.source)
            parts.append(_execute_sql(statement, opening.args, literal))
        query = b"; ".join(parts)
        prepared = raw.prepared_names
        for attempt in range(2):
            for opening in openings:
                statement = opening.statement
                if statement.name not in prepared:
                    with contextlib.suppress(psycopg.errors.DuplicatePreparedStatement):
                        await raw.execute(statement.prepare_sql.encode(), prepare=False)
                    prepared.add(statement.name)
            try:
                cursor = raw.statement_cursor()
                await cursor.execute(query, prepare=False)
                results: dict[object, Result] = {}
                for opening in openings:
                    cursor.nextset()  # past BEGIN's result (or the last one's), to this one's
                    result = cursor.pgresult
                    ok = result is not None and result.status == _TUPLES_OK
                    rows = await cursor.fetchall() if ok else []
                    results[opening.key] = Result(rows, cursor.rowcount)
                return results
            except psycopg.errors.InvalidSqlStatementName:
                await self._rollback(raw)
                if attempt:
                    raise
            except BaseException:
                await self._rollback(raw)
                raise
        raise AssertionError("unreachable")

    async def _rollback(self, raw: PooledConnection) -> None:
        """End a transaction the caller is abandoning. psycopg follows its ``ROLLBACK`` with
        ``DEALLOCATE ALL``, so nothing stays prepared on ``raw``. A connection too broken to
        roll back is left to the pool, which discards it (the caller's error matters)."""
        if raw.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            return
        raw.forget_prepared()
        with contextlib.suppress(psycopg.Error):
            await raw.rollback()

    @asynccontextmanager
    async def single(self) -> AsyncIterator[Connection]:
        """A pooled connection for statements that are each their own transaction (no
        ``BEGIN``/``COMMIT`` round trips): for one-statement reads and writes."""
        async with self._pool.connection() as raw:
            conn = Connection(raw, self._listeners)
            yield conn
            conn.run_committed()
