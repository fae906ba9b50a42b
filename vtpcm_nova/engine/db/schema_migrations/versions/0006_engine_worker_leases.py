"""Leases of engine runs (``engine_workers``).

Why: reconcile judged a begin abandoned by its worker's name (same
``[engine] host``, another run id), so two live workers sharing a host
name aborted each other's begins, and by a step bound comparing two
workers' clocks. Now each engine run holds a lease, renewed with the
database's clock; a begin is abandoned once the run that recorded it
holds no live lease (design.rst, "A begin that never returned").
Existing rows: none (every engine stops for the upgrade, so a begin
recorded before it has no live lease and is aborted at the first
reconcile, as a begin of a restarted worker was).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engine_workers",
        sa.Column("worker_id", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("renewed_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id"),
    )
    op.create_index("ix_engine_workers_expires_at", "engine_workers", ["expires_at"])
