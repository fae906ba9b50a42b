"""The engine worker that ran a migration's ``begin``.

Why: a ``begin`` whose worker died (between the seal and the prepare)
left the migration SEALING or PREPARING until its deadline (3 h), with the
destination's swtpm, state and key in place and every new migration of the
VM refused. Reconcile now aborts such a begin at once when its worker is
gone (the same ``[engine] host`` restarted, so a new run id) and otherwise
once it has sat in one step longer than that step can take (design.rst,
"Convergence"). Existing rows: no recorded worker (the time bound applies).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("migrations") as batch:
        batch.add_column(sa.Column("begun_by", sa.String(length=255), nullable=True))
