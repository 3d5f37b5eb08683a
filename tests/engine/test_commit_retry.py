"""Store errors on the final commit: the same commit is retried and lands exactly once."""

from __future__ import annotations

from typing import Any

from lash_core.commit import CommitResult, RuntimeCommit
from lash_core.engine.driver import SessionDriver
from lash_core.errors import RetryableStoreError
from lash_core.store.base import Store
from tests.engine.support import agent, new_session_id, owner
from tests.engine.test_concurrency import assert_each_input_once
from tests.engine.test_turns import admit, committed_events


class FlakyCommits:
    """Fails the first final commit, either before or after it really lands."""

    def __init__(self, inner: Store, *, land_first: bool) -> None:
        self._inner = inner
        self._land_first = land_first
        self.failures = 0
        self.seen: list[RuntimeCommit] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def commit(self, commit: RuntimeCommit) -> CommitResult:
        self.seen.append(commit)
        if commit.turn is not None and self.failures == 0:
            self.failures += 1
            if self._land_first:
                await self._inner.commit(commit)
            raise RetryableStoreError("connection dropped")
        return await self._inner.commit(commit)


async def test_a_commit_that_failed_before_landing_is_retried(store: Store) -> None:
    sid = new_session_id()
    await admit(store, sid, "retry me")
    flaky = FlakyCommits(store, land_first=False)
    report = await SessionDriver(flaky, agent(), owner("w")).drain(sid)  # type: ignore[arg-type]
    assert len(report.turns) == 1 and not report.turns[0].replayed
    assert flaky.seen[0] == flaky.seen[1]  # the SAME commit
    assert len(await committed_events(store, sid)) == 1
    await assert_each_input_once(store, sid)


async def test_a_commit_that_landed_before_the_error_replays(store: Store) -> None:
    sid = new_session_id()
    await admit(store, sid, "landed already")
    flaky = FlakyCommits(store, land_first=True)
    report = await SessionDriver(flaky, agent(), owner("w")).drain(sid)  # type: ignore[arg-type]
    assert len(report.turns) == 1 and report.turns[0].replayed
    assert len(await committed_events(store, sid)) == 1
    await assert_each_input_once(store, sid)
    lease = await store.read_lease(sid)
    assert lease is not None and lease.lease_token is None
