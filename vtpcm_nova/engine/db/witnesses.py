"""nova-api witnesses: recorded once verified, each used for one move or
one shred.

Why single statements: ``use_witness`` is one conditional UPDATE, so of
two engine workers (or two unshelves) racing for one witness exactly one
gets it. Why bounded: a witness is only worth something while it is
fresh, so older rows are purged at every recording, and one instance
keeps at most ``MAX_PER_INSTANCE`` unused witnesses per action (a flood
from a nova-api key holder replaces, never grows).
"""

from __future__ import annotations

import dataclasses
import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.store import Store

# Rows older than this are dropped whatever their state (a used one is
# kept that long as the audit's companion; the audit log keeps the story)
PURGE_AFTER = datetime.timedelta(days=1)
MAX_PER_INSTANCE = 8


@dataclasses.dataclass(frozen=True)
class WitnessRecord:
    id: str
    instance_uuid: str
    action: str
    host: str | None
    key: str
    requested_at: datetime.datetime
    recorded_at: datetime.datetime
    used_at: datetime.datetime | None
    used_by: str | None
    project_id: str | None = None
    user_id: str | None = None


def _record(row: models.ApiWitness) -> WitnessRecord:
    return WitnessRecord(row.id, row.instance_uuid, row.action, row.host, row.key,
                         row.requested_at, row.recorded_at, row.used_at, row.used_by,
                         row.project_id, row.user_id)


class WitnessStore(Store):
    """nova-api's witnesses of unshelve and delete requests."""

    def record_witness(self, witness_id: str, instance_uuid: str, action: str,
                       host: str | None, key: str, requested_at: datetime.datetime,
                       now: datetime.datetime, project_id: str | None = None,
                       user_id: str | None = None) -> None:
        """Keep a verified witness (asked by ``project_id``/``user_id``);
        drop old ones and, for this instance and action, the unused ones
        beyond ``MAX_PER_INSTANCE`` (oldest first)."""
        with self.session() as s:
            s.execute(delete(models.ApiWitness)
                      .where(models.ApiWitness.recorded_at < now - PURGE_AFTER))
            s.add(models.ApiWitness(id=witness_id, instance_uuid=instance_uuid,
                                    action=action, host=host, key=key,
                                    requested_at=requested_at, recorded_at=now,
                                    project_id=project_id, user_id=user_id))
            s.flush()
            self._trim(s, instance_uuid, action)

    @staticmethod
    def _trim(s: Session, instance_uuid: str, action: str) -> None:
        keep = select(models.ApiWitness.id).where(
            models.ApiWitness.instance_uuid == instance_uuid,
            models.ApiWitness.action == action,
            models.ApiWitness.used_at.is_(None)).order_by(
            models.ApiWitness.requested_at.desc(), models.ApiWitness.id)
        ids = list(s.scalars(keep))
        if len(ids) > MAX_PER_INSTANCE:
            s.execute(delete(models.ApiWitness)
                      .where(models.ApiWitness.id.in_(ids[MAX_PER_INSTANCE:]))
                      .execution_options(synchronize_session=False))

    def use_witness(self, instance_uuid: str, action: str, host: str | None,
                    not_before: datetime.datetime, used_by: str,
                    now: datetime.datetime,
                    projects: frozenset[str] | None = None) -> WitnessRecord | None:
        """Mark used, and return, the newest unused witness of ``action`` of
        this instance requested at or after ``not_before`` whose named host
        (if it named one) is ``host`` and, unless ``projects`` is None, asked
        by one of ``projects``; None if there is none. Each witness is used
        once, across workers (conditional UPDATE)."""
        with self.session() as s:
            rows = s.scalars(select(models.ApiWitness).where(
                models.ApiWitness.instance_uuid == instance_uuid,
                models.ApiWitness.action == action,
                models.ApiWitness.used_at.is_(None),
                models.ApiWitness.requested_at >= not_before).order_by(
                models.ApiWitness.requested_at.desc()))
            for row in list(rows):
                if row.host is not None and row.host != host:
                    continue
                if projects is not None and row.project_id not in projects:
                    continue
                won = s.execute(update(models.ApiWitness).where(
                    models.ApiWitness.id == row.id, models.ApiWitness.used_at.is_(None))
                    .values(used_at=now, used_by=used_by[:64])
                    .execution_options(synchronize_session=False))
                if won.rowcount == 1:  # type: ignore[attr-defined]
                    found = _record(row)
                    return dataclasses.replace(found, used_at=now, used_by=used_by[:64])
            return None

    def clear_witnesses(self, instance_uuid: str, action: str, used_by: str,
                        now: datetime.datetime) -> int:
        """Mark every unused witness of ``action`` of this instance used
        (by ``used_by``): a request the instance's life went past (an
        unshelve that landed on the holder, anything before a new shelve)
        must not allow a later move. Returns how many."""
        with self.session() as s:
            done = s.execute(update(models.ApiWitness).where(
                models.ApiWitness.instance_uuid == instance_uuid,
                models.ApiWitness.action == action,
                models.ApiWitness.used_at.is_(None))
                .values(used_at=now, used_by=used_by[:64])
                .execution_options(synchronize_session=False))
            return int(done.rowcount)  # type: ignore[attr-defined]

    def release_witness(self, witness_id: str) -> None:
        """Unused again: the shred it was used for did not happen."""
        with self.session() as s:
            s.execute(update(models.ApiWitness).where(models.ApiWitness.id == witness_id)
                      .values(used_at=None, used_by=None)
                      .execution_options(synchronize_session=False))

    def list_witnesses(self, instance_uuid: str) -> list[WitnessRecord]:
        with self.session() as s:
            return [_record(r) for r in s.scalars(
                select(models.ApiWitness)
                .where(models.ApiWitness.instance_uuid == instance_uuid)
                .order_by(models.ApiWitness.recorded_at))]
