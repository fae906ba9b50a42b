"""The project owning each vTPCM's instance, recorded at create
(``vtpcms.owner_project``).

Why: the engine took an unshelve witness from the project Nova shows owning
the server, but a compromised compute host can rewrite the instance's
``project_id`` (Instance.save through nova-conductor) to a project whose
credentials it holds, and get a genuine witness from there. The owner Nova
showed when the vTPCM was created is the engine's own record, which no
compute host writes (design.rst, "Shelve offload and unshelve").
Existing rows: NULL (owner not known; the engine falls back to Nova's current
view for them).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vtpcms") as batch:
        batch.add_column(sa.Column("owner_project", sa.String(length=64), nullable=True))
