"""nova-api witnesses of unshelve and delete requests (``api_witnesses``).

Why: Nova's database is not a witness the compute hosts cannot write (any
nova-compute saves Instance objects through nova-conductor), so a
compromised TRUSTED host could pull a shelved vTPCM to itself, or make the
reaper shred one, by forging the instance's record. nova-api signs what it
accepted (``vtpcm_nova/api/witness.py``); the engine keeps each witness
here, for one move or one shred (design.rst, "Shelve offload and
unshelve"), with who asked (project and user: the engine takes an unshelve
witness only from the instance's project or a listed admin project).
Existing rows: none.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_witnesses",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("instance_uuid", sa.String(length=36), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.Column("used_by", sa.String(length=64), nullable=True),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_api_witnesses_recorded_at", "api_witnesses", ["recorded_at"])
    op.create_index("ix_api_witnesses_instance_action", "api_witnesses",
                    ["instance_uuid", "action"])
