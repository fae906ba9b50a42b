"""Where each instance's vTPCM lives (host, generation) and its state.

Why every change is one conditional UPDATE: its rowcount decides a race
between engine processes (location/generation compare-and-set).
"""

from __future__ import annotations

import datetime
import types
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from vtpcm_common import exception
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.records import (
    AbandonedRecord,
    VtpcmRecord,
    abandoned_rec,
    vtpcm_rec,
)
from vtpcm_nova.engine.db.store import Store, utcnow


class VtpcmStore(Store):
    """The authoritative vTPCM association of instances."""

    def create_vtpcm(self, instance_uuid: str, vtpcm_id: str, host: str, *,
                     generation: int = 0, state: str = "ACTIVE",
                     now: datetime.datetime | None = None,
                     owner_project: str | None = None) -> VtpcmRecord:
        with self.session() as s:
            row = models.Vtpcm(instance_uuid=instance_uuid, vtpcm_id=vtpcm_id, host=host,
                               generation=generation, state=state, migration_id=None,
                               updated_at=now or utcnow(), owner_project=owner_project)
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                raise exception.AlreadyExists(what="vTPCM of instance",
                                              key=instance_uuid) from None
            return vtpcm_rec(row)

    def get_vtpcm(self, instance_uuid: str) -> VtpcmRecord:
        with self.session() as s:
            row = s.scalar(select(models.Vtpcm)
                           .where(models.Vtpcm.instance_uuid == instance_uuid))
            if row is None:
                raise exception.NotFound(what="vTPCM of instance", key=instance_uuid)
            return vtpcm_rec(row)

    def list_vtpcms(self, host: str | None = None) -> list[VtpcmRecord]:
        q = select(models.Vtpcm).order_by(models.Vtpcm.instance_uuid)
        if host is not None:
            q = q.where(models.Vtpcm.host == host)
        with self.session() as s:
            return [vtpcm_rec(r) for r in s.scalars(q)]

    def update_vtpcm_location(self, instance_uuid: str, expected_host: str,
                              expected_generation: int, new_host: str, new_generation: int,
                              *, state: str | None = None, migration_id: str | None = None,
                              now: datetime.datetime | None = None) -> bool:
        """Move the authoritative location iff (host, generation) are still as expected."""
        if new_generation < expected_generation:
            raise exception.GenerationMismatch(instance_uuid=instance_uuid,
                                               given=new_generation,
                                               expected=expected_generation)
        values: dict[str, Any] = {"host": new_host, "generation": new_generation,
                                  "migration_id": migration_id, "updated_at": now or utcnow()}
        if state is not None:
            values["state"] = state
        q = (update(models.Vtpcm)
             .where(models.Vtpcm.instance_uuid == instance_uuid,
                    models.Vtpcm.host == expected_host,
                    models.Vtpcm.generation == expected_generation)
             .values(**values))
        with self.session() as s:
            return s.execute(q).rowcount == 1  # type: ignore[attr-defined,no-any-return]

    def set_vtpcm_state(self, instance_uuid: str, expected_generation: int, state: str, *,
                        expected_state: str | None = None, migration_id: str | None = None,
                        expected_migration_id: str | None | types.EllipsisType = ...,
                        now: datetime.datetime | None = None) -> bool:
        """Change the state iff the generation (and optionally state and the
        migration holding the record) still match."""
        conds = [models.Vtpcm.instance_uuid == instance_uuid,
                 models.Vtpcm.generation == expected_generation]
        if expected_state is not None:
            conds.append(models.Vtpcm.state == expected_state)
        if expected_migration_id is not ...:
            conds.append(models.Vtpcm.migration_id.is_(None) if expected_migration_id is None
                         else models.Vtpcm.migration_id == expected_migration_id)
        q = (update(models.Vtpcm).where(*conds)
             .values(state=state, migration_id=migration_id, updated_at=now or utcnow()))
        with self.session() as s:
            return s.execute(q).rowcount == 1  # type: ignore[attr-defined,no-any-return]

    def complete_vtpcm(self, instance_uuid: str, token: str, vtpcm_id: str, generation: int,
                       state: str, now: datetime.datetime | None = None) -> bool:
        """Fill in THIS CREATING reservation (``token``) with what the agent made."""
        q = (update(models.Vtpcm)
             .where(models.Vtpcm.instance_uuid == instance_uuid,
                    models.Vtpcm.state == "CREATING", models.Vtpcm.vtpcm_id == token)
             .values(vtpcm_id=vtpcm_id, generation=generation, state=state,
                     updated_at=now or utcnow()))
        with self.session() as s:
            return s.execute(q).rowcount == 1  # type: ignore[attr-defined,no-any-return]

    def set_vtpcm_id(self, instance_uuid: str, host: str, generation: int,
                     vtpcm_id: str) -> bool:
        """Record the agent's id of the vTPCM at (host, generation)."""
        q = (update(models.Vtpcm)
             .where(models.Vtpcm.instance_uuid == instance_uuid, models.Vtpcm.host == host,
                    models.Vtpcm.generation == generation)
             .values(vtpcm_id=vtpcm_id))
        with self.session() as s:
            return s.execute(q).rowcount == 1  # type: ignore[attr-defined,no-any-return]

    def delete_vtpcm(self, instance_uuid: str, expected_generation: int, *,
                     expected_state: str | None = None,
                     expected_vtpcm_id: str | None = None) -> bool:
        q = delete(models.Vtpcm).where(models.Vtpcm.instance_uuid == instance_uuid,
                                       models.Vtpcm.generation == expected_generation)
        if expected_state is not None:
            q = q.where(models.Vtpcm.state == expected_state)
        if expected_vtpcm_id is not None:
            q = q.where(models.Vtpcm.vtpcm_id == expected_vtpcm_id)
        with self.session() as s:
            return s.execute(q).rowcount == 1  # type: ignore[attr-defined,no-any-return]

    # --- evacuation with a fresh vTPCM ------------------------------------------

    def abandon_vtpcm(self, old: VtpcmRecord, host: str, token: str,
                      now: datetime.datetime | None = None) -> bool:
        """In one transaction: the record ``old`` (unchanged since read, no
        migration) becomes ``host``'s CREATING reservation ``token``, and
        ``old`` is kept as abandoned (to be destroyed on its host). False,
        changing nothing, if the record moved meanwhile."""
        now = now or utcnow()
        q = (update(models.Vtpcm)
             .where(models.Vtpcm.instance_uuid == old.instance_uuid,
                    models.Vtpcm.host == old.host,
                    models.Vtpcm.generation == old.generation,
                    models.Vtpcm.state == old.state,
                    models.Vtpcm.vtpcm_id == old.vtpcm_id,
                    models.Vtpcm.migration_id.is_(None))
             .values(host=host, vtpcm_id=token, generation=0, state="CREATING",
                     updated_at=now))
        with self.session() as s:
            if s.execute(q).rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.add(models.AbandonedVtpcm(instance_uuid=old.instance_uuid,
                                        vtpcm_id=old.vtpcm_id, host=old.host,
                                        generation=old.generation, abandoned_at=now))
            return True

    def unabandon_vtpcm(self, old: VtpcmRecord, token: str) -> bool:
        """Undo ``abandon_vtpcm`` after a refused create (one transaction):
        the reservation ``token`` becomes ``old`` again."""
        q = (update(models.Vtpcm)
             .where(models.Vtpcm.instance_uuid == old.instance_uuid,
                    models.Vtpcm.state == "CREATING", models.Vtpcm.vtpcm_id == token)
             .values(host=old.host, vtpcm_id=old.vtpcm_id, generation=old.generation,
                     state=old.state, migration_id=None, updated_at=old.updated_at))
        with self.session() as s:
            if s.execute(q).rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.execute(delete(models.AbandonedVtpcm).where(
                models.AbandonedVtpcm.instance_uuid == old.instance_uuid,
                models.AbandonedVtpcm.vtpcm_id == old.vtpcm_id,
                models.AbandonedVtpcm.host == old.host))
            return True

    def list_abandoned(self, instance_uuid: str | None = None) -> list[AbandonedRecord]:
        q = select(models.AbandonedVtpcm).order_by(models.AbandonedVtpcm.id)
        if instance_uuid is not None:
            q = q.where(models.AbandonedVtpcm.instance_uuid == instance_uuid)
        with self.session() as s:
            return [abandoned_rec(r) for r in s.scalars(q)]

    def forget_abandoned(self, rec: AbandonedRecord) -> bool:
        """Drop an abandoned vTPCM its host destroyed (or never had)."""
        q = delete(models.AbandonedVtpcm).where(
            models.AbandonedVtpcm.instance_uuid == rec.instance_uuid,
            models.AbandonedVtpcm.vtpcm_id == rec.vtpcm_id,
            models.AbandonedVtpcm.host == rec.host)
        with self.session() as s:
            return s.execute(q).rowcount >= 1  # type: ignore[attr-defined,no-any-return]
