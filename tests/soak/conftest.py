"""The soak shares the fault harness fixtures and the figures summary."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fault.conftest import make_harness, summary_once, write_once

__all__ = ["make_harness"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    summary_once(terminalreporter)


def pytest_sessionfinish(session: pytest.Session) -> None:
    write_once()
