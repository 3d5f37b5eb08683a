"""The store conformance suite: one set of cases, run against every ``Store``.

Each test is parametrised over ``memory`` (:class:`~lash_core.store.memory.InMemoryStore`
with a manual clock) and ``postgres`` (:class:`~lash_core.store.postgres.PostgresStore`,
database clock); ``conftest.Harness`` hides the only differences (how a lease expires,
a second handle on the same state). Tests are named after the case ids of
``reference/conformance-cases.md`` sections 1-6, 9 and 10; tests without a case id cover
this port's own additions (event log, outbox, notifications, orphan recovery).

Where this port deliberately differs from lash (DESIGN.md), the test asserts our
behaviour and its docstring says so: one store clock; content-checked command
idempotency with tombstones (QW-01, QW-05, QW-19); active-turn input for a turn that is
not running admitted as next-turn input (PTI-01, PTI-10, CAN-12, TC-12); an exact replay
of an active draft after deferral is a duplicate, not a conflict (PTI-10b); input left by
a dead generation resolved at ``start_turn`` (test_recovery); durable events with a
gapless ``seq`` (test_events, VAC-07); delete takes the lease (LIFE-04); turn
cancellation is a flag on the running tenure, not a durable promise (CAN-14, CAN-16).

Cases not applicable to this port, with the reason:

* PTI-11 - the ``input.accepted`` display id and single persisted user message are the
  turn engine's job (tests/engine), not the store's.
* PTI-12 - simulator oracle (source keys of generated boundaries).
* CAN-21 - sealing a cancellation before a failed renewal is engine behaviour.
* CLM-13 - needs a hook to pause a claim transaction midway; both stores serialise
  claims and takeovers on the lease row (one lock in memory, ``FOR UPDATE`` in SQL).
* LSE-14 - lease timings (TTL >= 3 x renewal) are the engine's/settings' concern;
  renewal runs every TTL/3 by contract.
* LSE-28, LSE-29, LSE-32 - lease loss inside a running turn and graph caching are engine
  behaviour (the store side, ``LeaseLost`` on every fenced step, is LSE-30).
* QW-04, QW-16, QW-19 (wake form) - process wakes do not exist here; only session
  commands are queued work (QW-19 is asserted for commands).
* QW-06 - exact claim by batch ids does not exist (commands are claimed head-first).
* QW-09, QW-10, QW-11, QW-12, QW-13 - delivery policies, join/merge-key batching,
  ``available_at`` and abandoning command claims do not exist for session commands
  (supersession by generation is CLM-05/CLM-19).
* TC-09 (outbox form), TC-15 - agent-frame hand-offs and commit outbox batches do not
  exist (TC-09 is asserted with a foreign completion instead).
* TC-17 - settling every originating claim is checked by the engine before commit.
* VAC-04, VAC-05, VAC-06 - graph-node tombstones, checkpoint blob GC and process-owned
  session stores do not exist (graphs are replaced, checkpoints stored inline).
* LIFE-05 (promise form) - no turn-control promises; deleting revokes the running turn.
* LIFE-06 - no separate session metadata (config/checkpoint round-trips are TC-01/TC-04).
* LIFE-08, LIFE-09 - park/resume are facade behaviour.
* LIFE-10 - schema versions are Alembic migrations (tested with the PostgreSQL store),
  not reject-and-recreate.
* LIFE-11 - simulator oracle.
* CAN-14..CAN-20 promise machinery (request ids, origins, durability tiers, terminal
  attach) - lash's turn-control promises are not ported; what applies at the store level
  is asserted on ``request_turn_cancel`` and the lease's cancel flags.
* Live replay buffers (LR, §6.4) - replaced by the durable event log.
* SQLite-only cases - there is no SQLite store.
"""
