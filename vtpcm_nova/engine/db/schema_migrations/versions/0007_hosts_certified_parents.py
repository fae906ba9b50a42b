"""The storage parents' names the AK certified at a host's enrollment.

Why (issue 9): the agent salts its TPM sessions to storage primaries whose
names it pinned at its first start; since agent API 1.10 the AK certifies
their creation at enrollment and the engine checks them
(``parentcert``). The names are kept with the host: a re-enrollment whose
certified names differ is named in its audit entry (``Attestor``: the
hierarchy's seed changed), and an operator can compare them with the
agent's ``hostkeys.tpm``. Existing rows: none certified (NULL), as a host
enrolled without the certifications (an engine capped below agent API 1.10).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("ak_parent_name", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("kem_parent_name", sa.LargeBinary(), nullable=True))
