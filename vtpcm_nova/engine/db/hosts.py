"""The host registry: enrollment, approval, revocation, policy assignment.

Why hosts build on trust and keys: a host's status change drops or writes
its verdict, and enrollment binds its keys, in the SAME transaction that
first locks the host row, so no reader sees one without the other.
"""

from __future__ import annotations

import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vtpcm_common import exception
from vtpcm_nova.engine import verifier
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.keys import KeyStore, host_keys, key_digest
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.db.records import HostRecord, host_rec
from vtpcm_nova.engine.db.store import utcnow
from vtpcm_nova.engine.db.trust import TrustStore

# the hosts table, for reads in Core (``Store.reading``)
HOSTS = models.Host.__table__


class HostStore(KeyStore, TrustStore):
    """Registered compute hosts and their lifecycle."""

    def enroll_host(self, name: str, *, ak_public: bytes, ak_name: bytes, kem_public: bytes,
                    kem_name: bytes, ek_certificate: bytes | None = None,
                    command_public: bytes | None = None, ek_public: bytes | None = None,
                    approved: bool = False, now: datetime.datetime | None = None,
                    parent_names: tuple[bytes, bytes] | None = None) -> HostRecord:
        """Store a new host; a REVOKED or FORGOTTEN host may be re-enrolled
        (new keys, no history but the keys; the unsigned registration cast
        never calls this for a name on record, only an operator's enroll).
        Its AK (and, with ``ek_public``, an EK proven by credential
        activation, and its certificate) are bound to ``name``
        for good: the same transaction refuses one that was ever enrolled
        under another name. Its command key is refused likewise, but bound
        only once the host is APPROVED (here or by ``approve_host``): the
        key is public, and an unapproved name (a software AK without an EK
        CA) must not block it for the host that owns it. ``parent_names``:
        the AK's and KEM key's storage parents the AK certified, if it did;
        None (a capped engine did not ask) keeps those stored at the host's
        last certified enrollment, the baseline a later one is compared to."""
        now = now or utcnow()
        status = HostStatus.APPROVED if approved else HostStatus.PENDING
        with self.session() as s:
            # of two re-enrollments only one still finds the host REVOKED
            if self._update_host(s, name, models.Host.status.in_(
                    (HostStatus.REVOKED.value, HostStatus.FORGOTTEN.value))):
                row = self._host_row(s, name)
                s.execute(delete(models.VerdictRow).where(models.VerdictRow.host == name))
                s.execute(delete(models.ClockStateRow)
                          .where(models.ClockStateRow.host == name))
            elif s.scalar(select(models.Host.id).where(models.Host.name == name)) is not None:
                raise exception.AlreadyExists(what="host", key=name)
            else:
                row = models.Host(name=name, revision=0)
                s.add(row)
            row.ak_public, row.ak_name = ak_public, ak_name
            row.kem_public, row.kem_name = kem_public, kem_name
            row.ek_certificate, row.status = ek_certificate, status.value
            row.command_public = command_public
            if parent_names is not None:  # else keep those of the last certified one
                row.ak_parent_name, row.kem_parent_name = parent_names
            row.enrolled_at = now
            row.approved_at = now if approved else None
            try:
                s.flush()
            except IntegrityError:
                raise exception.AlreadyExists(what="host", key=name) from None
            keys = host_keys(ak_name, command_public if approved else None,
                             ek_certificate if ek_public else None, ek_public)
            if not approved and command_public:
                self._check_key_free(s, name, "command", key_digest(command_public))
            self._bind_keys(s, name, keys, now)
            return host_rec(row)

    def _host_row(self, s: Session, name: str) -> models.Host:
        row = s.scalar(select(models.Host).where(models.Host.name == name))
        if row is None:
            raise exception.NotFound(what="host", key=name)
        return row

    def approve_host(self, name: str, now: datetime.datetime | None = None) -> HostRecord:
        """PENDING/APPROVED -> APPROVED (never REVOKED or FORGOTTEN: those
        enroll again); forgets the clock baseline (re-approval).

        Without the baseline a quote held back from before could no longer
        be told from a newer one, so attestations in flight are dropped and
        the verdict expires: the next attestation decides."""
        now = now or utcnow()
        with self.session() as s:
            if not self._update_host(s, name, models.Host.status.in_(
                    (HostStatus.PENDING.value, HostStatus.APPROVED.value)),
                    status=HostStatus.APPROVED.value, approved_at=now):
                row = self._host_row(s, name)
                raise exception.InvalidTransition(what="host", key=name, current=row.status,
                                                  target=HostStatus.APPROVED.value)
            row = self._host_row(s, name)
            if row.command_public:  # bound now, for good (see enroll_host)
                self._bind_keys(s, name, [("command", key_digest(row.command_public))], now)
            s.execute(delete(models.ClockStateRow).where(models.ClockStateRow.host == name))
            self._expire_verdicts(s, models.VerdictRow.host == name, "host approved", now)
            return host_rec(self._host_row(s, name))

    def revoke_host(self, name: str, *, now: datetime.datetime | None = None,
                    expires_at: datetime.datetime | None = None) -> HostRecord:
        """-> REVOKED, and its verdict UNTRUSTED in the same transaction: no
        reader ever sees a revoked host with its old TRUSTED verdict."""
        now = now or utcnow()
        with self.session() as s:
            if not self._update_host(s, name,
                                     models.Host.status != HostStatus.FORGOTTEN.value,
                                     status=HostStatus.REVOKED.value):
                raise exception.NotFound(what="host", key=name)
            self._put_verdict(s, name, verifier.TrustStatus.UNTRUSTED, "host revoked", now,
                              expires_at or now)
            return host_rec(self._host_row(s, name))

    def forget_host(self, name: str) -> list[str]:
        """REVOKED -> FORGOTTEN for a host gone for good, in one transaction:
        its verdict, clock state and the vTPCM records located on it go; its
        row stays as a tombstone and the keys bound to its name stay bound,
        so forgetting never undoes the revocation (its TPM enrolls neither by
        its agent's unsigned registration nor under another name). Returns
        the instances whose vTPCM record was dropped."""
        with self.session() as s:
            if not self._update_host(s, name,
                                     models.Host.status == HostStatus.REVOKED.value,
                                     status=HostStatus.FORGOTTEN.value):
                row = self._host_row(s, name)
                raise exception.InvalidTransition(what="host", key=name, current=row.status,
                                                  target=HostStatus.FORGOTTEN.value)
            lost = list(s.scalars(select(models.Vtpcm.instance_uuid)
                                  .where(models.Vtpcm.host == name)
                                  .order_by(models.Vtpcm.instance_uuid)))
            # its abandoned vTPCMs too: a host gone for good answers no destroy
            for table in (models.Vtpcm, models.VerdictRow, models.ClockStateRow,
                          models.AbandonedVtpcm):
                s.execute(delete(table).where(table.host == name))
            return lost

    def get_host(self, name: str) -> HostRecord:
        with self.reading() as c:
            row = c.execute(select(HOSTS).where(HOSTS.c.name == name)).first()
        if row is None:
            raise exception.NotFound(what="host", key=name)
        return host_rec(row)

    def list_hosts(self, status: HostStatus | None = None) -> list[HostRecord]:
        q = select(models.Host).order_by(models.Host.name)
        if status is not None:
            q = q.where(models.Host.status == status.value)
        with self.session() as s:
            return [host_rec(r) for r in s.scalars(q)]

    def trusted_host(self, name: str, now: datetime.datetime) -> HostRecord | None:
        """The host iff it is APPROVED and has a fresh TRUSTED verdict, read
        in ONE query (the migration gate: its KEM key comes with the check)."""
        verdicts = models.VerdictRow.__table__
        q = (select(HOSTS).join(verdicts, verdicts.c.host == HOSTS.c.name)
             .where(HOSTS.c.name == name,
                    HOSTS.c.status == HostStatus.APPROVED.value,
                    verdicts.c.status == verifier.TrustStatus.TRUSTED.value,
                    verdicts.c.expires_at > now))
        with self.reading() as c:
            row = c.execute(q).first()
        return None if row is None else host_rec(row)

    def assign_policy(self, host: str, policy_name: str | None,
                      now: datetime.datetime | None = None) -> HostRecord:
        """Set the host's policy; its verdict expires in the same transaction
        (a verdict holds only for the policy it was decided against)."""
        with self.session() as s:
            if policy_name is not None and s.scalar(
                    select(models.Policy.id).where(models.Policy.name == policy_name)) is None:
                raise exception.NotFound(what="policy", key=policy_name)
            if not self._update_host(s, host, policy_name=policy_name):
                raise exception.NotFound(what="host", key=host)
            self._expire_verdicts(s, models.VerdictRow.host == host,
                                  "policy assignment changed", now or utcnow())
            return host_rec(self._host_row(s, host))
