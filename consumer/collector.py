"""CPython's cyclic garbage collector, set for a long-running worker process.

The collector runs a young-generation pass every 700 net container allocations by default.
A worker allocates and drops thousands of small containers per turn (rows, models, bind
parameters, coroutine frames), almost none of them in cycles, so with the defaults it
spends a tenth of its CPU tracing survivors: measured with ``bench --workers 2 --sessions
600``, 250-520 ms of 2.8-3.7 s of worker CPU in 150-320 collections; with the settings
here, under 45 ms in 2-4 collections and 8.6% less worker CPU over three interleaved
pairs of runs (README, Performance).

A young threshold of 10,000 makes passes rarer without making any one of them longer
than it needs to be (a pass still visits only the young generation); the older
generations keep their default ratios, so cyclic garbage that outlives a young pass is
still reclaimed. Freezing once the worker is up moves what start-up built (modules,
pydantic schemas, the topology, the pools) to the permanent generation, which full
collections then no longer trace.
"""

from __future__ import annotations

import gc

#: Net container allocations between young passes (CPython's default: 700).
YOUNG_THRESHOLD = 10_000


def tune() -> None:
    """Raise the young-generation threshold; keep the older generations' ratios."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def freeze_startup_heap() -> None:
    """Collect once, then exempt every object alive now from later collections.

    Called when the worker has started: what exists then lives as long as the process.
    """
    gc.collect()
    gc.freeze()
