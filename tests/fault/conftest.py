"""Fixtures of the fault tests and the figures summary (shared with ``tests/soak``)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.fault import figures
from tests.fault.harness import Harness, harness

HarnessFactory = Callable[..., AbstractAsyncContextManager[Harness]]


@pytest.fixture
def make_harness(pg_url: str, amqp_url: str, namespace: str, tmp_path: Path) -> HarnessFactory:
    """``async with make_harness(echo_delay_ms=...) as h:`` - one test's workers and checker."""

    def factory(**worker_settings: Any) -> AbstractAsyncContextManager[Harness]:
        return harness(pg_url, amqp_url, namespace, tmp_path, **worker_settings)

    return factory


def pytest_terminal_summary(terminalreporter: Any) -> None:
    summary_once(terminalreporter)


def pytest_sessionfinish(session: pytest.Session) -> None:
    write_once()


_done: set[str] = set()


def summary_once(terminalreporter: Any) -> None:
    lines = figures.summary_lines()
    if not lines or "summary" in _done:
        return
    _done.add("summary")
    terminalreporter.section("fault figures (also in .fault-figures.json)")
    for line in lines:
        terminalreporter.write_line(line)


def write_once() -> None:
    if figures.FIGURES and "write" not in _done:
        _done.add("write")
        figures.write()
