"""The migrations the coordinator runs, and their state.

Why state moves only by compare-and-set: the coordinator may run in
several engine processes; the one whose UPDATE matched owns the step.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from vtpcm_common import exception
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.records import (
    MigrationRecord,
    VtpcmRecord,
    migration_rec,
    vtpcm_rec,
)
from vtpcm_nova.engine.db.store import Store, utcnow

# the migration states nothing follows (protocol.TERMINAL, by value)
FINAL_STATES = ("REFUSED", "COMMITTED", "ABORTED")


@dataclasses.dataclass(frozen=True)
class VtpcmClaim:
    """``begin``'s claim of the vTPCM record, made with the migration record.

    The record moves from ``expected_state`` (at the migration's generation,
    held by no migration) to ``claimed_state`` held by the migration; if it
    no longer matches (another migration won), the migration is recorded in
    ``refused_state`` instead."""

    expected_state: str
    refused_state: str
    refused_audits: tuple[AuditEntry, ...] = ()
    claimed_state: str = "MIGRATING"


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    """An audit entry written in the transaction of the change it records."""

    event: str
    outcome: str
    host: str | None = None
    instance: str | None = None
    migration_id: str | None = None
    detail: str = ""

    def row(self, now: datetime.datetime) -> models.Audit:
        return models.Audit(at=now, event=self.event, host=self.host, instance=self.instance,
                            migration_id=self.migration_id, outcome=self.outcome,
                            detail=self.detail)


@dataclasses.dataclass
class CommitPoint:
    """The authority's move made in the transaction that enters COMMITTING:
    the vTPCM record from (``source``, ``generation``) to (``dest``,
    ``generation`` + 1), ACTIVE, no migration. ``moved`` tells the caller
    whether it matched (else the record was elsewhere, and the
    ``MoveAuthority`` step decides as before)."""

    instance_uuid: str
    source: str
    dest: str
    generation: int
    moved: bool = False


@dataclasses.dataclass(frozen=True)
class BeginView:
    """What ``begin`` reads before it decides, in one transaction: the
    migration of its id (None: new), the instance's other migrations not
    yet ended (id, state, source), and its vTPCM record (None: none)."""

    migration: MigrationRecord | None
    unfinished: tuple[tuple[str, str, str], ...]
    vtpcm: VtpcmRecord | None


class MigrationStore(Store):
    """Migration records of the coordinator."""

    def create_migration(self, migration_id: str, instance_uuid: str, source: str, dest: str,
                         generation: int, state: str, deadline: datetime.datetime,
                         now: datetime.datetime | None = None,
                         prior_state: str | None = None,
                         begun_by: str | None = None,
                         claim: VtpcmClaim | None = None,
                         audits: Sequence[AuditEntry] = (),
                         error: str | None = None) -> MigrationRecord:
        """Record a new migration; with ``claim``, claim its vTPCM in the
        same transaction. Two transactions left a window: an engine killed
        between them left the vTPCM held by a migration that did not exist,
        which no abort, reconcile or deadline ever released (every later
        begin refused, found by tests/functional/engine/test_load.py). The
        returned record's state says whether the claim was won (``state``,
        ``audits`` written) or lost (``claim.refused_state``,
        ``claim.refused_audits`` written), in the same transaction too: an
        engine killed after it left no migration without its audit."""
        now = now or utcnow()
        with self.session() as s:
            if claim is not None:
                q = (update(models.Vtpcm)
                     .where(models.Vtpcm.instance_uuid == instance_uuid,
                            models.Vtpcm.generation == generation,
                            models.Vtpcm.state == claim.expected_state,
                            models.Vtpcm.migration_id.is_(None))
                     .values(state=claim.claimed_state, migration_id=migration_id,
                             updated_at=now))
                if s.execute(q).rowcount != 1:  # type: ignore[attr-defined]
                    state, audits = claim.refused_state, claim.refused_audits
            row = models.Migration(migration_id=migration_id, instance_uuid=instance_uuid,
                                   source=source, dest=dest, generation=generation,
                                   state=state, created_at=now, updated_at=now,
                                   deadline=deadline, error=error,
                                   prior_state=prior_state, begun_by=begun_by)
            s.add(row)
            s.add_all([entry.row(now) for entry in audits])
            try:
                s.flush()
            except IntegrityError:
                raise exception.AlreadyExists(what="migration", key=migration_id) from None
            return migration_rec(row)

    def begin_view(self, migration_id: str, instance_uuid: str) -> BeginView:
        """In Core (``Store.reading``); not a snapshot: the claim re-checks."""
        migrations, vtpcms = models.Migration.__table__, models.Vtpcm.__table__
        with self.reading() as c:
            row = c.execute(select(migrations)
                            .where(migrations.c.migration_id == migration_id)).first()
            unfinished = tuple((mid, state, src) for mid, state, src in c.execute(
                select(migrations.c.migration_id, migrations.c.state, migrations.c.source)
                .where(migrations.c.instance_uuid == instance_uuid,
                       migrations.c.migration_id != migration_id,
                       migrations.c.state.not_in(FINAL_STATES))
                .order_by(migrations.c.id)))
            vtpcm = c.execute(select(vtpcms)
                              .where(vtpcms.c.instance_uuid == instance_uuid)).first()
        return BeginView(None if row is None else migration_rec(row), unfinished,
                         None if vtpcm is None else vtpcm_rec(vtpcm))

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
                               now: datetime.datetime | None = None,
                               audits: Sequence[AuditEntry] = (),
                               commit_point: CommitPoint | None = None) -> bool:
        """Compare-and-set of the migration state; False if someone moved it first.

        ``error`` is recorded only if the migration has none yet: the first
        failure reason is the one worth keeping. ``audits`` are written iff
        the state moved, in the same transaction: written apart, an engine
        killed between the two lost the entry (a commit point passed with
        none in the audit, found by tests/functional/engine/test_load.py),
        since the steps reconcile finishes carry no audit of their own.
        ``commit_point``: the authority's move, made in the same
        transaction iff the state moved (``CommitPoint.moved`` says whether
        the record matched)."""
        now = now or utcnow()
        q = (update(models.Migration)
             .where(models.Migration.migration_id == migration_id,
                    models.Migration.state == expected_state)
             .values(state=new_state, error=func.coalesce(models.Migration.error, error),
                     updated_at=now))
        with self.session() as s:
            if s.execute(q).rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.add_all([entry.row(now) for entry in audits])
            if commit_point is not None:
                cp = commit_point
                move = (update(models.Vtpcm)
                        .where(models.Vtpcm.instance_uuid == cp.instance_uuid,
                               models.Vtpcm.host == cp.source,
                               models.Vtpcm.generation == cp.generation)
                        .values(host=cp.dest, generation=cp.generation + 1, state="ACTIVE",
                                migration_id=None, updated_at=now))
                cp.moved = s.execute(move).rowcount == 1  # type: ignore[attr-defined]
            return True
