"""The worker process's garbage-collector settings (``consumer.collector``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from consumer import collector


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_tune_raises_only_the_young_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    collector.tune()
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, 10, 10)


@pytest.mark.usefixtures("restored_collector")
def test_freeze_exempts_what_is_alive_and_collects_garbage_first() -> None:
    gc.unfreeze()

    class Node:
        def __init__(self) -> None:
            self.me = self

    cyclic_garbage = Node()
    gone = weakref.ref(cyclic_garbage)
    del cyclic_garbage
    kept = Node()
    collector.freeze_startup_heap()
    assert gone() is None  # collected, not frozen
    assert gc.get_freeze_count() > 0
    # What was frozen is in no generation a collection traces.
    assert not any(o is kept for o in gc.get_objects())
    gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
