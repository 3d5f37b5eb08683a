"""Fresh, disposable service resources for one benchmark run.

Each run gets its own database ``lash_bench_<random>`` and its own namespace, and both
are removed afterwards, so runs never see each other's rows, queues or statistics and
other engineers' tests on the same services are never disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import psycopg


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` (same server, credentials and options)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def plain_postgres_url(url: str) -> str:
    """Strip a SQLAlchemy driver suffix (``postgresql+psycopg://``) for psycopg."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


def dbname_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, prefix: str = "lash_bench") -> AsyncIterator[str]:
    """Create an empty database on ``server_url``'s server; drop it (forcefully) afterwards."""
    admin = plain_postgres_url(server_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin, name)
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def xact_commit(server_url: str, dbname: str) -> int:
    """Committed transactions of ``dbname`` so far (``pg_stat_database.xact_commit``).

    Read over a connection to the server's maintenance database so the reading itself
    never counts toward the benchmarked database.
    """
    admin = plain_postgres_url(server_url)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)
        )
        row = await cur.fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


async def settled_xact_commit(
    server_url: str, dbname: str, *, timeout_s: float = 5.0, quiet_s: float = 0.3
) -> int:
    """``xact_commit`` once it stops moving.

    Backends flush their statistics when they exit, slightly after the client closed the
    socket; polling until two reads agree makes the final count include every
    transaction of the stopped processes.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = await xact_commit(server_url, dbname)
    while loop.time() < deadline:
        await asyncio.sleep(quiet_s)
        now = await xact_commit(server_url, dbname)
        if now == last:
            return now
        last = now
    return last


async def autovacuum_runs(database_url: str) -> int:
    """Autovacuum and autoanalyze passes over ``database_url``'s tables so far.

    Their transactions count in ``xact_commit`` too; reporting them shows when a
    transaction count includes the server's own maintenance.
    """
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0) FROM pg_stat_all_tables"
        )
        row = await cur.fetchone()
    return int(row[0]) if row is not None else 0


def unique_namespace(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _listed_names(kind: str, namespace: str) -> list[str]:
    """Queues or exchanges named ``{namespace}.*`` as ``rabbitmqctl`` lists them.

    Best effort: only used to also remove names the bench does not know of (workers may
    declare more than the contract's topology); without ``rabbitmqctl`` the known names
    are still removed.
    """
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return []
    try:
        proc = await asyncio.create_subprocess_exec(
            tool,
            "-q",
            f"list_{kind}",
            "name",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=20)
    except (OSError, TimeoutError):
        return []
    if proc.returncode != 0:
        return []
    names = (line.strip() for line in out.decode(errors="replace").splitlines())
    return [n for n in names if n.startswith(namespace + ".")]


async def delete_namespace(amqp_url: str, namespace: str, known: list[str]) -> None:
    """Delete every queue and exchange of ``namespace`` (known names plus listed ones)."""
    queues = set(known) | set(await _listed_names("queues", namespace))
    exchanges = set(known) | set(await _listed_names("exchanges", namespace))
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for name in sorted(queues):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
            with contextlib.suppress(Exception):
                await channel.close()
        for name in sorted(exchanges):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
            with contextlib.suppress(Exception):
                await channel.close()
