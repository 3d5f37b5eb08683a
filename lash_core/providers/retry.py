"""Retry timing for HTTP providers: exponential backoff with jitter and ``Retry-After``.

Kept apart from the HTTP code so the arithmetic is testable without a server and the
same policy can serve any future HTTP provider.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRYABLE_STATUSES = frozenset({408, 429})


def is_retryable_status(status: int) -> bool:
    """429 (rate limited), 408 (request timeout) and every 5xx may succeed on a retry."""
    return status in RETRYABLE_STATUSES or 500 <= status <= 599


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    Returns ``None`` when the header is absent or unreadable (the caller then falls back to
    its own backoff), and never a negative number (a date in the past means "now").
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN is unreadable
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def backoff_delay(
    attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Delay before retry number ``attempt + 1``: ``base * 2**attempt``, capped, jittered.

    The jitter draws uniformly from the upper half of the window ("equal jitter"), so
    retries from many workers spread out while each still waits at least half the nominal
    delay.
    """
    nominal = min(max_s, base_s * (2.0 ** max(0, attempt)))
    draw = rng.random() if rng is not None else random.random()
    return nominal / 2 + draw * nominal / 2
