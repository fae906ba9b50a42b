"""Engines of the releases before alembic refuse this database.

Why: such an engine, started by mistake on an upgraded database, would run
its own ``create_all`` and column steps against a schema it does not know.
It refuses a ``schema_version`` above its own (3) before any DDL, so this
revision sets 4. No rows change otherwise.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema_version = sa.table("schema_version", sa.column("id", sa.Integer),
                              sa.column("version", sa.Integer))
    op.execute(schema_version.update().where(schema_version.c.id == 1)
               .values(version=4))
