"""The v3 schema: what the last release before alembic created.

Why the first revision is that schema and not an empty one: databases of
that release are stamped here by ``legacy`` (after their own v1/v2 steps),
so from here on every database takes the same revisions. Frozen: it must
not follow the models (dates are naive UTC ``DateTime``, as
``models.UTCDateTime`` stores them).

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("instance", sa.String(length=36), nullable=True),
        sa.Column("migration_id", sa.String(length=36), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    op.create_index("ix_audit_host", "audit", ["host"])

    op.create_table(
        "command_nonces",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("keep_until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("nonce")
    )
    op.create_index("ix_command_nonces_keep_until", "command_nonces", ["keep_until"])

    op.create_table(
        "enrolled_keys",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "digest")
    )
    op.create_index("ix_enrolled_keys_host", "enrolled_keys", ["host"])

    op.create_table(
        "migrations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("migration_id", sa.String(length=36), nullable=False),
        sa.Column("instance_uuid", sa.String(length=36), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.Column("dest", sa.String(length=255), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("deadline", sa.DateTime(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("migration_id")
    )
    op.create_index("ix_migrations_instance_uuid", "migrations", ["instance_uuid"])
    op.create_index("ix_migrations_state", "migrations", ["state"])

    op.create_table(
        "nonces",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("nonce")
    )
    op.create_index("ix_nonces_expires_at", "nonces", ["expires_at"])
    op.create_index("ix_nonces_host", "nonces", ["host"])

    op.create_table(
        "policies",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("bank", sa.String(length=16), nullable=False),
        sa.Column("pcrs", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revision", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name")
    )
    op.create_table(
        "schema_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_table(
        "vtpcms",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("instance_uuid", sa.String(length=36), nullable=False),
        sa.Column("vtpcm_id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("migration_id", sa.String(length=36), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("instance_uuid")
    )
    op.create_index("ix_vtpcms_host", "vtpcms", ["host"])

    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("ak_public", sa.LargeBinary(), nullable=False),
        sa.Column("ak_name", sa.LargeBinary(), nullable=False),
        sa.Column("kem_public", sa.LargeBinary(), nullable=False),
        sa.Column("kem_name", sa.LargeBinary(), nullable=False),
        sa.Column("ek_certificate", sa.LargeBinary(), nullable=True),
        sa.Column("command_public", sa.LargeBinary(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("policy_name", sa.String(length=255), nullable=True),
        sa.Column("enrolled_at", sa.DateTime(), nullable=False),
        sa.Column("approved_at", sa.DateTime(), nullable=True),
        sa.Column("revision", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.ForeignKeyConstraint(["policy_name"], ["policies.name"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name")
    )
    op.create_table(
        "clock_states",
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("clock", sa.BigInteger(), nullable=False),
        sa.Column("reset_count", sa.BigInteger(), nullable=False),
        sa.Column("restart_count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("host")
    )
    op.create_table(
        "verdicts",
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("attested_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("host")
    )
    op.create_index("ix_verdicts_expires_at", "verdicts", ["expires_at"])
    # engines of the releases before alembic read this row; 0002 raises it
    op.bulk_insert(sa.table("schema_version", sa.column("id", sa.Integer),
                            sa.column("version", sa.Integer)),
                   [{"id": 1, "version": 3}])
