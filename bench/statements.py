"""Which SQL statements a run executes, from the PostgreSQL server log.

A diagnostic for a local server: the bench database gets ``log_statement = 'all'``
before the processes connect, and the server log lines of that database written during
the measured window are counted by statement (normalised to their first characters).
It needs a readable server log and a ``log_line_prefix`` that contains ``%d``
(the Debian default ``%m [%p] %q%u@%d`` does). Logging every statement slows the
server, so runs with it are diagnostics, not measurements.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from bench.resources import plain_postgres_url

_STATEMENT = re.compile(r"LOG:\s+(?:statement|execute [^:]*): (.*)")
_SPACES = re.compile(r"\s+")
# Literals, so statements sent as ``EXECUTE name('session', 42)`` (the store's pipelined
# transactions, lash_core/store/postgres/db.py) count as one shape, not one per session.
_LITERALS = re.compile(r"'(?:[^']|'')*'|\b\d+\b")


async def server_log_path(server_url: str) -> Path | None:
    """The server's current log file, if this process can read it."""
    admin = plain_postgres_url(server_url)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_current_logfile(), current_setting('data_directory')")
        row = await cur.fetchone()
        cur = await conn.execute("SELECT current_setting('server_version_num')::int / 10000")
        version = await cur.fetchone()
    candidates: list[Path] = []
    if row is not None and row[0]:
        logfile = Path(str(row[0]))
        candidates.append(logfile if logfile.is_absolute() else Path(str(row[1])) / logfile)
    if version is not None:
        candidates.append(Path(f"/var/log/postgresql/postgresql-{version[0]}-main.log"))
    for path in candidates:
        try:
            with path.open("rb"):
                return path
        except OSError:
            continue
    return None


async def enable_statement_log(server_url: str, dbname: str) -> None:
    """Log every statement of ``dbname`` (affects connections opened from now on)."""
    admin = plain_postgres_url(server_url)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f"ALTER DATABASE \"{dbname}\" SET log_statement = 'all'")


def log_size(path: Path) -> int:
    return path.stat().st_size


def count_statements(path: Path, start: int, end: int, dbname: str) -> Counter[str]:
    """Statements of ``dbname`` logged between byte offsets ``start`` and ``end``."""
    with path.open("rb") as log:
        log.seek(start)
        text = log.read(max(end - start, 0)).decode(errors="replace")
    marker = f"@{dbname} "
    counts: Counter[str] = Counter()
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if marker not in line:
            continue
        match = _STATEMENT.search(line)
        if match is None:
            continue
        statement = match.group(1)
        # A statement that starts with a newline continues on tab-indented lines.
        follow = index + 1
        while not statement.strip() and follow < len(lines) and lines[follow][:1] in "\t ":
            statement = lines[follow]
            follow += 1
        statement = _SPACES.sub(" ", _LITERALS.sub("?", statement)).strip() or "(empty)"
        counts[statement[:120]] += 1
    return counts


def statements_report(counts: Counter[str], turns: int, top: int = 20) -> dict[str, Any]:
    """Total and most frequent statements, also per turn."""

    def per_turn(n: int) -> float | None:
        return round(n / turns, 2) if turns else None

    return {
        "total": sum(counts.values()),
        "per_turn": per_turn(sum(counts.values())),
        "top": [
            {"statement": statement, "count": n, "per_turn": per_turn(n)}
            for statement, n in counts.most_common(top)
        ],
    }
