"""An index on audit (instance, event).

Why: ``create_vtpcm`` looks for the reaper's tombstone (a ``vtpcm.reap``
entry of the instance) on every create; without an index that lookup read
the whole append-only audit table, which only grows. Existing rows: kept.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audit_instance_event", "audit", ["instance", "event"])
