"""Initial lash schema: sessions, nodes, inputs, commands, leases, turn commits, events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _claim_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("claim_id", sa.Text),
        sa.Column("claim_owner_id", sa.Text),
        sa.Column("claim_owner_incarnation_id", sa.Text),
        sa.Column("claim_owner_liveness", JSONB),
        sa.Column("claim_token", sa.Text),
        sa.Column("claim_fencing_token", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column(
            "claim_session_lease_generation", sa.BigInteger, nullable=False, server_default="0"
        ),
    ]


def upgrade() -> None:
    op.execute("CREATE SEQUENCE lash_enqueue_seq")
    op.create_table(
        "lash_sessions",
        sa.Column("session_id", sa.Text, primary_key=True),
        sa.Column("head_revision", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("leaf_node_id", sa.Text),
        sa.Column("config", JSONB),
        sa.Column("checkpoint", JSONB),
        sa.Column("usage", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "lash_nodes",
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("ordinal", sa.BigInteger, nullable=False),
        sa.Column("node", JSONB, nullable=False),
        sa.PrimaryKeyConstraint("session_id", "node_id"),
    )
    op.create_index("ix_lash_nodes_session_ordinal", "lash_nodes", ["session_id", "ordinal"])
    op.create_table(
        "lash_pending_inputs",
        sa.Column("input_id", sa.Text, primary_key=True),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column(
            "enqueue_seq",
            sa.BigInteger,
            nullable=False,
            server_default=sa.text("nextval('lash_enqueue_seq')"),
        ),
        sa.Column("source_key", sa.Text),
        sa.Column("ingress", JSONB, nullable=False),
        sa.Column("submitted_ingress", JSONB, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("input", JSONB, nullable=False),
        sa.Column("enqueued_at_ms", sa.BigInteger, nullable=False),
        sa.Column("terminal_at_ms", sa.BigInteger),
        *_claim_columns(),
        sa.UniqueConstraint("session_id", "source_key", name="uq_lash_pending_inputs_source_key"),
    )
    op.create_index(
        "ix_lash_pending_inputs_state",
        "lash_pending_inputs",
        ["session_id", "state", "enqueue_seq"],
    )
    op.create_index(
        "ix_lash_pending_inputs_seq", "lash_pending_inputs", ["session_id", "enqueue_seq"]
    )
    op.create_index(
        "ix_lash_pending_inputs_open",
        "lash_pending_inputs",
        ["session_id"],
        postgresql_where=sa.text("state IN ('deferred_next_turn', 'pending_active', 'accepted')"),
    )
    op.create_table(
        "lash_session_commands",
        sa.Column("batch_id", sa.Text, primary_key=True),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column(
            "enqueue_seq",
            sa.BigInteger,
            nullable=False,
            server_default=sa.text("nextval('lash_enqueue_seq')"),
        ),
        sa.Column("source_key", sa.Text, nullable=False),
        sa.Column("command", JSONB, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("enqueued_at_ms", sa.BigInteger, nullable=False),
        sa.Column("terminal_at_ms", sa.BigInteger),
        *_claim_columns(),
        sa.UniqueConstraint("session_id", "source_key", name="uq_lash_session_commands_source_key"),
    )
    op.create_index(
        "ix_lash_session_commands_state",
        "lash_session_commands",
        ["session_id", "state", "enqueue_seq"],
    )
    op.create_index(
        "ix_lash_session_commands_open",
        "lash_session_commands",
        ["session_id"],
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_table(
        "lash_leases",
        sa.Column("session_id", sa.Text, primary_key=True),
        sa.Column("owner_id", sa.Text),
        sa.Column("incarnation_id", sa.Text),
        sa.Column("liveness", JSONB),
        sa.Column("lease_token", sa.Text),
        sa.Column("fencing_token", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("claimed_at_ms", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("expires_at_ms", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("running_turn_id", sa.Text),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("cancel_reason", sa.Text),
    )
    op.create_table(
        "lash_turn_commits",
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("turn_id", sa.Text, nullable=False),
        sa.Column("turn_commit_hash", sa.Text, nullable=False),
        sa.Column("result", JSONB, nullable=False),
        sa.Column("committed_at_ms", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("session_id", "turn_id"),
    )
    op.create_table(
        "lash_events",
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("created_at_ms", sa.BigInteger, nullable=False),
        sa.Column("shard", sa.BigInteger, nullable=False),
        sa.Column("published", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("session_id", "seq"),
    )
    op.create_index(
        "ix_lash_events_unpublished",
        "lash_events",
        ["session_id", "seq"],
        postgresql_where=sa.text("NOT published"),
    )


def downgrade() -> None:
    for table in (
        "lash_events",
        "lash_turn_commits",
        "lash_leases",
        "lash_session_commands",
        "lash_pending_inputs",
        "lash_nodes",
        "lash_sessions",
    ):
        op.drop_table(table)
    op.execute("DROP SEQUENCE lash_enqueue_seq")
