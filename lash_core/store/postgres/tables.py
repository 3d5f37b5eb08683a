"""SQLAlchemy Core definitions of the lash tables (the shape migration ``0001`` creates).

The store issues hand-written SQL for the hot paths (CTEs, ``RETURNING``, locking clauses);
these objects name the tables in one place and give Alembic a metadata to compare against.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    Sequence,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

#: One ordering shared by pending inputs and queued commands (store semantics note 4).
enqueue_seq = Sequence("lash_enqueue_seq", metadata=metadata)


def _claim_columns() -> list[Column[object]]:
    return [
        Column("claim_id", Text),
        Column("claim_owner_id", Text),
        Column("claim_owner_incarnation_id", Text),
        Column("claim_owner_liveness", JSONB),
        Column("claim_token", Text),
        Column("claim_fencing_token", BigInteger, nullable=False, server_default=text("0")),
        Column(
            "claim_session_lease_generation", BigInteger, nullable=False, server_default=text("0")
        ),
    ]


sessions = Table(
    "lash_sessions",
    metadata,
    Column("session_id", Text, primary_key=True),
    Column("head_revision", BigInteger, nullable=False, server_default=text("0")),
    Column("last_seq", BigInteger, nullable=False, server_default=text("0")),
    Column("leaf_node_id", Text),
    Column("config", JSONB),
    Column("checkpoint", JSONB),
    Column("usage", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

nodes = Table(
    "lash_nodes",
    metadata,
    Column("session_id", Text, nullable=False),
    Column("node_id", Text, nullable=False),
    Column("ordinal", BigInteger, nullable=False),
    Column("node", JSONB, nullable=False),
    PrimaryKeyConstraint("session_id", "node_id"),
    Index("ix_lash_nodes_session_ordinal", "session_id", "ordinal"),
)

pending_inputs = Table(
    "lash_pending_inputs",
    metadata,
    Column("input_id", Text, primary_key=True),
    Column("session_id", Text, nullable=False),
    Column(
        "enqueue_seq",
        BigInteger,
        nullable=False,
        server_default=text("nextval('lash_enqueue_seq')"),
    ),
    Column("source_key", Text),
    Column("ingress", JSONB, nullable=False),
    Column("submitted_ingress", JSONB, nullable=False),
    Column("state", Text, nullable=False),
    Column("input", JSONB, nullable=False),
    Column("enqueued_at_ms", BigInteger, nullable=False),
    Column("terminal_at_ms", BigInteger),
    *_claim_columns(),
    UniqueConstraint("session_id", "source_key", name="uq_lash_pending_inputs_source_key"),
    Index("ix_lash_pending_inputs_state", "session_id", "state", "enqueue_seq"),
    Index("ix_lash_pending_inputs_seq", "session_id", "enqueue_seq"),
    # The recovery sweep scans only open rows.
    Index(
        "ix_lash_pending_inputs_open",
        "session_id",
        postgresql_where=text("state IN ('deferred_next_turn', 'pending_active', 'accepted')"),
    ),
)

session_commands = Table(
    "lash_session_commands",
    metadata,
    Column("batch_id", Text, primary_key=True),
    Column("session_id", Text, nullable=False),
    Column(
        "enqueue_seq",
        BigInteger,
        nullable=False,
        server_default=text("nextval('lash_enqueue_seq')"),
    ),
    Column("source_key", Text, nullable=False),
    Column("command", JSONB, nullable=False),
    Column("state", Text, nullable=False),
    Column("enqueued_at_ms", BigInteger, nullable=False),
    Column("terminal_at_ms", BigInteger),
    *_claim_columns(),
    UniqueConstraint("session_id", "source_key", name="uq_lash_session_commands_source_key"),
    Index("ix_lash_session_commands_state", "session_id", "state", "enqueue_seq"),
    Index(
        "ix_lash_session_commands_open", "session_id", postgresql_where=text("state = 'pending'")
    ),
)

leases = Table(
    "lash_leases",
    metadata,
    Column("session_id", Text, primary_key=True),
    Column("owner_id", Text),
    Column("incarnation_id", Text),
    Column("liveness", JSONB),
    Column("lease_token", Text),
    Column("fencing_token", BigInteger, nullable=False, server_default=text("0")),
    Column("claimed_at_ms", BigInteger, nullable=False, server_default=text("0")),
    Column("expires_at_ms", BigInteger, nullable=False, server_default=text("0")),
    Column("running_turn_id", Text),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    Column("cancel_reason", Text),
)

turn_commits = Table(
    "lash_turn_commits",
    metadata,
    Column("session_id", Text, nullable=False),
    Column("turn_id", Text, nullable=False),
    Column("turn_commit_hash", Text, nullable=False),
    Column("result", JSONB, nullable=False),
    Column("committed_at_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("session_id", "turn_id"),
)

events = Table(
    "lash_events",
    metadata,
    Column("session_id", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("type", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("shard", BigInteger, nullable=False),
    Column("published", Boolean, nullable=False, server_default=text("false")),
    PrimaryKeyConstraint("session_id", "seq"),
    Index(
        "ix_lash_events_unpublished",
        "session_id",
        "seq",
        postgresql_where=text("NOT published"),
    ),
)

ALL_TABLES = (sessions, nodes, pending_inputs, session_commands, leases, turn_commits, events)
