"""Abandoned vTPCMs of evacuations, and a migration's prior record state.

Why: an evacuation with a fresh vTPCM used to delete the old record, so
nothing ever shredded the copy a partitioned (not dead) host kept; the
``abandoned_vtpcms`` rows let reconcile destroy it once that agent
answers. ``migrations.prior_state`` keeps the vTPCM record's state before
the migration claimed it (SHELVED for an unshelve), so an abort restores
that state instead of ACTIVE. Existing rows: no abandoned vTPCMs, and
migrations without a prior state (their abort restores ACTIVE, as before).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "abandoned_vtpcms",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("instance_uuid", sa.String(length=36), nullable=False),
        sa.Column("vtpcm_id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("abandoned_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_abandoned_vtpcms_instance_uuid", "abandoned_vtpcms",
                    ["instance_uuid"])
    with op.batch_alter_table("migrations") as batch:
        batch.add_column(sa.Column("prior_state", sa.String(length=32), nullable=True))
