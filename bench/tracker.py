"""Matching publishes to observed commits: the single place latency is computed.

The pipeline and the baseline are measured by the same code from the same observer: an
input counts as committed when the first commit event naming it arrives. Commit events
name inputs by ``input_id``; the bench sets its own ids, but if a worker minted others the
``input.admitted`` events (which carry the ``source_key``) map them back, even when the
commit is seen before the admission event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.stats import latency_summary
from bench.workload import Submission


@dataclass
class CommitTracker:
    """Publish times, commit times and event counts of one run."""

    expected: dict[str, Submission] = field(default_factory=dict)
    published_at: dict[str, float] = field(default_factory=dict)
    committed_at: dict[str, float] = field(default_factory=dict)
    events_by_type: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    duplicate_events: int = 0
    turns: set[str] = field(default_factory=set)
    first_publish: float | None = None
    last_commit: float | None = None
    _by_source: dict[tuple[str, str], str] = field(default_factory=dict)
    _alias: dict[str, str] = field(default_factory=dict)
    _unresolved: dict[str, float] = field(default_factory=dict)
    _seen_message_ids: set[str] = field(default_factory=set)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _failure: str | None = None

    def fail(self, reason: str) -> None:
        """Abort :meth:`wait_all` (e.g. inputs are being dead-lettered)."""
        self._failure = reason
        self._done.set()

    def expect(self, submissions: list[Submission]) -> None:
        for sub in submissions:
            self.expected[sub.input_id] = sub
            self._by_source[(sub.session_id, sub.source_key)] = sub.input_id
        self._check_done()

    def published(self, input_id: str, at: float | None = None) -> None:
        at = time.perf_counter() if at is None else at
        self.published_at[input_id] = at
        if self.first_publish is None or at < self.first_publish:
            self.first_publish = at

    def seen_message(self, message_id: str | None) -> bool:
        """Record a durable event's ``message_id``; True if it was already seen."""
        if not message_id:
            return False
        if message_id in self._seen_message_ids:
            self.duplicate_events += 1
            return True
        self._seen_message_ids.add(message_id)
        return False

    def count_event(self, event_type: str) -> None:
        self.events_by_type[event_type] += 1

    def admitted(self, session_id: str, source_key: str | None, input_id: str) -> None:
        """An ``input.admitted`` event: learn the id a worker gave our source key."""
        if source_key is None or input_id in self.expected:
            return
        ours = self._by_source.get((session_id, source_key))
        if ours is None:
            return
        self._alias[input_id] = ours
        at = self._unresolved.pop(input_id, None)
        if at is not None:
            self._commit(ours, at)

    def committed(
        self,
        turn_key: str,
        input_ids: list[str],
        outcome: str | None = None,
        at: float | None = None,
    ) -> None:
        """A commit event (``turn.committed`` or the baseline's confirmation)."""
        at = time.perf_counter() if at is None else at
        if turn_key in self.turns:
            self.duplicate_events += 1
            return
        self.turns.add(turn_key)
        if outcome is not None:
            self.outcomes[outcome] += 1
        for input_id in input_ids:
            ours = input_id if input_id in self.expected else self._alias.get(input_id)
            if ours is None:
                self._unresolved[input_id] = at
            else:
                self._commit(ours, at)

    def _commit(self, input_id: str, at: float) -> None:
        if input_id in self.committed_at:
            return
        self.committed_at[input_id] = at
        if self.last_commit is None or at > self.last_commit:
            self.last_commit = at
        self._check_done()

    def _check_done(self) -> None:
        if self.expected and len(self.committed_at) >= len(self.expected):
            self._done.set()

    async def wait_all(self, stall_timeout_s: float) -> None:
        """Return when every expected input committed; raise if progress stalls."""
        loop = asyncio.get_running_loop()
        last_count = -1
        last_progress = loop.time()
        while not self._done.is_set():
            count = len(self.committed_at)
            if count != last_count:
                last_count, last_progress = count, loop.time()
            remaining = stall_timeout_s - (loop.time() - last_progress)
            if remaining <= 0:
                raise StallError(
                    f"no input committed for {stall_timeout_s:.0f}s: "
                    f"{count}/{len(self.expected)} committed, "
                    f"{len(self.published_at)} published, events {dict(self.events_by_type)}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), min(remaining, 1.0))
        if self._failure is not None:
            raise StallError(self._failure)

    def latencies_ms(self) -> list[float]:
        return [
            (done - self.published_at[i]) * 1000.0
            for i, done in self.committed_at.items()
            if i in self.published_at
        ]

    def latency_windows(self, window_s: float) -> list[dict[str, float | int]]:
        """Latency by when inputs were published, in windows of ``window_s`` from the first
        publish: whether a long paced run's latency grows as it goes (state that piles up)
        or is the same throughout (a steady load's queueing)."""
        if window_s <= 0 or self.first_publish is None:
            return []
        windows: dict[int, list[float]] = {}
        for input_id, done in self.committed_at.items():
            at = self.published_at.get(input_id)
            if at is None:
                continue
            index = int((at - self.first_publish) // window_s)
            windows.setdefault(index, []).append((done - at) * 1000.0)
        return [
            {"start_s": round(index * window_s, 1), **latency_summary(values)}
            for index, values in sorted(windows.items())
        ]

    @property
    def unmatched(self) -> int:
        """Committed ids that never mapped to a bench input (after the run)."""
        return len(self._unresolved)


class StallError(RuntimeError):
    """The system under test stopped making progress."""
