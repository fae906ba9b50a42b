"""The migrations the coordinator runs, and their state.

Why state moves only by compare-and-set: the coordinator may run in
several engine processes; the one whose UPDATE matched owns the step.
"""

from __future__ import annotations

import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from vtpcm_common import exception
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.records import MigrationRecord, migration_rec
from vtpcm_nova.engine.db.store import Store, utcnow


class MigrationStore(Store):
    """Migration records of the coordinator."""

    def create_migration(self, migration_id: str, instance_uuid: str, source: str, dest: str,
                         generation: int, state: str, deadline: datetime.datetime,
                         now: datetime.datetime | None = None,
                         prior_state: str | None = None,
                         begun_by: str | None = None) -> MigrationRecord:
        now = now or utcnow()
        with self.session() as s:
            row = models.Migration(migration_id=migration_id, instance_uuid=instance_uuid,
                                   source=source, dest=dest, generation=generation,
                                   state=state, created_at=now, updated_at=now,
                                   deadline=deadline, error=None,
                                   prior_state=prior_state, begun_by=begun_by)
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                raise exception.AlreadyExists(what="migration", key=migration_id) from None
            return migration_rec(row)

    def get_migration(self, migration_id: str) -> MigrationRecord:
        with self.session() as s:
            row = s.scalar(select(models.Migration)
                           .where(models.Migration.migration_id == migration_id))
            if row is None:
                raise exception.NotFound(what="migration", key=migration_id)
            return migration_rec(row)

    def list_migrations(self, *, state: str | None = None, instance_uuid: str | None = None,
                        overdue_at: datetime.datetime | None = None
                        ) -> list[MigrationRecord]:
        q = select(models.Migration).order_by(models.Migration.id)
        if state is not None:
            q = q.where(models.Migration.state == state)
        if instance_uuid is not None:
            q = q.where(models.Migration.instance_uuid == instance_uuid)
        if overdue_at is not None:
            q = q.where(models.Migration.deadline <= overdue_at)
        with self.session() as s:
            return [migration_rec(r) for r in s.scalars(q)]

    def update_migration_state(self, migration_id: str, expected_state: str, new_state: str,
                               *, error: str | None = None,
                               now: datetime.datetime | None = None) -> bool:
        """Compare-and-set of the migration state; False if someone moved it first.

        ``error`` is recorded only if the migration has none yet: the first
        failure reason is the one worth keeping."""
        q = (update(models.Migration)
             .where(models.Migration.migration_id == migration_id,
                    models.Migration.state == expected_state)
             .values(state=new_state, error=func.coalesce(models.Migration.error, error),
                     updated_at=now or utcnow()))
        with self.session() as s:
            return s.execute(q).rowcount == 1  # type: ignore[attr-defined,no-any-return]
