"""The append-only audit trail of the engine."""

from __future__ import annotations

import datetime

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.records import AuditRecord
from vtpcm_nova.engine.db.store import Store, utcnow


def add_audit(s: Session, event: str, outcome: str, *, host: str | None = None,
              detail: str = "", now: datetime.datetime | None = None) -> None:
    """An audit entry in the caller's transaction: it stands or falls with
    the change it records (``TrustStore.conclude_attestation``)."""
    s.connection().execute(insert(models.Audit).values(
        at=now or utcnow(), event=event, host=host, outcome=outcome, detail=detail))


class AuditStore(Store):
    """Audit entries: appended, read newest first."""

    def audit(self, event: str, outcome: str, *, host: str | None = None,
              instance: str | None = None, migration_id: str | None = None,
              detail: str = "", now: datetime.datetime | None = None) -> None:
        """Append an audit entry. ``detail`` is a human reason, never key material."""
        with self.session() as s:
            s.add(models.Audit(at=now or utcnow(), event=event, host=host, instance=instance,
                               migration_id=migration_id, outcome=outcome, detail=detail))

    def has_audit(self, instance: str, event: str, outcome: str) -> bool:
        """Whether the instance has an entry of ``event`` with ``outcome``."""
        q = select(models.Audit.id).where(models.Audit.instance == instance,
                                          models.Audit.event == event,
                                          models.Audit.outcome == outcome).limit(1)
        with self.session() as s:
            return s.scalars(q).first() is not None

    def migration_audit_details(self, migration_id: str, event: str,
                                outcome: str) -> list[str]:
        """The details of one migration's entries of ``event`` with
        ``outcome``, newest first (``resolve`` shows a refused commit)."""
        q = select(models.Audit.detail).where(
            models.Audit.migration_id == migration_id, models.Audit.event == event,
            models.Audit.outcome == outcome).order_by(models.Audit.id.desc())
        with self.session() as s:
            return list(s.scalars(q))

    def list_audit(self, limit: int = 100, host: str | None = None) -> list[AuditRecord]:
        """Newest first."""
        q = select(models.Audit).order_by(models.Audit.id.desc()).limit(limit)
        if host is not None:
            q = q.where(models.Audit.host == host)
        with self.session() as s:
            return [AuditRecord(r.id, r.at, r.event, r.host, r.instance, r.migration_id,
                                r.outcome, r.detail) for r in s.scalars(q)]
