"""The PostgreSQL store: every lash_core store operation as one database transaction.

Each guarded operation reads the session's lease row under a lock together with the
database clock (``transaction_timestamp()`` in milliseconds), lets the pure functions of
:mod:`lash_core.leases` / :mod:`lash_core.inputs` decide, and writes the result in the same
transaction. All guarded writes of a session therefore serialise on its lease row; first
claims of a missing row serialise on a transaction-scoped advisory lock of the session id.
Admissions pass a gate on the same row (shared) before drawing their ``enqueue_seq`` (see
``_ADMISSION_GATE``), which is what makes next-turn claims stop exactly at the earliest
pending command and lets a final commit release an idle session's lease by itself.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Literal

from lash_core import inputs as rules
from lash_core import leases as lease_rules
from lash_core.claims import (
    ActiveTurnMode,
    CommandClaim,
    NextTurnMode,
    TurnInputClaim,
    claim_token,
    command_claim_id,
    input_claim_id,
)
from lash_core.clock import IdFactory, UuidIds
from lash_core.commands import CommandDraft, CommandState, QueuedCommand, same_command
from lash_core.commit import CommitResult, RuntimeCommit
from lash_core.errors import (
    HeadRevisionConflict,
    InvalidRequest,
    LashError,
    LeaseLost,
    RetryableStoreError,
    SessionMismatch,
    SourceKeyConflict,
    SteeringPending,
    Superseded,
    TurnCommitConflict,
)
from lash_core.events import (
    CommandApplied,
    DurableEvent,
    EventKey,
    EventPayload,
    InputAccepted,
    InputAdmitted,
    InputCancelled,
    OutboxMessage,
    TurnCommitted,
    TurnStarted,
    session_shard,
    wire_body,
)
from lash_core.inputs import (
    CancelResult,
    CancelTarget,
    CheckpointKind,
    InputIdTarget,
    InputState,
    NextTurnIngress,
    PendingTurnInput,
    RowClaim,
    SuffixCancelResult,
    TurnInputDraft,
)
from lash_core.leases import (
    Acquired,
    DeadCheck,
    LeaseClaimResult,
    LeaseFence,
    LeaseOwner,
    LeaseRow,
)
from lash_core.outcomes import Usage
from lash_core.store.base import (
    MAX_CLAIM_INPUTS,
    AdmissionStatus,
    CommandAdmission,
    EventPage,
    InputAdmission,
    Notification,
    Residency,
    SessionState,
    SessionView,
    Store,
    TenureStart,
    TurnStart,
    VacuumReport,
)
from lash_core.store.postgres import notify
from lash_core.store.postgres.db import Connection, Database, Opening, prepared, text
from lash_core.store.postgres.errors import CAS_SQLSTATES, is_driver_error, sqlstate, translate
from lash_core.store.postgres.migrate import migrate
from lash_core.store.postgres.rows import (
    COMMAND_COLUMNS,
    INPUT_COLUMNS,
    claim_params,
    command_from_row,
    dumps,
    event_from_row,
    input_from_row,
    lease_from_json,
    lease_params,
    node_from_json,
)
from lash_core.store.postgres.tables import ALL_TABLES
from lash_core.store.postgres.urls import libpq_url
from lash_core.transcript import (
    GraphAppend,
    GraphReplace,
    MessageNode,
    active_path,
    ingress_message_id,
    to_transcript,
)

#: The database clock in epoch milliseconds, fixed for the whole transaction.
NOW_SQL = "floor(extract(epoch from transaction_timestamp()) * 1000)::bigint"
LockMode = Literal["", "FOR SHARE", "FOR UPDATE"]
#: ``_now_lease(..., "FOR UPDATE")`` as the prepared statement a transaction can open
#: with (``_tx(lock_lease=...)``): most transactions on a session's hot path start here.
_LOCK_LEASE = prepared(
    "lash_lock_lease",
    f"SELECT {NOW_SQL} AS now_ms, (SELECT row_to_json(l) FROM lash_leases l "
    "WHERE l.session_id = :s FOR UPDATE) AS lease",
    s="text",
)
Note = tuple[str, str | None]  # (kind, turn_id)


_LEASE_VALUES_SQL = """:s, :owner_id, :incarnation_id, CAST(:liveness AS jsonb), :lease_token,
        :fencing_token, :claimed_at_ms, :expires_at_ms, :running_turn_id, :cancel_requested,
        :cancel_reason"""
_LEASE_UPSERT_TEMPLATE = """
    INSERT INTO lash_leases (session_id, owner_id, incarnation_id, liveness, lease_token,
        fencing_token, claimed_at_ms, expires_at_ms, running_turn_id, cancel_requested,
        cancel_reason)
    {source}
    ON CONFLICT (session_id) DO UPDATE SET owner_id = EXCLUDED.owner_id,
        incarnation_id = EXCLUDED.incarnation_id, liveness = EXCLUDED.liveness,
        lease_token = EXCLUDED.lease_token, fencing_token = EXCLUDED.fencing_token,
        claimed_at_ms = EXCLUDED.claimed_at_ms, expires_at_ms = EXCLUDED.expires_at_ms,
        running_turn_id = EXCLUDED.running_turn_id,
        cancel_requested = EXCLUDED.cancel_requested, cancel_reason = EXCLUDED.cancel_reason
"""
LEASE_UPSERT_SQL = _LEASE_UPSERT_TEMPLATE.format(source=f"VALUES ({_LEASE_VALUES_SQL})")
#: The lease row written only if the commit's head CAS (the ``ses`` CTE) wrote its row.
_LEASE_UPSERT_AFTER_HEAD_SQL = _LEASE_UPSERT_TEMPLATE.format(
    source=f"SELECT {_LEASE_VALUES_SQL} FROM ses"
)
_LEASE_UPSERT = text(LEASE_UPSERT_SQL)

#: Allocates ``:en`` event seqs on the session row (creating it) and returns the last one.
_SESSION_SEQ_CTE = """ses AS (
    INSERT INTO lash_sessions (session_id, last_seq, created_at_ms, updated_at_ms)
    {source}
    ON CONFLICT (session_id) DO UPDATE SET last_seq = lash_sessions.last_seq + :en,
        updated_at_ms = :enow
    RETURNING last_seq, head_revision, leaf_node_id)"""
#: Inserts the events numbered from the seqs the ``ses`` CTE allocated.
_EVENTS_CTE = """ev AS (
    INSERT INTO lash_events (session_id, seq, revision, type, payload, created_at_ms, shard)
    SELECT :es, ses.last_seq - :en + v.k, ses.head_revision, v.t, CAST(v.p AS jsonb), :enow,
        :eshard
    FROM ses, (VALUES {values}) AS v(k, t, p)
    RETURNING 1)"""


def _event_params(
    session_id: str,
    now: int,
    payloads: Sequence[EventPayload],
    notes: Sequence[Note],
    *,
    announce: bool = True,
    for_publisher: bool = False,
) -> tuple[dict[str, Any], str, list[str]]:
    """Bind parameters, the ``VALUES`` rows of the events and the ``pg_notify`` calls.

    Appended events add an ``events`` wake-up unless told not to ``announce`` them (see
    ``PostgresStore._local_events``); ``work`` wake-ups are marked ``for_publisher`` if
    told (see ``InputAdmission.runs_elsewhere``).
    """
    params: dict[str, Any] = {
        "es": session_id,
        "en": len(payloads),
        "enow": now,
        "eshard": session_shard(session_id),
        "ch": notify.CHANNEL,
    }
    rows: list[str] = []
    for i, payload in enumerate(payloads):
        rows.append(f"({i + 1}, CAST(:et{i} AS text), CAST(:ep{i} AS text))")
        params[f"et{i}"] = payload.type
        params[f"ep{i}"] = dumps(payload.model_dump(mode="json"))
    calls: list[str] = []
    for i, (kind, turn_id) in enumerate(notes):
        params[f"nt{i}"] = notify.payload(
            kind, session_id, turn_id, for_publisher=for_publisher and kind == "work"
        )
        calls.append(f"pg_notify(:ch, :nt{i})")
    if payloads and announce:
        params["ntev"] = notify.payload("events", session_id)
        calls.append(_carrying_events_call(len(payloads)))
    return params, ", ".join(rows), calls


def _carrying_events_call(count: int) -> str:
    """The ``pg_notify`` of an ``events`` wake-up that carries the ``count`` events its
    statement appends (``Notification.events``), numbered from the ``ses`` row the
    statement selects from, as ``_numbered`` does; the plain wake-up (``:ntev``) if that
    would not fit in a notification. The publisher then sends them without a scan."""
    items = ", ".join(
        f"json_build_object('seq', ses.last_seq - :en + {i + 1}, 'revision', ses.head_revision,"
        f" 'created_at_ms', :enow, 'type', CAST(:et{i} AS text),"
        f" 'payload', CAST(:ep{i} AS text))"
        for i in range(count)
    )
    note = (
        "json_build_object('kind', 'events', 'session_id', CAST(:es AS text),"
        f" 'events', json_build_array({items}))::text"
    )
    return (
        f"pg_notify(:ch, (SELECT CASE WHEN octet_length(c.note) <= {notify.MAX_PAYLOAD_BYTES}"
        f" THEN c.note ELSE :ntev END FROM (SELECT {note} AS note) c))"
    )


def _numbered(
    session_id: str, last_seq: int, revision: int, now: int, payloads: Sequence[EventPayload]
) -> list[DurableEvent]:
    first = last_seq - len(payloads) + 1
    return [
        DurableEvent(
            session_id=session_id, seq=first + i, revision=revision, payload=p, created_at_ms=now
        )
        for i, p in enumerate(payloads)
    ]


#: Writes state, ingress and claim columns of the rows in ``:w_rows`` (a JSON array built
#: by :func:`_input_write_params`: one parameter, which costs far less to bind than a column
#: array each); usable alone or as a CTE of a larger statement.
_WRITE_INPUTS_SQL = """
    UPDATE lash_pending_inputs AS p SET state = v.state, ingress = CAST(v.ingress AS jsonb),
        terminal_at_ms = v.terminal_at_ms, claim_id = v.claim_id,
        claim_owner_id = v.claim_owner_id,
        claim_owner_incarnation_id = v.claim_owner_incarnation_id,
        claim_owner_liveness = CAST(v.claim_owner_liveness AS jsonb),
        claim_token = v.claim_token, claim_fencing_token = v.fencing,
        claim_session_lease_generation = v.claim_session_lease_generation
    FROM jsonb_to_recordset(CAST(:w_rows AS jsonb))
        AS v(input_id text, state text, ingress text, terminal_at_ms bigint, fencing bigint,
             claim_id text, claim_owner_id text, claim_owner_incarnation_id text,
             claim_owner_liveness text, claim_token text,
             claim_session_lease_generation bigint)
    WHERE p.input_id = v.input_id AND p.session_id = :w_s
    RETURNING p.input_id
"""
_WRITE_INPUTS = text(_WRITE_INPUTS_SQL)


def _input_write_params(
    session_id: str, records: Sequence[PendingTurnInput], now: int
) -> dict[str, Any]:
    rows = [
        {
            "input_id": r.input_id,
            "state": r.state.value,
            "ingress": dumps(r.ingress.model_dump(mode="json")),
            "terminal_at_ms": now if r.state in rules.TERMINAL_STATES else None,
            "fencing": r.claim_fencing_token,
            **claim_params(r.claim),
        }
        for r in records
    ]
    return {"w_s": session_id, "w_rows": dumps(rows)}


#: ``inputs.OPEN_STATES`` as an SQL list: rows that keep a session busy.
_OPEN_STATES_SQL = ", ".join(f"'{state.value}'" for state in sorted(rules.OPEN_STATES))

#: The session's pending commands (the earliest unclaimed one's ``enqueue_seq``; the
#: ``enqueue_seq`` and claiming lease generation of each claimed one) and every open input
#: row (locked, in admission order), in one statement. Plain ``FOR UPDATE`` (not SKIP
#: LOCKED): skipping a row another transaction holds would let a later row be claimed
#: before it. It names no lease generation (:func:`_first_command` applies one), so a turn
#: start can send it with ``BEGIN`` and the lease lock, before it has read the lease.
_OPEN_ROWS_SQL = f"""
    SELECT c.unclaimed_command, c.claimed_seqs, c.claimed_generations, i.* FROM (
        SELECT min(enqueue_seq) FILTER (WHERE claim_token IS NULL) AS unclaimed_command,
            array_agg(enqueue_seq ORDER BY enqueue_seq)
                FILTER (WHERE claim_token IS NOT NULL) AS claimed_seqs,
            array_agg(claim_session_lease_generation ORDER BY enqueue_seq)
                FILTER (WHERE claim_token IS NOT NULL) AS claimed_generations
        FROM lash_session_commands WHERE session_id = :s AND state = 'pending') c
    LEFT JOIN LATERAL (
        SELECT {INPUT_COLUMNS} FROM lash_pending_inputs
        WHERE session_id = :s AND state IN ({_OPEN_STATES_SQL})
        ORDER BY enqueue_seq FOR UPDATE) i ON true
    ORDER BY i.enqueue_seq
"""
_OPEN_ROWS = prepared("lash_open_rows", _OPEN_ROWS_SQL, s="text")
#: Where the open rows wait on a connection that opened with them.
_OPEN_ROWS_KEY = "open_rows"


def _first_command(
    unclaimed: int | None,
    claimed_seqs: Sequence[int] | None,
    claimed_generations: Sequence[int] | None,
    generation: int,
) -> int | None:
    """The ``enqueue_seq`` of the earliest pending command lease ``generation`` did not
    claim (one it claimed is being applied by its holder), from :data:`_OPEN_ROWS`."""
    others = [
        int(seq)
        for seq, gen in zip(claimed_seqs or (), claimed_generations or (), strict=True)
        if gen != generation
    ]
    if unclaimed is not None:
        others.append(int(unclaimed))
    return min(others) if others else None


#: A commit's writes besides the session head and events (CTEs of its one write statement,
#: each only when it has rows to write): the appended nodes, the completed input and
#: command rows and the steering input the turn leaves to the next turn (``:dids``, read
#: and locked with the head). Each writes only if the head CAS (the ``ses`` CTE) did: the
#: statement is sent with its ``COMMIT``, so a failed CAS must leave nothing written.
_GRAPH_CTE = """graph AS (
    INSERT INTO lash_nodes (session_id, node_id, ordinal, node)
    SELECT :es, n.body->>'node_id', :base + n.ord, n.body
    FROM ses, jsonb_array_elements(CAST(:nodes AS jsonb)) WITH ORDINALITY AS n(body, ord)
    ON CONFLICT (session_id, node_id) DO UPDATE SET node = EXCLUDED.node,
        ordinal = EXCLUDED.ordinal
    RETURNING 1)"""
_CLEARED_CLAIM_SQL = """claim_id = NULL, claim_owner_id = NULL, claim_owner_incarnation_id = NULL,
        claim_owner_liveness = NULL, claim_token = NULL, claim_session_lease_generation = 0"""
_DONE_CTE = f"""done AS (
    UPDATE lash_pending_inputs SET state = 'completed', terminal_at_ms = :enow,
        {_CLEARED_CLAIM_SQL}
    WHERE session_id = :es AND input_id = ANY(:ids)
        AND EXISTS (SELECT 1 FROM ses) RETURNING 1)"""
_CMDS_CTE = f"""cmds AS (
    UPDATE lash_session_commands SET state = 'completed', terminal_at_ms = :enow,
        {_CLEARED_CLAIM_SQL}
    WHERE session_id = :es AND batch_id = ANY(:bids)
        AND EXISTS (SELECT 1 FROM ses) RETURNING 1)"""
_DEFERRED_CTE = f"""deferred AS (
    UPDATE lash_pending_inputs SET state = 'deferred_next_turn',
        ingress = '{{"scope":"next_turn"}}'::jsonb, {_CLEARED_CLAIM_SQL}
    WHERE session_id = :es AND input_id = ANY(:dids) AND state = 'pending_active'
        AND EXISTS (SELECT 1 FROM ses)
    RETURNING 1)"""


def _completion(
    input_ids: list[str],
    batch_ids: list[str],
    deferred: list[str],
    revision: int,
    nodes: list[MessageNode],
) -> tuple[list[str], dict[str, Any]]:
    """The CTEs and parameters of a commit's writes besides head and events: ``nodes``
    appended at ``revision``, the claimed rows completed, ``deferred`` left to the next
    turn. Each CTE is there only with rows to write (they bind ``:es`` and ``:enow``, the
    events' session and time)."""
    ctes: list[str] = []
    params: dict[str, Any] = {}
    if nodes:
        ctes.append(_GRAPH_CTE)
        # Revision-major ordinals keep insertion order across commits.
        params["base"] = revision << 20
        params["nodes"] = dumps([n.model_dump(mode="json") for n in nodes])
    if input_ids:
        ctes.append(_DONE_CTE)
        params["ids"] = input_ids
    if batch_ids:
        ctes.append(_CMDS_CTE)
        params["bids"] = batch_ids
    if deferred:
        ctes.append(_DEFERRED_CTE)
        params["dids"] = deferred
    return ctes, params


#: Steering input aimed at turn ``:steer_t`` of session ``:s`` and not yet accepted (none
#: when ``:steer_t`` is null); :func:`_admits_steering` decides whether a checkpoint may
#: take any of it.
_STEERING_ROWS_SQL = (
    f"SELECT {INPUT_COLUMNS} FROM lash_pending_inputs WHERE session_id = :s"
    " AND state = 'pending_active' AND ingress->>'turn_id' = :steer_t ORDER BY enqueue_seq"
)


#: A commit's second statement, sent with ``BEGIN`` and the lease lock: the turn's commit
#: stamp (a landed attempt), the session head (locked), the claimed input and command rows
#: being completed (locked), the steering input aimed at the turn (``:steer_t``), the
#: unaccepted steering input of turn ``:dt`` that the commit defers (locked, in admission
#: order) and, when ``:probe``, whether open input or a pending command remains besides the
#: rows the commit completes (deferred input counts: it is open).
#:
#: Read here, after the lease row lock and in a snapshot of its own, these are what the
#: write statement then finds: every admission locks that row (shared) first, and the rows
#: the commit changes are locked. So the commit writes in one statement, not two.
_COMMIT_HEAD = prepared(
    "lash_commit_head",
    "SELECT (SELECT row_to_json(t) FROM (SELECT turn_commit_hash, result"
    "  FROM lash_turn_commits WHERE session_id = :s AND turn_id = :t) t) AS stamp,"
    " (SELECT row_to_json(x) FROM (SELECT head_revision, last_seq, usage"
    "  FROM lash_sessions WHERE session_id = :s FOR UPDATE) x) AS session,"
    " (SELECT json_agg(json_build_array(i.input_id, i.claim_id, i.claim_token))"
    "  FROM (SELECT input_id, claim_id, claim_token FROM lash_pending_inputs"
    "   WHERE session_id = :s AND input_id = ANY(:ids) FOR UPDATE) i) AS inputs,"
    " (SELECT json_agg(json_build_array(c.batch_id, c.claim_id, c.claim_token))"
    "  FROM (SELECT batch_id, claim_id, claim_token FROM lash_session_commands"
    "   WHERE session_id = :s AND batch_id = ANY(:bids) FOR UPDATE) c) AS commands,"
    f" (SELECT json_agg(row_to_json(a)) FROM ({_STEERING_ROWS_SQL}) a) AS steering,"
    " (SELECT coalesce(array_agg(d.input_id ORDER BY d.enqueue_seq), '{}')"
    "  FROM (SELECT input_id, enqueue_seq FROM lash_pending_inputs"
    "   WHERE session_id = :s AND state = 'pending_active' AND ingress->>'turn_id' = :dt"
    "    AND NOT (input_id = ANY(:ids)) FOR UPDATE) d) AS deferrable,"
    " :probe AND EXISTS (SELECT 1 FROM lash_pending_inputs WHERE session_id = :s"
    f"  AND state IN ({_OPEN_STATES_SQL}) AND NOT (input_id = ANY(:ids))) AS open_input,"
    " :probe AND EXISTS (SELECT 1 FROM lash_session_commands WHERE session_id = :s"
    "  AND state = 'pending' AND NOT (batch_id = ANY(:bids))) AS command_pending",
    s="text",
    t="text",
    steer_t="text",
    ids="text[]",
    bids="text[]",
    dt="text",
    probe="boolean",
)
_COMMIT_HEAD_KEY = "commit_head"


def _admits_steering(
    rows: Sequence[PendingTurnInput], turn_id: str, checkpoint: CheckpointKind, generation: int
) -> bool:
    """Whether ``checkpoint`` of ``turn_id`` (under lease ``generation``) could claim any
    of ``rows``."""
    return bool(
        rules.select_active_claim(
            rows, turn_id=turn_id, checkpoint=checkpoint, generation=generation, max_inputs=1
        )
    )


def _validate_completions(
    commit: RuntimeCommit, inputs: list[list[str | None]], commands: list[list[str | None]]
) -> None:
    """Every completed row must still carry its claim's id and token (§3.5).

    ``inputs`` / ``commands`` are ``[id, claim_id, claim_token]`` of the rows named by the
    completions, read FOR UPDATE in this transaction.
    """
    sid = commit.session_id
    owned = {row[0]: (row[1], row[2]) for row in inputs}
    for ic in commit.completed_input_claims:
        for input_id in ic.input_ids:
            if owned.get(input_id) != (ic.claim_id, ic.claim_token):
                raise Superseded(sid, ic.claim_id, "turn_input")
    owned = {row[0]: (row[1], row[2]) for row in commands}
    for cc in commit.completed_command_claims:
        for batch_id in cc.batch_ids:
            if owned.get(batch_id) != (cc.claim_id, cc.claim_token):
                raise Superseded(sid, cc.claim_id, "command")


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:s, 0))")

#: Every admission (input or command) passes this gate BEFORE it draws its ``enqueue_seq``:
#: it locks the session's lease row FOR SHARE or, while the session has no lease row yet,
#: takes the shared side of the advisory lock a first lease claim holds exclusively. A
#: lease holder locks the row FOR UPDATE, so an admission either committed before the
#: holder's lock (the holder sees it) or draws its seq and commits after the holder's
#: transaction (and wakes a drain itself). Hence what a holder sees after its lock is a
#: prefix of the session's admission order (next-turn claims rely on it to stop at the
#: earliest pending command) and an idle check under the lock misses no admission.
_ADMISSION_GATE = f"""
    SELECT {NOW_SQL} AS now_ms, x.lease,
        CASE WHEN x.lease IS NULL THEN (SELECT true
            FROM pg_advisory_xact_lock_shared(hashtextextended(:s, 0))) END AS gated{{seq}}
    FROM (SELECT (SELECT row_to_json(l) FROM lash_leases l WHERE l.session_id = :s
        FOR SHARE) AS lease) x
"""
#: An input admission's first statement, sent with its ``BEGIN`` (``_tx(openings=...)``).
_ADMISSION_GATE_AND_SEQ = prepared(
    "lash_admission_gate",
    _ADMISSION_GATE.format(seq=", nextval('lash_enqueue_seq') AS seq"),
    s="text",
)
_COMMAND_ADMISSION_GATE = text(_ADMISSION_GATE.format(seq=""))


#: The admission gate of a batch: every session's lease row FOR SHARE (or, without one, the
#: shared advisory lock), taken row by row in the order of ``:sids`` (sorted by the caller);
#: the batch's first statement, sent with its ``BEGIN``.
_BATCH_GATE = prepared(
    "lash_batch_gate",
    f"""
    SELECT {NOW_SQL} AS now_ms, s.sid, x.lease,
        CASE WHEN x.lease IS NULL THEN (SELECT true
            FROM pg_advisory_xact_lock_shared(hashtextextended(s.sid, 0))) END AS gated
    FROM unnest(CAST(:sids AS text[])) WITH ORDINALITY AS s(sid, ord)
    CROSS JOIN LATERAL (SELECT (SELECT row_to_json(l) FROM lash_leases l
        WHERE l.session_id = s.sid FOR SHARE) AS lease) x
    ORDER BY s.ord
""",
    sids="text[]",
)
#: The free lease row (no holder, generation 0: what a missing row means to the lease
#: rules) that admission writes for a session whose gate found none, under the shared side
#: of the first-claim advisory lock. Its first lease claim then finds a row to lock and
#: skips the advisory lock and the second read (two statements) that a missing row costs.
_FREE_LEASE_ROW = """lease_row AS (
    INSERT INTO lash_leases (session_id) SELECT :es FROM ins
    ON CONFLICT DO NOTHING RETURNING 1)"""
#: Whether the session had open input before the admitting statement (a CTE or subquery
#: sees the statement's snapshot, so not the row it inserts): see
#: ``InputAdmission.behind_open_input``. The statement runs after the admission gate, so
#: its snapshot is no older than the gate's lock and no lease holder can change these rows
#: until the admission commits.
_BEHIND_OPEN_INPUT = f"""EXISTS (SELECT 1 FROM lash_pending_inputs
    WHERE session_id = :es AND state IN ({_OPEN_STATES_SQL})) AS behind"""
#: ``:n`` admission seqs, ascending, drawn after the batch's gate (its own statement).
_BATCH_SEQS = text("SELECT nextval('lash_enqueue_seq') FROM generate_series(1, :n) ORDER BY 1")
#: A batch's rows; for the sessions that got rows: the seqs on the session row (in session
#: order), one ``input.admitted`` event per row numbered in ``enqueue_seq`` order, the
#: ``work`` and ``events`` wake-ups (those of ``:announce`` carrying their events, as
#: ``_carrying_events_call``), and a free lease row for each of ``:new_sids`` (the
#: sessions whose gate found none; see ``_FREE_LEASE_ROW``). Returns each landed row's
#: event seq and revision, and whether its session had open input before the batch (as
#: ``_BEHIND_OPEN_INPUT``).
_BATCH_INSERT = text(f"""
    WITH ins AS (
        INSERT INTO lash_pending_inputs (input_id, session_id, enqueue_seq, source_key,
            ingress, submitted_ingress, state, input, enqueued_at_ms)
        SELECT v.input_id, v.session_id, v.seq, v.source_key, CAST(v.ingress AS jsonb),
            CAST(v.submitted AS jsonb), v.state, CAST(v.input AS jsonb), :now
        FROM unnest(CAST(:ids AS text[]), CAST(:sids AS text[]), CAST(:seqs AS bigint[]),
            CAST(:keys AS text[]), CAST(:ingress AS text[]), CAST(:submitted AS text[]),
            CAST(:states AS text[]), CAST(:inputs AS text[]))
            WITH ORDINALITY AS v(input_id, session_id, seq, source_key, ingress, submitted,
                state, input, ord)
        ORDER BY v.ord
        ON CONFLICT DO NOTHING
        RETURNING input_id, session_id, enqueue_seq),
    cnt AS (SELECT session_id, count(*) AS n FROM ins GROUP BY session_id),
    prior AS (
        SELECT DISTINCT session_id FROM lash_pending_inputs
        WHERE session_id = ANY(CAST(:sids AS text[])) AND state IN ({_OPEN_STATES_SQL})),
    ses AS (
        INSERT INTO lash_sessions (session_id, last_seq, created_at_ms, updated_at_ms)
        SELECT session_id, n, :now, :now FROM cnt ORDER BY session_id
        ON CONFLICT (session_id) DO UPDATE
            SET last_seq = lash_sessions.last_seq + EXCLUDED.last_seq, updated_at_ms = :now
        RETURNING session_id, last_seq, head_revision),
    lease_rows AS (
        INSERT INTO lash_leases (session_id)
        SELECT n.sid FROM unnest(CAST(:new_sids AS text[])) AS n(sid)
        WHERE n.sid IN (SELECT session_id FROM cnt) ORDER BY n.sid
        ON CONFLICT DO NOTHING
        RETURNING 1),
    numbered AS (
        SELECT ins.input_id, ins.session_id, ses.head_revision,
            ses.last_seq - cnt.n
                + row_number() OVER (PARTITION BY ins.session_id ORDER BY ins.enqueue_seq)
                AS seq
        FROM ins JOIN cnt USING (session_id) JOIN ses USING (session_id)),
    ev AS (
        INSERT INTO lash_events (session_id, seq, revision, type, payload, created_at_ms,
            shard)
        SELECT n.session_id, n.seq, n.head_revision, 'input.admitted', CAST(p.payload AS jsonb),
            :now, p.shard
        FROM numbered n JOIN unnest(CAST(:ids AS text[]), CAST(:payloads AS text[]),
            CAST(:shards AS bigint[])) AS p(input_id, payload, shard)
            ON p.input_id = n.input_id
        RETURNING 1),
    told AS (
        SELECT n.session_id, json_build_object('kind', 'events', 'session_id', n.session_id,
            'events', json_agg(json_build_object('seq', n.seq, 'revision', n.head_revision,
                'created_at_ms', :now, 'type', 'input.admitted', 'payload', p.payload)
                ORDER BY n.seq))::text AS note
        FROM numbered n JOIN unnest(CAST(:ids AS text[]), CAST(:payloads AS text[]))
            AS p(input_id, payload) ON p.input_id = n.input_id
        WHERE n.session_id = ANY(CAST(:announce AS text[]))
        GROUP BY n.session_id),
    woken AS (
        SELECT (SELECT count(pg_notify(:ch, w.work))
            FROM unnest(CAST(:note_sids AS text[]), CAST(:note_work AS text[]))
                AS w(session_id, work)
            WHERE w.session_id IN (SELECT session_id FROM cnt))
        + (SELECT count(pg_notify(:ch, CASE
                WHEN octet_length(t.note) <= {notify.MAX_PAYLOAD_BYTES} THEN t.note
                ELSE json_build_object('kind', 'events', 'session_id', t.session_id)::text
            END)) FROM told t) AS n)
    SELECT n.input_id, n.session_id, n.seq, n.head_revision AS revision,
        n.session_id IN (SELECT session_id FROM prior) AS behind,
        (SELECT count(*) FROM ev) AS events, (SELECT n FROM woken) AS woken
    FROM numbered n
""")


def _admitted_record(
    draft: TurnInputDraft, input_id: str, seq: int, lease: LeaseRow | None, now: int
) -> PendingTurnInput:
    """The record an admission writes, given the session's lease as its gate read it."""
    running = lease.running_turn_id if lease and lease.is_live(now) else None
    ingress = rules.admitted_ingress(draft.ingress, running)
    return PendingTurnInput(
        input_id=input_id,
        session_id=draft.session_id,
        source_key=draft.source_key,
        ingress=ingress,
        submitted_ingress=draft.ingress,
        state=rules.initial_state(ingress),
        enqueue_seq=seq,
        input=draft.input,
        enqueued_at_ms=now,
    )


#: Planner methods the store's connections turn off. Every hot-path statement reaches its
#: rows through an index (a primary key, a session's rows, the open or unpublished rows),
#: and with ``plan_cache_mode=force_generic_plan`` a connection plans each statement once
#: and keeps the plan. Planned while a table is still small (a new database, or before
#: autovacuum first analyzes it), that plan is a sequential scan or a hash join, and it
#: stays so while the table grows: measured in ``bench --modes latency`` (W = 2, 62/s),
#: marking one event published took 0.81 ms and 204 buffers per call, 0.05 ms and 8 with
#: these off, and PostgreSQL's CPU per input fell from 6.1-6.9 to 4.3-4.6 ms (three
#: interleaved pairs of runs). Off means "only if nothing else can": a statement with no
#: usable index still scans.
_KEYED_ACCESS_ONLY = ("enable_seqscan", "enable_hashjoin", "enable_mergejoin")
#: Turns them back on for the rest of a transaction (:meth:`PostgresStore.vacuum`).
_BULK_ACCESS = text(
    "SELECT " + ", ".join(f"set_config('{name}', 'on', true)" for name in _KEYED_ACCESS_ONLY)
)


#: A session row and its nodes in insertion order, in one statement (one snapshot).
_LOAD_STATE = text(
    "SELECT s.head_revision, s.last_seq, s.leaf_node_id, s.config, s.checkpoint, s.usage,"
    " (SELECT coalesce(json_agg(n.node ORDER BY n.ordinal), '[]') FROM lash_nodes n"
    " WHERE n.session_id = s.session_id) AS nodes"
    " FROM lash_sessions s WHERE s.session_id = :s"
)


#: Marks events published, by key (``:s`` session ids and ``:q`` seqs: :func:`_event_keys`).
_MARK_PUBLISHED = (
    "UPDATE lash_events e SET published = true"
    " FROM unnest(CAST(:s AS text[]), CAST(:q AS bigint[])) AS k(session_id, seq)"
    " WHERE e.session_id = k.session_id AND e.seq = k.seq"
)


def _event_keys(events: Sequence[EventKey]) -> dict[str, list[Any]]:
    """The parameters of :data:`_MARK_PUBLISHED`."""
    return {"s": [e.session_id for e in events], "q": [e.seq for e in events]}


class _Rollback(Exception):
    """Raised inside a transaction to undo it and return ``None`` to the caller."""


class PostgresStore(Store):
    """:class:`~lash_core.store.base.Store` on PostgreSQL via a psycopg 3 pool (see ``db.py``)."""

    def __init__(
        self,
        url: str,
        *,
        ids: IdFactory | None = None,
        pool_size: int = 10,
        max_overflow: int = 5,
        lock_timeout_ms: int = 5_000,
        statement_timeout_ms: int = 30_000,
        migrate: bool = True,
    ) -> None:
        self._url = url
        self._ids = ids or UuidIds()
        self._pool_size = pool_size
        self._max_overflow = max_overflow
        self._lock_timeout_ms = lock_timeout_ms
        self._statement_timeout_ms = statement_timeout_ms
        self._migrate = migrate
        self._db: Database | None = None
        self._start_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    @property
    def database(self) -> Database:
        """The connection pool once started (for instrumentation such as statement counts)."""
        if self._db is None:
            raise RuntimeError("PostgresStore.start() has not been called")
        return self._db

    async def start(self) -> None:
        async with self._start_lock:
            if self._db is not None:
                return
            if self._migrate:
                await migrate(self._url)
            db = Database(
                libpq_url(self._url),
                min_size=min(self._pool_size, 2),
                max_size=self._pool_size + self._max_overflow,
                options=f"-c lock_timeout={self._lock_timeout_ms}"
                f" -c statement_timeout={self._statement_timeout_ms}"
                " -c plan_cache_mode=force_generic_plan"
                + "".join(f" -c {name}=off" for name in _KEYED_ACCESS_ONLY),
            )
            await db.open()
            self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    @asynccontextmanager
    async def _tx(
        self,
        *,
        single: bool = False,
        lock_lease: str | None = None,
        openings: Sequence[Opening] = (),
    ) -> AsyncIterator[Connection]:
        """One transaction (``single``: one statement per transaction, no ``BEGIN``);
        driver errors leave as lash_core errors, never raw.

        ``openings``: the transaction's first statements, sent with ``BEGIN`` in one round
        trip (their rows: ``conn.opened(key)``). ``lock_lease``: open by locking that
        session's lease row and reading the clock (``_now_lease`` with ``FOR UPDATE``,
        which must then be the first statement), before ``openings``."""
        if self._db is None:
            await self.start()
        assert self._db is not None
        if lock_lease is not None:
            openings = (Opening(_LOCK_LEASE, (lock_lease,), ("lease", lock_lease)), *openings)
        try:
            async with self._db.single() if single else self._db.transaction(*openings) as conn:
                yield conn
        except (LashError, _Rollback):
            raise
        except Exception as exc:
            if is_driver_error(exc):
                raise translate(exc) from exc
            raise

    async def reset(self) -> None:
        """Delete every row (tests only)."""
        names = ", ".join(t.name for t in ALL_TABLES)
        async with self._tx() as conn:
            await conn.execute(text(f"TRUNCATE {names}"))

    async def now_ms(self) -> int:
        async with self._tx(single=True) as conn:
            return int((await conn.execute(text(f"SELECT {NOW_SQL}"))).scalar_one())

    # ------------------------------------------------------------------ helpers

    async def _now_lease(
        self, conn: Connection, session_id: str, lock: LockMode = ""
    ) -> tuple[int, LeaseRow | None]:
        """The database clock and the session's lease row (locked as asked), in one trip
        (none when the transaction opened with it: ``_tx(lock_lease=...)``)."""
        opened = conn.take_opened(("lease", session_id)) if lock == "FOR UPDATE" else None
        if opened is not None:
            first = opened.one()
            return int(first.now_ms), lease_from_json(first.lease)
        row = (
            await conn.execute(
                text(
                    f"SELECT {NOW_SQL} AS now_ms, (SELECT row_to_json(l) FROM lash_leases l "
                    f"WHERE l.session_id = :s {lock}) AS lease"
                ),
                {"s": session_id},
            )
        ).one()
        return int(row.now_ms), lease_from_json(row.lease)

    async def _fenced(
        self, conn: Connection, fence: LeaseFence, session_id: str | None = None
    ) -> tuple[int, LeaseRow]:
        """Lock the lease row and validate ``fence`` by the database clock."""
        sid = session_id or fence.session_id
        if fence.session_id != sid:
            raise SessionMismatch(f"fence for {fence.session_id!r} used on session {sid!r}")
        now, lease = await self._now_lease(conn, sid, "FOR UPDATE")
        return now, lease_rules.validate_fence(lease, fence, sid, now)

    async def _write_lease(self, conn: Connection, row: LeaseRow) -> None:
        await conn.execute(_LEASE_UPSERT, lease_params(row))

    async def _write_inputs(
        self, conn: Connection, session_id: str, records: Sequence[PendingTurnInput], now: int
    ) -> int:
        """Write state, ingress and claim columns of ``records``; returns rows written."""
        if not records:
            return 0
        result = await conn.execute(_WRITE_INPUTS, _input_write_params(session_id, records, now))
        return len(result.all())

    def _local_events(self, conn: Connection, session_id: str) -> list[DurableEvent] | None:
        """Where events appended for ``session_id`` in ``conn``'s transaction go instead of
        an ``events`` wake-up, if this process publishes them (see
        :meth:`Store.set_local_publisher`): a list the caller fills with the events, handed
        to the publisher once they are committed. ``None``: announce them."""
        local = self._quiet_events(session_id)
        if local is None:
            return None
        events: list[DurableEvent] = []
        conn.after_commit(functools.partial(local.committed, events))
        return events

    async def _append_events(
        self,
        conn: Connection,
        session_id: str,
        now: int,
        payloads: Sequence[EventPayload],
        notes: Sequence[Note] = (),
        *,
        lease: LeaseRow | None = None,
        inputs: Sequence[PendingTurnInput] = (),
    ) -> list[DurableEvent]:
        """In one statement: optionally write ``lease`` and the columns of ``inputs``,
        allocate the next ``seq`` values on the session row, insert the events and notify
        (delivered on commit)."""
        events, _ = await self._append(
            conn, session_id, now, payloads, notes, lease=lease, inputs=inputs
        )
        return events

    async def _append(
        self,
        conn: Connection,
        session_id: str,
        now: int,
        payloads: Sequence[EventPayload],
        notes: Sequence[Note] = (),
        *,
        lease: LeaseRow | None = None,
        inputs: Sequence[PendingTurnInput] = (),
        last: bool = False,
    ) -> tuple[list[DurableEvent], str | None]:
        """:meth:`_append_events`, also returning the session's committed leaf node id
        (``last``: the transaction's last statement, sent with its ``COMMIT``)."""
        local = self._local_events(conn, session_id) if payloads else None
        params, values, calls = _event_params(
            session_id, now, payloads, notes, announce=local is None
        )
        ctes: list[str] = []
        if lease is not None:
            ctes.append(f"lease_w AS ({LEASE_UPSERT_SQL} RETURNING 1)")
            params.update(lease_params(lease))
        if inputs:
            # The rows were read FOR UPDATE in this transaction: all of them are written.
            ctes.append(f"inputs_w AS ({_WRITE_INPUTS_SQL})")
            params.update(_input_write_params(session_id, inputs, now))
        if not payloads:
            if not ctes and not calls:
                return [], None
            head = "WITH " + ", ".join(ctes) + " " if ctes else ""
            await conn.execute(text(head + "SELECT " + (", ".join(calls) or "1")), params)
            return [], None
        ctes.append(_SESSION_SEQ_CTE.format(source="VALUES (:es, :en, :enow, :enow)"))
        ctes.append(_EVENTS_CTE.format(values=values))
        run = conn.execute_and_commit if last else conn.execute
        row = (
            await run(
                text(
                    "WITH "
                    + ", ".join(ctes)
                    + " SELECT ses.last_seq, ses.head_revision, ses.leaf_node_id"
                    + "".join(", " + c for c in calls)
                    + " FROM ses"
                ),
                params,
            )
        ).one()
        events = _numbered(session_id, int(row.last_seq), int(row.head_revision), now, payloads)
        if local is not None:
            local.extend(events)
        return events, row.leaf_node_id

    async def _inputs(
        self, conn: Connection, where: str, params: dict[str, Any], suffix: str = ""
    ) -> list[PendingTurnInput]:
        rows = await conn.execute(
            text(
                f"SELECT {INPUT_COLUMNS} FROM lash_pending_inputs WHERE {where} "
                f"ORDER BY enqueue_seq {suffix}"
            ),
            params,
        )
        return [input_from_row(r._asdict()) for r in rows]

    # ------------------------------------------------------------------ admission

    async def enqueue_input(self, draft: TurnInputDraft) -> InputAdmission:
        sid = draft.session_id
        input_id = draft.input_id or self._ids.new_id("ti_")
        # The admission gate (lease row FOR SHARE) serialises admission against a final
        # commit's deferral and idle release and against next-turn claims; the sequence
        # value is drawn after the gate, in the same statement (sent with ``BEGIN``), so the
        # whole admission (row, session, event, wake-ups) is one more statement.
        async with self._tx(openings=[Opening(_ADMISSION_GATE_AND_SEQ, (sid,), "gate")]) as conn:
            row = conn.opened("gate").one()
            now, lease = int(row.now_ms), lease_from_json(row.lease)
            record = _admitted_record(draft, input_id, int(row.seq), lease, now)
            payload = InputAdmitted(input=record.public())
            local = self._local_events(conn, sid)
            elsewhere = self._runs_elsewhere(sid)
            params, values, calls = _event_params(
                sid,
                now,
                [payload],
                [("work", None)],
                announce=local is None,
                # A live holder sees the input anyway: the publisher need not drain it.
                for_publisher=elsewhere and not (lease is not None and lease.is_live(now)),
            )
            params.update(
                {
                    "id": input_id,
                    "seq": record.enqueue_seq,
                    "key": draft.source_key,
                    "ingress": dumps(record.ingress.model_dump(mode="json")),
                    "submitted": dumps(draft.ingress.model_dump(mode="json")),
                    "state": record.state.value,
                    "input": dumps(draft.input.model_dump(mode="json")),
                }
            )
            ses_cte = _SESSION_SEQ_CTE.format(source="SELECT :es, :en, :enow, :enow FROM ins")
            if lease is None:
                ses_cte += ",\n" + _FREE_LEASE_ROW
            # Sent with the COMMIT: a duplicate's existing row is read after it (the insert
            # wrote nothing; each statement reads a fresh snapshot either way).
            admitted = (
                await conn.execute_and_commit(
                    text(
                        f"""
                        WITH ins AS (
                            INSERT INTO lash_pending_inputs (input_id, session_id, enqueue_seq,
                                source_key, ingress, submitted_ingress, state, input,
                                enqueued_at_ms)
                            VALUES (:id, :es, :seq, :key, CAST(:ingress AS jsonb),
                                CAST(:submitted AS jsonb), :state, CAST(:input AS jsonb), :enow)
                            ON CONFLICT DO NOTHING
                            RETURNING 1),
                        {ses_cte},
                        {_EVENTS_CTE.format(values=values)}
                        SELECT ses.last_seq, ses.head_revision, {_BEHIND_OPEN_INPUT},
                            {", ".join(calls)} FROM ses
                        """
                    ),
                    params,
                )
            ).one_or_none()
            if admitted is None:
                return await self._existing_admission(conn, draft, input_id)
            (event,) = _numbered(
                sid, int(admitted.last_seq), int(admitted.head_revision), now, [payload]
            )
            if local is not None:
                local.append(event)
            return InputAdmission(
                status=AdmissionStatus.ADMITTED,
                record=record,
                event=event,
                held_by=lease.owner if lease is not None and lease.is_live(now) else None,
                behind_open_input=bool(admitted.behind),
                runs_elsewhere=elsewhere,
            )

    async def enqueue_inputs(
        self, drafts: Sequence[TurnInputDraft]
    ) -> list[InputAdmission | SourceKeyConflict | InvalidRequest]:
        """Admit a batch in one transaction of three statements, whatever its size: the
        admission gate of every session, the ``enqueue_seq`` values (drawn after the gate,
        as for one input), and the rows, session seqs, ``input.admitted`` events and
        wake-ups. A duplicate or conflicting draft costs one more read. Sessions are gated
        and written in session-id order, so concurrent batches lock in the same order."""
        if len(drafts) <= 1:
            return await super().enqueue_inputs(drafts)
        # Stable: a session's drafts keep their order, hence their enqueue_seq order.
        order = sorted(range(len(drafts)), key=lambda i: drafts[i].session_id)
        sessions = sorted({d.session_id for d in drafts})
        outcomes: list[InputAdmission | SourceKeyConflict | InvalidRequest | None] = [None] * len(
            drafts
        )
        async with self._tx(openings=[Opening(_BATCH_GATE, (sessions,), "gate")]) as conn:
            local = {
                sid: events
                for sid in sessions
                if (events := self._local_events(conn, sid)) is not None
            }
            elsewhere = {sid for sid in sessions if self._runs_elsewhere(sid)}
            gate = conn.opened("gate")
            now = 0
            leases: dict[str, LeaseRow | None] = {}
            for row in gate:
                now = int(row.now_ms)
                leases[row.sid] = lease_from_json(row.lease)
            # A live holder sees the input anyway: the publisher need not drain it.
            for_publisher = {
                sid for sid in elsewhere if (gated := leases[sid]) is None or not gated.is_live(now)
            }
            seqs = (await conn.execute(_BATCH_SEQS, {"n": len(drafts)})).all()
            records: list[PendingTurnInput] = []
            for position, index in enumerate(order):
                draft = drafts[index]
                records.append(
                    _admitted_record(
                        draft,
                        draft.input_id or self._ids.new_id("ti_"),
                        int(seqs[position][0]),
                        leases[draft.session_id],
                        now,
                    )
                )
            payloads = [InputAdmitted(input=r.public()) for r in records]
            inserted = await conn.execute(
                _BATCH_INSERT,
                {
                    "now": now,
                    "ch": notify.CHANNEL,
                    "ids": [r.input_id for r in records],
                    "sids": [r.session_id for r in records],
                    "seqs": [r.enqueue_seq for r in records],
                    "keys": [r.source_key for r in records],
                    "ingress": [dumps(r.ingress.model_dump(mode="json")) for r in records],
                    "submitted": [
                        dumps(r.submitted_ingress.model_dump(mode="json")) for r in records
                    ],
                    "states": [r.state.value for r in records],
                    "inputs": [dumps(r.input.model_dump(mode="json")) for r in records],
                    "payloads": [dumps(p.model_dump(mode="json")) for p in payloads],
                    "shards": [session_shard(r.session_id) for r in records],
                    "new_sids": [sid for sid in sessions if leases[sid] is None],
                    "note_sids": sessions,
                    "note_work": [
                        notify.payload("work", sid, for_publisher=sid in for_publisher)
                        for sid in sessions
                    ],
                    "announce": [sid for sid in sessions if sid not in local],
                },
            )
            landed = {row.input_id: row for row in inserted if row.input_id is not None}
            for index, record, payload in zip(order, records, payloads, strict=True):
                draft = drafts[index]
                row = landed.get(record.input_id)
                if row is None or row.session_id != record.session_id:
                    try:
                        outcomes[index] = await self._existing_admission(
                            conn, draft, record.input_id
                        )
                    except (SourceKeyConflict, InvalidRequest) as exc:
                        outcomes[index] = exc
                    continue
                lease = leases[record.session_id]
                event = DurableEvent(
                    session_id=record.session_id,
                    seq=int(row.seq),
                    revision=int(row.revision),
                    payload=payload,
                    created_at_ms=now,
                )
                if (handed := local.get(record.session_id)) is not None:
                    handed.append(event)
                outcomes[index] = InputAdmission(
                    status=AdmissionStatus.ADMITTED,
                    record=record,
                    event=event,
                    held_by=lease.owner if lease is not None and lease.is_live(now) else None,
                    behind_open_input=bool(row.behind),
                    runs_elsewhere=record.session_id in elsewhere,
                )
        return [o for o in outcomes if o is not None]

    async def _existing_admission(
        self, conn: Connection, draft: TurnInputDraft, input_id: str
    ) -> InputAdmission:
        """Resolve an insert that hit a unique key: an idempotent replay or a conflict."""
        sid = draft.session_id
        found = await self._inputs(
            conn,
            "(session_id = :s AND source_key = :key) OR input_id = :id",
            {"s": sid, "key": draft.source_key, "id": input_id},
        )
        by_key = [r for r in found if r.session_id == sid and r.source_key == draft.source_key]
        existing = by_key[0] if draft.source_key is not None and by_key else None
        if existing is None:
            existing = next((r for r in found if r.input_id == input_id), None)
        if existing is None:
            raise RetryableStoreError(f"admission of {input_id!r} raced a concurrent delete")
        if existing.session_id == sid and rules.same_content(draft, existing):
            return InputAdmission(status=AdmissionStatus.DUPLICATE, record=existing)
        raise SourceKeyConflict(sid, draft.source_key or input_id, existing.input_id)

    async def get_input(self, session_id: str, input_id: str) -> PendingTurnInput | None:
        async with self._tx(single=True) as conn:
            found = await self._inputs(
                conn, "session_id = :s AND input_id = :id", {"s": session_id, "id": input_id}
            )
        return found[0] if found else None

    async def list_inputs(self, session_id: str) -> list[PendingTurnInput]:
        async with self._tx(single=True) as conn:
            return await self._inputs(conn, "session_id = :s", {"s": session_id})

    async def list_pending_inputs(self, session_id: str) -> list[PendingTurnInput]:
        async with self._tx() as conn:
            return await self._pending_inputs(conn, session_id)

    async def _pending_inputs(self, conn: Connection, session_id: str) -> list[PendingTurnInput]:
        now, lease = await self._now_lease(conn, session_id)
        rows = await self._inputs(
            conn,
            "session_id = :s AND state IN ('pending_active', 'deferred_next_turn')",
            {"s": session_id},
        )
        return [r for r in rows if not rules.claim_is_live(r.claim, lease, now)]

    async def cancel_inputs(
        self, session_id: str, targets: Sequence[CancelTarget]
    ) -> list[CancelResult]:
        async with self._tx() as conn:
            now, lease = await self._now_lease(conn, session_id, "FOR SHARE")
            ids = [t.value for t in targets if isinstance(t, InputIdTarget)]
            keys = [t.value for t in targets if not isinstance(t, InputIdTarget)]
            rows = await self._inputs(
                conn,
                "session_id = :s AND (input_id = ANY(:ids) OR source_key = ANY(:keys))",
                {"s": session_id, "ids": ids, "keys": keys},
                "FOR UPDATE",
            )
            results, changed = self._apply_cancels(targets, rows, lease, now)
            await self._finish_cancel(conn, session_id, changed, now)
            return results

    def _apply_cancels(
        self,
        targets: Sequence[CancelTarget],
        rows: list[PendingTurnInput],
        lease: LeaseRow | None,
        now: int,
    ) -> tuple[list[CancelResult], list[PendingTurnInput]]:
        """Decide each target in order against the rows as earlier targets left them."""
        current = {r.input_id: r for r in rows}
        changed: dict[str, PendingTurnInput] = {}
        results: list[CancelResult] = []
        for target in targets:
            record = next((r for r in current.values() if rules.target_matches(target, r)), None)
            outcome = rules.cancel_decision(
                record, record is not None and rules.claim_is_live(record.claim, lease, now)
            )
            if outcome is rules.CancelOutcomeKind.CANCELLED and record is not None:
                record = record.model_copy(update={"state": InputState.CANCELLED, "claim": None})
                current[record.input_id] = record
                changed[record.input_id] = record
            results.append(
                CancelResult(
                    target=target,
                    outcome=outcome,
                    input=record.public() if record else None,
                    claim=rules.claim_diagnostics(record) if record else None,
                )
            )
        return results, list(changed.values())

    async def _finish_cancel(
        self, conn: Connection, session_id: str, changed: list[PendingTurnInput], now: int
    ) -> None:
        if not changed:
            return
        await self._write_inputs(conn, session_id, changed, now)
        await self._append_events(
            conn, session_id, now, [InputCancelled(input_ids=[r.input_id for r in changed])]
        )

    async def cancel_input_suffix(
        self, session_id: str, anchor: CancelTarget
    ) -> SuffixCancelResult:
        async with self._tx() as conn:
            now, lease = await self._now_lease(conn, session_id, "FOR SHARE")
            column = "input_id" if isinstance(anchor, InputIdTarget) else "source_key"
            rows = await self._inputs(
                conn,
                f"session_id = :s AND enqueue_seq >= (SELECT enqueue_seq FROM "
                f"lash_pending_inputs WHERE session_id = :s AND {column} = :v)",
                {"s": session_id, "v": anchor.value},
                "FOR UPDATE",
            )
            if not rows:
                return SuffixCancelResult(anchor=anchor, anchor_found=False)
            targets: list[CancelTarget] = [InputIdTarget(value=r.input_id) for r in rows]
            results, changed = self._apply_cancels(targets, rows, lease, now)
            await self._finish_cancel(conn, session_id, changed, now)
            return SuffixCancelResult(anchor=anchor, anchor_found=True, results=results)

    async def abandon_input_claim(self, claim: TurnInputClaim) -> None:
        async with self._tx() as conn:
            await conn.execute(
                text(
                    "UPDATE lash_pending_inputs SET state = CASE WHEN state = 'accepted'"
                    " THEN 'pending_active' ELSE state END, claim_id = NULL,"
                    " claim_owner_id = NULL, claim_owner_incarnation_id = NULL,"
                    " claim_owner_liveness = NULL, claim_token = NULL,"
                    " claim_session_lease_generation = 0"
                    " WHERE session_id = :s AND claim_id = :c AND claim_token = :t"
                ),
                {"s": claim.session_id, "c": claim.claim_id, "t": claim.claim_token},
            )

    # ------------------------------------------------------------------ leases

    async def try_claim_lease(
        self, session_id: str, owner: LeaseOwner, ttl_ms: int
    ) -> LeaseClaimResult:
        return await self._claim_lease(session_id, owner, ttl_ms, None, None)

    async def reclaim_lease(
        self,
        session_id: str,
        owner: LeaseOwner,
        observed_holder: LeaseFence,
        ttl_ms: int,
        holder_is_dead: DeadCheck | None = None,
    ) -> LeaseClaimResult:
        check = holder_is_dead or lease_rules.holder_is_definitely_dead
        return await self._claim_lease(session_id, owner, ttl_ms, observed_holder, check)

    async def _claim_lease(
        self,
        session_id: str,
        owner: LeaseOwner,
        ttl_ms: int,
        observed: LeaseFence | None,
        dead: DeadCheck | None,
    ) -> LeaseClaimResult:
        async with self._tx() as conn:
            # The advisory lock makes the first claim of a missing row safe: the loser
            # waits, then reads the winner's committed row in its next statement. (While
            # the row is missing, admissions take the shared side of this lock.)
            await conn.execute(_ADVISORY_LOCK, {"s": session_id})
            now, row = await self._now_lease(conn, session_id, "FOR UPDATE")
            if observed is None or dead is None:
                decision = lease_rules.decide_try_claim(row, session_id, owner, now, ttl_ms)
            else:
                decision = lease_rules.decide_reclaim(
                    row, session_id, owner, observed, now, ttl_ms, dead
                )
            if decision.write is not None:
                await self._write_lease(conn, decision.write)
            return decision.result

    async def renew_lease(self, fence: LeaseFence, ttl_ms: int) -> LeaseRow:
        async with self._tx(lock_lease=fence.session_id) as conn:
            now, row = await self._now_lease(conn, fence.session_id, "FOR UPDATE")
            new = lease_rules.decide_renew(row, fence, now, ttl_ms)
            await conn.execute(
                text("UPDATE lash_leases SET expires_at_ms = :e WHERE session_id = :s"),
                {"e": new.expires_at_ms, "s": fence.session_id},
            )
            return new

    async def release_lease(self, fence: LeaseFence) -> None:
        async with self._tx(lock_lease=fence.session_id) as conn:
            _, row = await self._now_lease(conn, fence.session_id, "FOR UPDATE")
            await self._release(conn, row, fence)

    async def _release(self, conn: Connection, row: LeaseRow | None, fence: LeaseFence) -> bool:
        new = lease_rules.decide_release(row, fence)
        if new is None:
            return False
        await self._append_events(conn, fence.session_id, 0, [], [("work", None)], lease=new)
        return True

    async def read_lease(self, session_id: str) -> LeaseRow | None:
        async with self._tx(single=True) as conn:
            return (await self._now_lease(conn, session_id))[1]

    # ------------------------------------------------------------------ claims

    def _claim_rows(
        self,
        chosen: list[PendingTurnInput],
        fence: LeaseFence,
        owner: LeaseOwner,
        now: int,
        state: InputState | None,
    ) -> tuple[str, str, int, list[PendingTurnInput]]:
        """Claim identity (§3.4) and the claimed rows as they are to be written."""
        head = chosen[0]
        fencing = head.claim_fencing_token + 1
        cid = input_claim_id(head.enqueue_seq, fencing)
        token = claim_token(fence.session_id, owner, cid, now)
        row_claim = RowClaim(
            claim_id=cid,
            owner=owner,
            claim_token=token,
            session_lease_generation=fence.fencing_token,
        )
        written = [
            r.model_copy(
                update={
                    "claim": row_claim,
                    "claim_fencing_token": r.claim_fencing_token + 1,
                    "state": state or r.state,
                }
            )
            for r in chosen
        ]
        return cid, token, fencing, written

    async def _open_rows(
        self, conn: Connection, session_id: str, generation: int
    ) -> tuple[int | None, list[PendingTurnInput]]:
        """The ``enqueue_seq`` of the earliest pending command ``generation`` did not claim
        (one it claimed is being applied) and the open input rows, locked.

        Read after the lease row is locked FOR UPDATE, in a later statement (sent with it
        when the transaction opened with :data:`_OPEN_ROWS` too, see :meth:`_turn_tx`):
        every admission locks that row (shared) before it draws its ``enqueue_seq``, so the
        rows seen here are a prefix of the session's admission order, commands included.
        """
        result = conn.take_opened(_OPEN_ROWS_KEY)
        if result is None:
            result = await conn.execute(text(_OPEN_ROWS_SQL), {"s": session_id})
        found = result.all()
        first = (
            _first_command(
                found[0].unclaimed_command,
                found[0].claimed_seqs,
                found[0].claimed_generations,
                generation,
            )
            if found
            else None
        )
        rows = [input_from_row(r._asdict()) for r in found if r.input_id is not None]
        return first, rows

    def _turn_tx(self, session_id: str) -> AbstractAsyncContextManager[Connection]:
        """A transaction that opens with the session's lease lock and then its open rows
        (:meth:`_open_rows`), both sent with ``BEGIN``: one round trip for what a turn
        start or a claim reads first."""
        return self._tx(
            lock_lease=session_id,
            openings=[Opening(_OPEN_ROWS, (session_id,), _OPEN_ROWS_KEY)],
        )

    def _next_turn_claim(
        self,
        fence: LeaseFence,
        owner: LeaseOwner,
        now: int,
        rows: Sequence[PendingTurnInput],
        max_inputs: int,
        before_seq: int | None,
    ) -> TurnInputClaim | None:
        """The next-turn claim over ``rows`` (not yet written), or ``None``."""
        chosen = rules.select_next_turn_claim(
            rows, generation=fence.fencing_token, max_inputs=max_inputs, before_seq=before_seq
        )
        if not chosen:
            return None
        cid, token, fencing, written = self._claim_rows(chosen, fence, owner, now, None)
        return TurnInputClaim(
            session_id=fence.session_id,
            claim_id=cid,
            owner=owner,
            claim_token=token,
            fencing_token=fencing,
            session_lease_generation=fence.fencing_token,
            mode=NextTurnMode(),
            inputs=written,
        )

    async def start_turn(
        self,
        fence: LeaseFence,
        turn_id: str | None = None,
        *,
        claim_next_turn_inputs: bool = True,
        require_inputs: bool = True,
        max_inputs: int = MAX_CLAIM_INPUTS,
    ) -> TurnStart | None:
        async with self._turn_tx(fence.session_id) as conn:
            now, lease = await self._fenced(conn, fence)
            begun = await self._start_turn(
                conn,
                fence,
                lease,
                now,
                turn_id,
                claim_next_turn_inputs,
                require_inputs,
                max_inputs,
            )
            return begun[0]

    async def _start_turn(
        self,
        conn: Connection,
        fence: LeaseFence,
        lease: LeaseRow,
        now: int,
        turn_id: str | None,
        claim_next_turn_inputs: bool,
        require_inputs: bool,
        max_inputs: int,
    ) -> tuple[TurnStart | None, bool]:
        """``start_turn`` after the lease row is locked and ``lease`` is the tenure's row (to
        be written with the running turn). Returns the turn (``None``: nothing written) and
        whether a session command is pending. Two statements, three with orphans."""
        sid = fence.session_id
        first_command, open_rows = await self._open_rows(conn, sid, fence.fencing_token)
        resolved = await self._resolve_orphans(conn, sid, fence.fencing_token, open_rows)
        claim = None
        if claim_next_turn_inputs and max_inputs > 0:
            candidates = {r.input_id: r for r in open_rows}
            candidates.update({r.input_id: r for r in resolved})
            claim = self._next_turn_claim(
                fence, fence.owner, now, list(candidates.values()), max_inputs, first_command
            )
        if require_inputs and claim is None:
            # No turn starts, but input a dead generation left behind is still settled now:
            # otherwise the recovery sweep would keep waking a session with nothing to run.
            await self._write_inputs(conn, sid, resolved, now)
            return None, first_command is not None
        claimed = claim.inputs if claim else []
        turn_id = turn_id or rules.requested_turn_id(claimed) or self._ids.new_id("turn_")
        ids = {r.input_id for r in claimed}
        running = lease.model_copy(
            update={"running_turn_id": turn_id, "cancel_requested": False, "cancel_reason": None}
        )
        started = TurnStarted(
            turn_id=turn_id,
            input_ids=[r.input_id for r in claimed],
            lease_generation=fence.fencing_token,
        )
        (event,), leaf = await self._append(
            conn,
            sid,
            now,
            [started],
            lease=running,
            inputs=[*claimed, *(r for r in resolved if r.input_id not in ids)],
            last=True,
        )
        turn = TurnStart(
            session_id=sid,
            turn_id=turn_id,
            lease_generation=fence.fencing_token,
            claim=claim,
            resolved_input_ids=[r.input_id for r in resolved],
            event=event,
            leaf_node_id=leaf,
            command_pending=first_command is not None,
        )
        return turn, first_command is not None

    async def acquire_and_start_turn(
        self,
        session_id: str,
        owner: LeaseOwner,
        ttl_ms: int,
        *,
        max_inputs: int = MAX_CLAIM_INPUTS,
        only_if_work: bool = False,
    ) -> TenureStart:
        async with self._turn_tx(session_id) as conn:
            now, row = await self._now_lease(conn, session_id, "FOR UPDATE")
            if row is None:
                # No lease row yet (admission writes a free one, so this is a session with
                # no admitted input, or a command only): serialise on the advisory lock
                # (see ``_claim_lease``), then read again in new statements (the open rows
                # read with the lock proved nothing: no lease row held admission back).
                conn.take_opened(_OPEN_ROWS_KEY)
                await conn.execute(_ADVISORY_LOCK, {"s": session_id})
                now, row = await self._now_lease(conn, session_id, "FOR UPDATE")
            decision = lease_rules.decide_try_claim(row, session_id, owner, now, ttl_ms)
            if not isinstance(decision.result, Acquired) or decision.write is None:
                return TenureStart(lease=decision.result)
            lease = decision.result.lease
            turn, command_pending = await self._start_turn(
                conn, lease.fence(), decision.write, now, None, True, True, max_inputs
            )
            if turn is None:
                if only_if_work and not command_pending:
                    # Nothing to run: leave the lease untaken (the row lock held so far is
                    # what every admission waits on, so nothing admitted can be missed).
                    return TenureStart(lease=None)
                await self._write_lease(conn, decision.write)
            return TenureStart(lease=decision.result, turn=turn, command_pending=command_pending)

    async def _resolve_orphans(
        self,
        conn: Connection,
        session_id: str,
        generation: int,
        rows: list[PendingTurnInput],
    ) -> list[PendingTurnInput]:
        """Input left by a dead generation, as it must be rewritten (not yet written)."""
        accepted = {
            r.input_id
            for r in rows
            if r.state is InputState.ACCEPTED
            and (r.claim is None or r.claim.session_lease_generation != generation)
        }
        committed: set[str] = set()
        if accepted:
            found = await conn.execute(
                text("SELECT node_id FROM lash_nodes WHERE session_id = :s AND node_id = ANY(:n)"),
                {"s": session_id, "n": [ingress_message_id(i) for i in accepted]},
            )
            committed = {row.node_id for row in found}
        out: list[PendingTurnInput] = []
        for r in rows:
            if r.input_id in accepted and ingress_message_id(r.input_id) in committed:
                out.append(r.model_copy(update={"state": InputState.COMPLETED, "claim": None}))
            elif r.input_id in accepted or r.state is InputState.PENDING_ACTIVE:
                out.append(
                    r.model_copy(
                        update={
                            "state": InputState.DEFERRED_NEXT_TURN,
                            "ingress": NextTurnIngress(),
                            "claim": None,
                        }
                    )
                )
        return out

    async def claim_next_turn_inputs(
        self, fence: LeaseFence, owner: LeaseOwner, max_inputs: int = MAX_CLAIM_INPUTS
    ) -> TurnInputClaim | None:
        async with self._turn_tx(fence.session_id) as conn:
            now, _ = await self._fenced(conn, fence)
            first_command, rows = await self._open_rows(conn, fence.session_id, fence.fencing_token)
            claim = self._next_turn_claim(fence, owner, now, rows, max_inputs, first_command)
            if claim is None:
                return None
            if await self._write_inputs(conn, fence.session_id, claim.inputs, now) != len(
                claim.inputs
            ):
                raise RetryableStoreError("claimed input rows changed under their lock")
            return claim

    async def claim_active_turn_inputs(
        self,
        fence: LeaseFence,
        owner: LeaseOwner,
        turn_id: str,
        checkpoint: CheckpointKind,
        max_inputs: int = MAX_CLAIM_INPUTS,
    ) -> TurnInputClaim | None:
        sid = fence.session_id
        try:
            async with self._tx(lock_lease=sid) as conn:
                now, _ = await self._fenced(conn, fence)
                rows = await self._active_candidates(conn, sid, turn_id, "FOR UPDATE SKIP LOCKED")
                chosen = rules.select_active_claim(
                    rows,
                    turn_id=turn_id,
                    checkpoint=checkpoint,
                    generation=fence.fencing_token,
                    max_inputs=max_inputs,
                )
                if not chosen:
                    return None
                cid, token, fencing, written = self._claim_rows(
                    chosen, fence, owner, now, InputState.ACCEPTED
                )
                if await self._write_inputs(conn, sid, written, now) != len(written):
                    raise _Rollback
                ids = [r.input_id for r in written]
                await self._append_events(
                    conn, sid, now, [InputAccepted(turn_id=turn_id, input_ids=ids)]
                )
                return TurnInputClaim(
                    session_id=sid,
                    claim_id=cid,
                    owner=owner,
                    claim_token=token,
                    fencing_token=fencing,
                    session_lease_generation=fence.fencing_token,
                    mode=ActiveTurnMode(turn_id=turn_id, checkpoint=checkpoint),
                    inputs=written,
                )
        except _Rollback:
            return None

    async def _active_candidates(
        self, conn: Connection, session_id: str, turn_id: str, lock: str = ""
    ) -> list[PendingTurnInput]:
        return await self._inputs(
            conn,
            "session_id = :s AND state = 'pending_active' AND ingress->>'turn_id' = :t",
            {"s": session_id, "t": turn_id},
            lock,
        )

    async def has_active_input(
        self, session_id: str, turn_id: str, checkpoint: CheckpointKind
    ) -> bool:
        # One statement, its own transaction (this probe runs at every checkpoint of every
        # turn, so no BEGIN/COMMIT trips): the candidate rows, each carrying the session's
        # lease generation, read in one snapshot.
        async with self._tx(single=True) as conn:
            found = (
                await conn.execute(
                    text(
                        "SELECT (SELECT fencing_token FROM lash_leases WHERE session_id = :s)"
                        f" AS lease_generation, a.* FROM ({_STEERING_ROWS_SQL}) a"
                    ),
                    {"s": session_id, "steer_t": turn_id},
                )
            ).all()
        if not found:
            return False
        generation = int(found[0].lease_generation or 0)
        rows = [input_from_row(r._asdict()) for r in found]
        return _admits_steering(rows, turn_id, checkpoint, generation)

    # ------------------------------------------------------------------ commands

    async def _commands(
        self, conn: Connection, where: str, params: dict[str, Any], suffix: str = ""
    ) -> list[QueuedCommand]:
        rows = await conn.execute(
            text(
                f"SELECT {COMMAND_COLUMNS} FROM lash_session_commands WHERE {where} "
                f"ORDER BY enqueue_seq {suffix}"
            ),
            params,
        )
        return [command_from_row(r._asdict()) for r in rows]

    async def enqueue_command(self, draft: CommandDraft) -> CommandAdmission:
        sid = draft.session_id
        async with self._tx() as conn:
            # The command's enqueue_seq is drawn by the insert, after the gate.
            await conn.execute(_COMMAND_ADMISSION_GATE, {"s": sid})
            inserted = (
                await conn.execute(
                    text(
                        f"""
                        WITH ins AS (
                            INSERT INTO lash_session_commands (batch_id, session_id, source_key,
                                command, state, enqueued_at_ms)
                            VALUES (:id, :s, :key, CAST(:command AS jsonb), 'pending', {NOW_SQL})
                            ON CONFLICT DO NOTHING
                            RETURNING {COMMAND_COLUMNS}),
                        ses AS (
                            INSERT INTO lash_sessions (session_id, created_at_ms, updated_at_ms)
                            SELECT :s, enqueued_at_ms, enqueued_at_ms FROM ins
                            ON CONFLICT (session_id) DO NOTHING)
                        SELECT * FROM ins
                        """
                    ),
                    {
                        "id": self._ids.new_id("qwb_"),
                        "s": sid,
                        "key": draft.source_key,
                        "command": dumps(draft.command.model_dump(mode="json")),
                    },
                )
            ).one_or_none()
            if inserted is not None:
                await self._append_events(conn, sid, 0, [], [("work", None)])
                return CommandAdmission(
                    status=AdmissionStatus.ADMITTED, command=command_from_row(inserted._asdict())
                )
            found = await self._commands(
                conn, "session_id = :s AND source_key = :key", {"s": sid, "key": draft.source_key}
            )
            if not found:
                raise RetryableStoreError("command admission raced a concurrent delete")
            if same_command(draft, found[0]):
                return CommandAdmission(status=AdmissionStatus.DUPLICATE, command=found[0])
            raise SourceKeyConflict(sid, draft.source_key, found[0].batch_id)

    async def list_commands(
        self, session_id: str, *, pending_only: bool = False
    ) -> list[QueuedCommand]:
        async with self._tx() as conn:
            if not pending_only:
                return await self._commands(conn, "session_id = :s", {"s": session_id})
            now, lease = await self._now_lease(conn, session_id)
            rows = await self._commands(
                conn, "session_id = :s AND state = 'pending'", {"s": session_id}
            )
        return [c for c in rows if not rules.claim_is_live(c.claim, lease, now)]

    async def cancel_command(self, session_id: str, batch_id: str) -> QueuedCommand | None:
        async with self._tx() as conn:
            now, lease = await self._now_lease(conn, session_id, "FOR SHARE")
            found = await self._commands(
                conn,
                "session_id = :s AND batch_id = :b",
                {"s": session_id, "b": batch_id},
                "FOR UPDATE",
            )
            if not found:
                return None
            cmd = found[0]
            if cmd.state is not CommandState.PENDING or rules.claim_is_live(cmd.claim, lease, now):
                return None
            await conn.execute(
                text(
                    "UPDATE lash_session_commands SET state = 'cancelled', terminal_at_ms = :now"
                    " WHERE batch_id = :b"
                ),
                {"now": now, "b": batch_id},
            )
            return cmd.model_copy(update={"state": CommandState.CANCELLED})

    async def claim_leading_command(
        self, fence: LeaseFence, owner: LeaseOwner
    ) -> CommandClaim | None:
        sid = fence.session_id
        async with self._tx(lock_lease=sid) as conn:
            now, _ = await self._fenced(conn, fence)
            row = (
                await conn.execute(
                    text(
                        f"""
                        SELECT {COMMAND_COLUMNS}, (
                            SELECT min(i.enqueue_seq) FROM lash_pending_inputs i
                            WHERE i.session_id = :s AND i.state = 'deferred_next_turn'
                              AND (i.claim_token IS NULL
                                   OR i.claim_session_lease_generation <> :g)) AS first_input
                        FROM lash_session_commands
                        WHERE session_id = :s AND state = 'pending'
                          AND (claim_token IS NULL OR claim_session_lease_generation <> :g)
                        ORDER BY enqueue_seq LIMIT 1 FOR UPDATE SKIP LOCKED
                        """
                    ),
                    {"s": sid, "g": fence.fencing_token},
                )
            ).one_or_none()
            if row is None:
                return None
            cmd = command_from_row(row._asdict())
            if row.first_input is not None and row.first_input < cmd.enqueue_seq:
                return None
            fencing = cmd.claim_fencing_token + 1
            cid = command_claim_id(cmd.enqueue_seq, fencing)
            token = claim_token(sid, owner, cid, now)
            row_claim = RowClaim(
                claim_id=cid,
                owner=owner,
                claim_token=token,
                session_lease_generation=fence.fencing_token,
            )
            params = claim_params(row_claim)
            await conn.execute(
                text(
                    "UPDATE lash_session_commands SET claim_id = :claim_id,"
                    " claim_owner_id = :claim_owner_id,"
                    " claim_owner_incarnation_id = :claim_owner_incarnation_id,"
                    " claim_owner_liveness = CAST(:claim_owner_liveness AS jsonb),"
                    " claim_token = :claim_token, claim_fencing_token = :fencing,"
                    " claim_session_lease_generation = :claim_session_lease_generation"
                    " WHERE batch_id = :b"
                ),
                {**params, "fencing": fencing, "b": cmd.batch_id},
            )
            claimed = cmd.model_copy(update={"claim": row_claim, "claim_fencing_token": fencing})
            return CommandClaim(
                session_id=sid,
                claim_id=cid,
                owner=owner,
                claim_token=token,
                fencing_token=fencing,
                session_lease_generation=fence.fencing_token,
                command=claimed,
            )

    # ------------------------------------------------------------------ commit

    async def commit(self, commit: RuntimeCommit) -> CommitResult:
        sid = commit.session_id
        # Checked before anything is sent: a misdirected commit locks nothing.
        if commit.fence is not None and commit.fence.session_id != sid:
            raise SessionMismatch(f"fence for {commit.fence.session_id!r} used on session {sid!r}")
        for ic in commit.completed_input_claims:
            if ic.session_id != sid:
                raise Superseded(sid, ic.claim_id, "turn_input")
        for cc in commit.completed_command_claims:
            if cc.session_id != sid:
                raise Superseded(sid, cc.claim_id, "command")
        seen_head: list[int] = []
        turn_id = commit.turn.turn_id if commit.turn else None
        input_ids = [i for c in commit.completed_input_claims for i in c.input_ids]
        batch_ids = [b for c in commit.completed_command_claims for b in c.batch_ids]
        steer_t = turn_id if commit.steering_checkpoint else None
        head = Opening(
            _COMMIT_HEAD,
            (
                sid,
                turn_id,
                steer_t,
                input_ids,
                batch_ids,
                commit.defer_active_inputs_of_turn,
                commit.release_lease_if_idle,
            ),
            _COMMIT_HEAD_KEY,
        )
        try:
            async with self._tx(lock_lease=sid, openings=[head]) as conn:
                return await self._commit(conn, commit, seen_head, input_ids, batch_ids)
        except RetryableStoreError as exc:
            cause = exc.__cause__
            if cause is not None and sqlstate(cause) in CAS_SQLSTATES:
                actual = seen_head[0] if seen_head else -1
                raise HeadRevisionConflict(
                    commit.session_id, commit.expected_head_revision, actual
                ) from exc
            raise

    async def _commit(
        self,
        conn: Connection,
        commit: RuntimeCommit,
        seen_head: list[int],
        input_ids: list[str],
        batch_ids: list[str],
    ) -> CommitResult:
        """:meth:`commit` in its transaction, opened with the lease lock and the head read
        (``input_ids``, ``batch_ids``: the rows its claims complete)."""
        sid = commit.session_id
        commit_hash = commit.commit_hash() if commit.turn else None
        # The transaction opened by locking the lease row (whatever its state): every commit
        # of the session serialises there, so the stamp and head read in the next statement
        # (sent with it) are current, not a snapshot from before a concurrent commit ended.
        now, lease_row = await self._now_lease(conn, sid, "FOR UPDATE")
        head_row = conn.opened(_COMMIT_HEAD_KEY).one()
        stamp = head_row.stamp
        if commit.turn is not None and stamp is not None:
            if stamp["turn_commit_hash"] != commit_hash:
                raise TurnCommitConflict(sid, commit.turn.turn_id)
            if commit.release_lease and commit.fence is not None:
                await self._release(conn, lease_row, commit.fence)
            # Released now, by the landed attempt, or lost: this fence holds nothing more.
            gone = (
                commit.fence is None
                or commit.release_lease
                or not lease_rules.fence_matches(lease_row, commit.fence)
            )
            stored = CommitResult.model_validate(stamp["result"])
            return stored.model_copy(
                update={"replayed": True, "released": gone, "command_pending": False}
            )
        if commit.fence is None:
            raise LeaseLost(sid, "commit without a lease fence")
        lease = lease_rules.validate_fence(lease_row, commit.fence, sid, now)
        session = head_row.session
        head = int(session["head_revision"]) if session else 0
        seen_head.append(head)
        if commit.expected_head_revision is not None and commit.expected_head_revision != head:
            raise HeadRevisionConflict(sid, commit.expected_head_revision, head)
        if commit.turn and commit.steering_checkpoint and head_row.steering:
            rows = [input_from_row(r) for r in head_row.steering]
            turn_id = commit.turn.turn_id
            if _admits_steering(rows, turn_id, commit.steering_checkpoint, lease.fencing_token):
                raise SteeringPending(sid, turn_id)
        _validate_completions(commit, head_row.inputs or [], head_row.commands or [])

        new_head = head + 1
        last_seq = int(session["last_seq"]) if session else 0
        appended: list[MessageNode] = []
        if isinstance(commit.graph, GraphReplace):
            await conn.execute(text("DELETE FROM lash_nodes WHERE session_id = :s"), {"s": sid})
        if isinstance(commit.graph, GraphAppend | GraphReplace):
            appended = list(commit.graph.nodes)
        deferred: list[str] = list(head_row.deferrable)
        open_input, command_pending = bool(head_row.open_input), bool(head_row.command_pending)

        payloads: list[EventPayload] = []
        if commit.applied_command is not None:
            payloads.append(CommandApplied(command=commit.applied_command))
        if commit.turn is not None:
            payloads.append(
                TurnCommitted(
                    turn_id=commit.turn.turn_id,
                    outcome=commit.turn.outcome,
                    messages=[to_transcript(n) for n in appended],
                    usage=commit.turn.usage,
                    input_ids=input_ids,
                    deferred_input_ids=deferred,
                )
            )
        # The session row is locked (read FOR UPDATE above), so the seqs are known now.
        events = _numbered(sid, last_seq + len(payloads), new_head, now, payloads)
        if commit.turn is not None:
            lease = lease.model_copy(
                update={"running_turn_id": None, "cancel_requested": False, "cancel_reason": None}
            )
        # The lease row has been locked FOR UPDATE since this transaction's first statement
        # and admissions lock it FOR SHARE: the idle check cannot miss a committed admission.
        idle = commit.release_lease_if_idle and not open_input and not command_pending
        released = (
            lease_rules.decide_release(lease, commit.fence)
            if commit.release_lease or idle
            else None
        )
        result = CommitResult(
            session_id=sid,
            head_revision=new_head,
            events=events,
            deferred_input_ids=deferred,
            released=released is not None,
            command_pending=command_pending,
        )
        # An idle release wakes nobody: there is no work for another worker to take.
        wake = bool(deferred) or (released is not None and not idle)
        notes: list[Note] = [("work", None)] if wake else []
        await self._finish_commit(
            conn,
            commit,
            session,
            result,
            payloads,
            notes,
            released or lease if released or commit.turn else None,
            now,
            commit_hash,
            _completion(input_ids, batch_ids, deferred, new_head, appended),
        )
        return result

    async def _finish_commit(
        self,
        conn: Connection,
        commit: RuntimeCommit,
        session: dict[str, Any] | None,
        result: CommitResult,
        payloads: Sequence[EventPayload],
        notes: Sequence[Note],
        lease: LeaseRow | None,
        now: int,
        commit_hash: str | None,
        completion: tuple[list[str], dict[str, Any]],
    ) -> None:
        """One statement: the ``completion`` writes (:func:`_completion`), head CAS +
        session fields, events, stamp, lease row, wake-ups (``commit_hash``: the turn's,
        computed once by the caller)."""
        sid = commit.session_id
        local = self._local_events(conn, sid) if payloads else None
        params, values, calls = _event_params(sid, now, payloads, notes, announce=local is None)
        completion_ctes, completion_params = completion
        params.update(completion_params)
        head = result.head_revision
        usage = Usage.model_validate(session["usage"]) if session else Usage()
        if commit.usage is not None:
            usage = usage + commit.usage
        graph = commit.graph
        sets_leaf = isinstance(graph, GraphAppend | GraphReplace)
        params.update(
            {
                "head": head,
                "prev": head - 1,
                "leaf": graph.leaf_node_id
                if isinstance(graph, GraphAppend | GraphReplace)
                else None,
                "config": dumps(commit.config.model_dump(mode="json")) if commit.config else None,
                "checkpoint": dumps(commit.checkpoint) if commit.checkpoint is not None else None,
                "usage": dumps(usage.model_dump(mode="json")),
            }
        )
        ctes = [
            f"""ses AS (
            INSERT INTO lash_sessions (session_id, head_revision, last_seq, leaf_node_id, config,
                checkpoint, usage, created_at_ms, updated_at_ms)
            VALUES (:es, :head, :en, :leaf, CAST(:config AS jsonb), CAST(:checkpoint AS jsonb),
                CAST(:usage AS jsonb), :enow, :enow)
            ON CONFLICT (session_id) DO UPDATE SET head_revision = :head,
                last_seq = lash_sessions.last_seq + :en,
                leaf_node_id = {":leaf" if sets_leaf else "lash_sessions.leaf_node_id"},
                config = COALESCE(CAST(:config AS jsonb), lash_sessions.config),
                checkpoint = COALESCE(CAST(:checkpoint AS jsonb), lash_sessions.checkpoint),
                usage = CAST(:usage AS jsonb), updated_at_ms = :enow
            WHERE lash_sessions.head_revision = :prev
            RETURNING last_seq, head_revision)""",
        ]
        ctes.extend(completion_ctes)
        if payloads:
            ctes.append(_EVENTS_CTE.format(values=values))
        if commit.turn is not None:
            ctes.append(
                "stamp AS (INSERT INTO lash_turn_commits (session_id, turn_id, turn_commit_hash,"
                " result, committed_at_ms) SELECT :es, :tid, :hash, CAST(:result AS jsonb),"
                " :enow FROM ses RETURNING 1)"
            )
            params.update(
                {
                    "tid": commit.turn.turn_id,
                    "hash": commit_hash,
                    "result": dumps(result.model_dump(mode="json")),
                }
            )
        if lease is not None:
            ctes.append(f"lease_w AS ({_LEASE_UPSERT_AFTER_HEAD_SQL} RETURNING 1)")
            params.update(lease_params(lease))
        row = (
            await conn.execute_and_commit(
                text(
                    "WITH "
                    + ", ".join(ctes)
                    + " SELECT ses.last_seq"
                    + "".join(", " + c for c in calls)
                    + " FROM ses"
                ),
                params,
            )
        ).one_or_none()
        if row is None:
            # Backstop only: the lease row lock already serialises this session's commits.
            # Every write of the statement waited on the CAS, so nothing was committed.
            raise HeadRevisionConflict(sid, commit.expected_head_revision, head)
        if local is not None:
            local.extend(result.events)

    # ------------------------------------------------------------------ reading

    async def load_state(
        self, session_id: str, residency: Residency = Residency.FULL
    ) -> SessionState:
        # One statement, so one snapshot: no transaction round trips around it.
        async with self._tx(single=True) as conn:
            return await self._load_state(conn, session_id, residency)

    async def _load_state(
        self, conn: Connection, session_id: str, residency: Residency
    ) -> SessionState:
        ses = (await conn.execute(_LOAD_STATE, {"s": session_id})).one_or_none()
        if ses is None:
            return SessionState(
                session_id=session_id, exists=False, head_revision=0, leaf_node_id=None, nodes=[]
            )
        nodes = [node_from_json(node) for node in ses.nodes]
        if residency is Residency.ACTIVE_PATH:
            nodes = active_path(nodes, ses.leaf_node_id)
        return SessionState(
            session_id=session_id,
            exists=True,
            head_revision=int(ses.head_revision),
            leaf_node_id=ses.leaf_node_id,
            nodes=nodes,
            config=ses.config,
            checkpoint=ses.checkpoint,
            usage=Usage.model_validate(ses.usage or {}),
            last_seq=int(ses.last_seq),
        )

    async def read_session(self, session_id: str, after_seq: int | None = None) -> SessionView:
        async with self._tx() as conn:
            await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            state = await self._load_state(conn, session_id, Residency.ACTIVE_PATH)
            now, lease = await self._now_lease(conn, session_id)
            pending = await self._inputs(
                conn,
                "session_id = :s AND state IN ('pending_active', 'deferred_next_turn')",
                {"s": session_id},
            )
            page = None
            if after_seq is not None:
                page = await self._events_after(conn, session_id, after_seq, 1000)
        return SessionView(
            session_id=session_id,
            head_revision=state.head_revision,
            last_seq=state.last_seq,
            running_turn_id=lease.running_turn_id if lease and lease.is_live(now) else None,
            messages=state.nodes,
            pending_inputs=[r for r in pending if not rules.claim_is_live(r.claim, lease, now)],
            events=page,
        )

    async def events_after(self, session_id: str, after_seq: int, limit: int = 1000) -> EventPage:
        async with self._tx(single=True) as conn:
            return await self._events_after(conn, session_id, after_seq, limit)

    async def _events_after(
        self, conn: Connection, session_id: str, after_seq: int, limit: int
    ) -> EventPage:
        rows = await conn.execute(
            text(
                "SELECT e.session_id, e.seq, e.revision, e.payload, e.created_at_ms,"
                " (SELECT last_seq FROM lash_sessions WHERE session_id = :s) AS last_seq"
                " FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT * FROM lash_events"
                "  WHERE session_id = :s AND seq > :a ORDER BY seq LIMIT :n) e ON true"
            ),
            {"s": session_id, "a": after_seq, "n": limit},
        )
        found = rows.all()
        last_seq = int(found[0].last_seq or 0) if found else 0
        events = [event_from_row(r._asdict()) for r in found if r.seq is not None]
        first = events[0].seq if events else None
        gap = after_seq < last_seq and (first is None or first > after_seq + 1)
        return EventPage(
            session_id=session_id, after_seq=after_seq, events=events, gap=gap, last_seq=last_seq
        )

    # ------------------------------------------------------------------ turn cancellation

    async def request_turn_cancel(
        self, session_id: str, turn_id: str | None, reason: str | None = None
    ) -> str | None:
        async with self._tx(lock_lease=session_id) as conn:
            now, lease = await self._now_lease(conn, session_id, "FOR UPDATE")
            if lease is None or not lease.is_live(now) or lease.running_turn_id is None:
                return None
            if turn_id is not None and lease.running_turn_id != turn_id:
                return None
            running = lease.running_turn_id
            await conn.execute(
                text(
                    "UPDATE lash_leases SET cancel_requested = true, cancel_reason = CASE"
                    " WHEN cancel_requested THEN cancel_reason ELSE :r END"
                    " WHERE session_id = :s"
                ),
                {"r": reason, "s": session_id},
            )
            await self._append_events(conn, session_id, now, [], [("cancel", running)])
            return running

    # ------------------------------------------------------------------ maintenance

    async def delete_session(self, fence: LeaseFence) -> None:
        async with self._tx(lock_lease=fence.session_id) as conn:
            await self._fenced(conn, fence)
            await conn.execute(
                text(
                    """
                    WITH a AS (DELETE FROM lash_pending_inputs WHERE session_id = :s),
                         b AS (DELETE FROM lash_session_commands WHERE session_id = :s),
                         c AS (DELETE FROM lash_nodes WHERE session_id = :s),
                         d AS (DELETE FROM lash_events WHERE session_id = :s),
                         e AS (DELETE FROM lash_turn_commits WHERE session_id = :s),
                         f AS (DELETE FROM lash_sessions WHERE session_id = :s)
                    DELETE FROM lash_leases WHERE session_id = :s
                    """
                ),
                {"s": fence.session_id},
            )

    async def vacuum(
        self,
        older_than_ms: int,
        session_id: str | None = None,
        *,
        events_older_than_ms: int | None = None,
    ) -> VacuumReport:
        scope = "" if session_id is None else " AND session_id = :s"
        async with self._tx() as conn:
            # Bulk deletes by age: here a sequential scan can be the right plan.
            await conn.execute(_BULK_ACCESS)
            row = (
                await conn.execute(
                    text(
                        f"""
                        WITH cutoff AS (SELECT {NOW_SQL} - :age AS at,
                                               {NOW_SQL} - :event_age AS events_at),
                        i AS (DELETE FROM lash_pending_inputs
                              WHERE state IN ('cancelled', 'completed')
                                AND terminal_at_ms <= (SELECT at FROM cutoff){scope}
                              RETURNING 1),
                        c AS (DELETE FROM lash_session_commands
                              WHERE state IN ('cancelled', 'completed')
                                AND terminal_at_ms <= (SELECT at FROM cutoff){scope}
                              RETURNING 1),
                        e AS (DELETE FROM lash_events
                              WHERE published
                                AND created_at_ms <= (SELECT events_at FROM cutoff){scope}
                              RETURNING 1)
                        SELECT (SELECT count(*) FROM i) AS i, (SELECT count(*) FROM c) AS c,
                               (SELECT count(*) FROM e) AS e
                        """
                    ),
                    {
                        "age": older_than_ms,
                        "event_age": (
                            older_than_ms if events_older_than_ms is None else events_older_than_ms
                        ),
                        "s": session_id,
                    },
                )
            ).one()
        return VacuumReport(
            removed_input_tombstones=int(row.i),
            removed_command_tombstones=int(row.c),
            removed_events=int(row.e),
        )

    async def sessions_with_orphaned_work(
        self, limit: int = 100, *, among: Collection[str] | None = None
    ) -> list[str]:
        params: dict[str, Any] = {"n": limit}
        only = ""
        if among is not None:
            if not among:
                return []
            only = " AND session_id = ANY(CAST(:among AS text[]))"
            params["among"] = sorted(among)
        async with self._tx(single=True) as conn:
            rows = await conn.execute(
                text(
                    f"""
                    SELECT w.session_id FROM (
                        SELECT DISTINCT session_id FROM lash_pending_inputs
                        WHERE state IN ('deferred_next_turn', 'pending_active', 'accepted'){only}
                        UNION
                        SELECT DISTINCT session_id FROM lash_session_commands
                        WHERE state = 'pending'{only}) w
                    WHERE NOT EXISTS (
                        SELECT 1 FROM lash_leases l WHERE l.session_id = w.session_id
                          AND l.lease_token IS NOT NULL AND l.expires_at_ms > {NOW_SQL})
                    ORDER BY w.session_id LIMIT :n
                    """
                ),
                params,
            )
            return [r.session_id for r in rows]

    # ------------------------------------------------------------------ outbox

    async def unpublished_events(
        self,
        limit: int = 500,
        *,
        shard: int | None = None,
        shard_count: int = 1,
        shards: Collection[int] | None = None,
    ) -> list[DurableEvent]:
        if shards is not None and not shards:
            return []
        rows = await self._unpublished(
            "payload", limit, shard=shard, shard_count=shard_count, shards=shards
        )
        return [event_from_row(r._asdict()) for r in rows]

    async def unpublished_messages(
        self,
        limit: int = 500,
        *,
        shards: Collection[int],
        shard_count: int = 1,
        published: Sequence[EventKey] = (),
    ) -> list[OutboxMessage]:
        if not shards:
            await self.mark_published(published)
            return []
        # The payload as text, spliced into the wire body unparsed (events.wire_body).
        rows = await self._unpublished(
            "type, payload::text AS payload",
            limit,
            shard_count=shard_count,
            shards=shards,
            published=published,
        )
        return [
            OutboxMessage(
                r.session_id,
                r.seq,
                r.type,
                r.created_at_ms,
                wire_body(r.session_id, r.seq, r.revision, r.payload),
            )
            for r in rows
        ]

    async def _unpublished(
        self,
        columns: str,
        limit: int,
        *,
        shard: int | None = None,
        shard_count: int = 1,
        shards: Collection[int] | None = None,
        published: Sequence[EventKey] = (),
    ) -> list[Any]:
        """Unpublished event rows (``session_id, seq, revision, created_at_ms`` and
        ``columns``) of the shards asked for, in ``(session_id, seq)`` order; with
        ``published``, those are marked published by the same statement (whose snapshot
        still shows them unpublished, so they are left out by key)."""
        where = "NOT published"
        params: dict[str, Any] = {"n": limit}
        if shard is not None:
            where += " AND shard % :count = :shard"
            params.update({"count": shard_count, "shard": shard})
        if shards is not None:
            where += " AND shard % :count = ANY(CAST(:shards AS bigint[]))"
            params.update({"count": shard_count, "shards": sorted(shards)})
        mark = ""
        if published:
            mark = f"WITH marked AS ({_MARK_PUBLISHED} RETURNING e.session_id, e.seq) "
            where += " AND (session_id, seq) NOT IN (SELECT session_id, seq FROM marked)"
            params.update(_event_keys(published))
        async with self._tx(single=True) as conn:
            result = await conn.execute(
                text(
                    f"{mark}SELECT session_id, seq, revision, created_at_ms, {columns}"
                    f" FROM lash_events WHERE {where} ORDER BY session_id, seq LIMIT :n"
                ),
                params,
            )
            return result.all()

    async def mark_published(self, events: Sequence[EventKey]) -> None:
        if not events:
            return
        async with self._tx(single=True) as conn:
            await conn.execute(text(_MARK_PUBLISHED), _event_keys(events))

    # ------------------------------------------------------------------ wake-ups

    def notifications(self) -> AsyncIterator[Notification]:
        return notify.listen(libpq_url(self._url))
