"""Fault injection aimed only at this test's workers.

The broker and the database are shared with other engineers' test runs, so nothing here
acts broadly: a worker's TCP connections are found from ``/proc`` (socket inodes of its
pid mapped to local ports), and only the broker connections / database backends whose
peer port is one of those are closed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg

RABBITMQCTL = "rabbitmqctl"


def have_rabbitmqctl() -> bool:
    """Broker faults need ``rabbitmqctl`` on this machine (not so with a containerised
    broker); callers skip those faults - or, under ``CI=true``, fail - without it."""
    return shutil.which(RABBITMQCTL) is not None


def fast_reconnect(amqp_url: str, interval_s: float = 0.2) -> str:
    """``amqp_url`` with aio-pika's reconnect interval shortened (default 5 s), so a test
    that drops its own broker connection sees the reconnect quickly."""
    separator = "&" if "?" in amqp_url else "?"
    return f"{amqp_url}{separator}reconnect_interval={interval_s}"


@dataclass
class FaultLog:
    """What was injected, for the figures."""

    counts: dict[str, int] = field(default_factory=dict)
    events: list[tuple[float, str, str]] = field(default_factory=list)

    def record(self, kind: str, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.events.append((time.time(), kind, detail))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def local_ports(pids: Iterable[int], remote_port: int) -> set[int]:
    """Local TCP ports of established connections from ``pids`` to ``remote_port``."""
    inodes: set[int] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                next(fh)
                for line in fh:
                    cols = line.split()
                    local, remote, state, inode = cols[1], cols[2], cols[3], int(cols[9])
                    if state != "01" or inode not in inodes:
                        continue
                    if int(remote.rsplit(":", 1)[1], 16) == remote_port:
                        ports.add(int(local.rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


async def _run(*argv: str, timeout_s: float = 30.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv[0]} timed out") from None
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {err.decode(errors='replace')}")
    return out.decode(errors="replace")


async def close_broker_connections(
    pids: Iterable[int], log: FaultLog, amqp_port: int = 5672
) -> int:
    """Close (server side) every broker connection of the given worker pids; how many
    closed.

    ``rabbitmqctl close_connection`` takes the connection's Erlang pid as
    ``list_connections`` prints it in its plain tab-separated form (not a connection name,
    nor the JSON formatter's ``#PID<...>``, both of which it refuses).
    """
    ports = local_ports(pids, amqp_port)
    if not ports:
        return 0
    listing = await _run(RABBITMQCTL, "list_connections", "pid", "peer_port", "-q")
    connections: list[str] = []
    for line in listing.splitlines():
        fields = line.split("\t")
        if len(fields) == 2 and fields[1].strip().isdigit() and int(fields[1]) in ports:
            connections.append(fields[0].strip())

    async def close(pid: str) -> bool:
        try:
            await _run(RABBITMQCTL, "close_connection", pid, "fault test: connection drop")
        except AssertionError:  # gone since it was listed
            return False
        return True

    closed = sum(await asyncio.gather(*(close(pid) for pid in connections)))
    log.record("broker_connection_close", f"{closed} of {len(connections)} connections")
    return closed


async def terminate_db_backends(
    database_url: str, pids: Iterable[int], log: FaultLog, pg_port: int = 5432
) -> int:
    """``pg_terminate_backend`` for every backend of the given worker pids in our database."""
    ports = local_ports(pids, pg_port)
    if not ports:
        return 0
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid, client_port FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        rows = await cur.fetchall()
        victims = [pid for pid, port in rows if port in ports]
        for pid in victims:
            await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    log.record("db_backend_terminate", f"{len(victims)} backends")
    return len(victims)


async def lease_table(database_url: str) -> str:
    """The name of the session lease table (the store's schema is its own business)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND tablename LIKE %s ORDER BY length(tablename)",
            ("%lease%",),
        )
        row = await cur.fetchone()
    if row is None:
        raise AssertionError("no lease table found in the database")
    return str(row[0])


async def stall_table(database_url: str, table: str, hold_s: float, log: FaultLog) -> None:
    """Hold an ACCESS EXCLUSIVE lock on ``table`` for ``hold_s`` seconds (a stalled database)."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
        log.record("db_table_stall", f"{table} for {hold_s}s")
        await asyncio.sleep(hold_s)
        await conn.rollback()
