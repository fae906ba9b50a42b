"""Typed access to the engine database.

Why a thin function layer: callers (attestation, migration coordinator,
scheduler filter) get frozen records, never ORM objects bound to a session,
and every check-then-change that guards a security property (single-use
nonce, vTPCM location/generation, migration state) is ONE conditional UPDATE
whose rowcount decides, so it stays correct with several engine processes on
one database. Where a change needs several statements (a verdict and the
host it speaks for), the transaction starts with a conditional UPDATE of the
host row: it takes the row lock on PostgreSQL/MySQL and, as the first write,
the database write lock on SQLite (whose driver starts a transaction only
at the first write), so every later read in it is current.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import secrets  # noqa: F401 - tests patch api.secrets.token_bytes
from collections.abc import Mapping
from typing import Any

from oslo_log import log as logging
from sqlalchemy import (
    Column,
    create_engine,
    delete,
    event,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateColumn

from vtpcm_common import exception
from vtpcm_nova.engine import verifier
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.audit import AuditStore
from vtpcm_nova.engine.db.migrations import MigrationStore
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.db.nonces import NONCE_BYTES, NonceStore
from vtpcm_nova.engine.db.records import (
    AuditRecord,
    HostRecord,
    MigrationRecord,
    PolicyRecord,
    TrustBasis,
    VerdictRecord,
    VtpcmRecord,
    host_rec,
    policy_rec,
    verdict_rec,
)
from vtpcm_nova.engine.db.store import utcnow
from vtpcm_nova.engine.db.vtpcms import VtpcmStore

__all__ = ["ADDED_COLUMNS", "DEFAULT_URL", "KEY_KINDS", "NONCE_BYTES", "AuditRecord",
           "Database", "HostRecord", "MigrationRecord", "PolicyRecord", "TrustBasis",
           "VerdictRecord", "VtpcmRecord", "utcnow"]

LOG = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:////var/lib/vtpcm/engine.sqlite"
# kinds of enrolled keys (table enrolled_keys) and how refusals name them
KEY_KINDS = {"ak": "AK", "command": "host command key", "ek-cert": "EK certificate",
             "ek": "EK"}
# columns added to tables of older schemas, which create_all cannot add
ADDED_COLUMNS = (("hosts", "command_public"),  # v2
                 ("hosts", "revision"),  # v3
                 ("policies", "revision"))  # v3


def _effective_verdict(r: models.VerdictRow, host_status: str) -> VerdictRecord:
    """A verdict as read together with its host: only an APPROVED host is
    TRUSTED, whatever the row says."""
    rec = verdict_rec(r)
    if rec.trusted and host_status != HostStatus.APPROVED.value:
        return dataclasses.replace(rec, status=verifier.TrustStatus.UNTRUSTED,
                                   reason=f"host is {host_status}")
    return rec


def _key_digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def _host_keys(ak_name: bytes, command_public: bytes | None, ek_certificate: bytes | None,
               ek_public: bytes | None) -> list[tuple[str, str]]:
    """(kind, digest) of each key a host enrolls with."""
    keys = {"ak": ak_name, "command": command_public, "ek-cert": ek_certificate,
            "ek": ek_public}
    return [(kind, _key_digest(key)) for kind, key in keys.items() if key]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
    finally:
        cur.close()


class Database(VtpcmStore, MigrationStore, NonceStore, AuditStore):
    """One engine database; safe to have several (processes or objects) on one URL."""

    def __init__(self, url: str = DEFAULT_URL, *, create: bool = True) -> None:
        parsed: URL = make_url(url)
        kwargs: dict[str, Any] = {"future": True}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(parsed.database)) or ".",
                            mode=0o700, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(parsed, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._backend = parsed.get_backend_name()
        if create:
            self.create_schema()

    def __repr__(self) -> str:
        # never show credentials from the URL
        return f"<Database {self._backend}>"

    def dispose(self) -> None:
        self.engine.dispose()

    def create_schema(self) -> None:
        """Create missing tables and record the schema version (refuse a newer DB
        before changing anything in it)."""
        if inspect(self.engine).has_table("schema_version"):
            with self.session() as s:
                found = s.get(models.SchemaVersion, 1)
                if found is not None and found.version > models.SCHEMA_VERSION:
                    raise exception.InvalidInput(
                        reason=f"database schema version {found.version} is newer than "
                               f"this engine's {models.SCHEMA_VERSION}")
        models.Base.metadata.create_all(self.engine)
        self._add_missing_columns()
        with self.session() as s:
            row = s.get(models.SchemaVersion, 1)
            if row is None:
                s.add(models.SchemaVersion(id=1, version=models.SCHEMA_VERSION))
                try:
                    s.flush()
                except IntegrityError:
                    s.rollback()  # another process created it first
                    row = s.get(models.SchemaVersion, 1)
            if row is not None and row.version > models.SCHEMA_VERSION:
                raise exception.InvalidInput(
                    reason=f"database schema version {row.version} is newer than this "
                           f"engine's {models.SCHEMA_VERSION}")
            if row is not None and row.version < models.SCHEMA_VERSION:
                # upgrades add tables (create_all made them), columns
                # (_add_missing_columns) and, for v3, fill enrolled_keys
                if row.version < 3:
                    self._record_enrolled_keys()
                LOG.info("Engine database schema upgraded from version %d to %d",
                         row.version, models.SCHEMA_VERSION)
                row.version = models.SCHEMA_VERSION

    def _add_missing_columns(self) -> None:
        """Upgrade step create_all cannot do: new columns of old tables
        (``ADDED_COLUMNS``; each nullable or with a server default)."""
        for table, name in ADDED_COLUMNS:
            self._add_column(models.Base.metadata.tables[table].c[name])

    def _add_column(self, column: Column[Any]) -> None:
        table = column.table.name
        if column.name in self._columns(table):
            return
        ddl = "ALTER TABLE %s ADD COLUMN %s" % (
            table, CreateColumn(column).compile(dialect=self.engine.dialect))
        try:
            with self.engine.begin() as conn:
                conn.execute(text(ddl))
        except DBAPIError:
            # another engine process added it first
            if column.name not in self._columns(table):
                raise

    def _columns(self, table: str) -> set[str]:
        return {c["name"] for c in inspect(self.engine).get_columns(table)}

    def _record_enrolled_keys(self) -> None:
        """v2 -> v3: bind the keys of the hosts there are to their names.
        Where old rules let two names share a key, a host in service wins
        over a REVOKED one, then the first enrolled. EK certificates are
        not bound: v2 never proved them (no credential activation), and
        binding one would let that name squat the TPM's enrollment."""
        revoked = models.Host.status == HostStatus.REVOKED.value
        with self.session() as s:
            hosts = [(h.name, _host_keys(h.ak_name, h.command_public, None, None),
                      h.enrolled_at)
                     for h in s.scalars(select(models.Host)
                                        .order_by(revoked, models.Host.enrolled_at))]
        for name, keys, at in hosts:
            for kind, digest in keys:
                try:
                    with self.session() as s:
                        owner = s.get(models.EnrolledKey, (kind, digest))
                        if owner is None:
                            s.add(models.EnrolledKey(kind=kind, digest=digest, host=name,
                                                     enrolled_at=at))
                        elif owner.host != name:
                            LOG.warning("Hosts %(a)s and %(b)s share an %(what)s; it stays "
                                        "bound to %(a)s", {"a": owner.host, "b": name,
                                                            "what": KEY_KINDS[kind]})
                except IntegrityError:
                    continue  # another engine process recorded it first

    def schema_version(self) -> int:
        with self.session() as s:
            row = s.get(models.SchemaVersion, 1)
            return 0 if row is None else row.version


    # ---- hosts ------------------------------------------------------------------

    def enroll_host(self, name: str, *, ak_public: bytes, ak_name: bytes, kem_public: bytes,
                    kem_name: bytes, ek_certificate: bytes | None = None,
                    command_public: bytes | None = None, ek_public: bytes | None = None,
                    approved: bool = False, now: datetime.datetime | None = None
                    ) -> HostRecord:
        """Store a new host; a REVOKED host may be re-enrolled (new keys, no
        history but the keys). Its AK and command key (and, with
        ``ek_public``, an EK proven by credential activation, and its
        certificate) are bound to ``name`` for good: the same transaction
        refuses one that was ever enrolled under another name."""
        now = now or utcnow()
        status = HostStatus.APPROVED if approved else HostStatus.PENDING
        with self.session() as s:
            # of two re-enrollments only one still finds the host REVOKED
            if self._update_host(s, name, models.Host.status == HostStatus.REVOKED.value):
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
            row.enrolled_at = now
            row.approved_at = now if approved else None
            try:
                s.flush()
            except IntegrityError:
                raise exception.AlreadyExists(what="host", key=name) from None
            keys = _host_keys(ak_name, command_public,
                              ek_certificate if ek_public else None, ek_public)
            self._bind_keys(s, name, keys, now)
            return host_rec(row)

    @staticmethod
    def _bind_keys(s: Session, host: str, keys: list[tuple[str, str]],
                   now: datetime.datetime) -> None:
        for kind, digest in keys:
            owner = s.get(models.EnrolledKey, (kind, digest), with_for_update=True)
            if owner is None:
                s.add(models.EnrolledKey(kind=kind, digest=digest, host=host, enrolled_at=now))
            elif owner.host != host:
                raise exception.CertificationError(
                    host=host, reason=f"{KEY_KINDS[kind]} already enrolled for host "
                                      f"{owner.host}")
        try:
            s.flush()
        except IntegrityError:  # another worker bound one of them just now
            kinds = ", ".join(KEY_KINDS[kind] for kind, _ in keys)
            raise exception.CertificationError(
                host=host, reason=f"one of its keys ({kinds}) was enrolled for another "
                                  "host meanwhile") from None

    def key_owner(self, kind: str, key: bytes) -> str | None:
        """The host name ``key`` (of ``KEY_KINDS``) was first enrolled
        under, revoked or not, or None."""
        with self.session() as s:
            row = s.get(models.EnrolledKey, (kind, _key_digest(key)))
            return None if row is None else row.host

    def _host_row(self, s: Session, name: str) -> models.Host:
        row = s.scalar(select(models.Host).where(models.Host.name == name))
        if row is None:
            raise exception.NotFound(what="host", key=name)
        return row

    @staticmethod
    def _update_host(s: Session, name: str, *conditions: Any, bump: bool = True,
                     **values: Any) -> bool:
        """Change the host row iff ``conditions`` hold; True if it did.

        Run first in a transaction it locks the row (and, on SQLite, takes
        the write lock), so the checks after it see no concurrent change.
        ``bump``: the revision grows, which makes attestations in flight
        stale (their verdicts are dropped)."""
        revision = models.Host.revision
        values["revision"] = revision + 1 if bump else revision
        q = (update(models.Host).where(models.Host.name == name, *conditions)
             .values(**values).execution_options(synchronize_session=False))
        return s.execute(q).rowcount == 1  # type: ignore[attr-defined,no-any-return]

    def approve_host(self, name: str, now: datetime.datetime | None = None) -> HostRecord:
        """PENDING/APPROVED -> APPROVED; forgets the clock baseline (re-approval).

        Without the baseline a quote held back from before could no longer
        be told from a newer one, so attestations in flight are dropped and
        the verdict expires: the next attestation decides."""
        now = now or utcnow()
        with self.session() as s:
            if not self._update_host(s, name, models.Host.status != HostStatus.REVOKED.value,
                                     status=HostStatus.APPROVED.value, approved_at=now):
                row = self._host_row(s, name)
                raise exception.InvalidTransition(what="host", key=name, current=row.status,
                                                  target=HostStatus.APPROVED.value)
            s.execute(delete(models.ClockStateRow).where(models.ClockStateRow.host == name))
            self._expire_verdicts(s, models.VerdictRow.host == name, "host approved", now)
            return host_rec(self._host_row(s, name))

    def revoke_host(self, name: str, *, now: datetime.datetime | None = None,
                    expires_at: datetime.datetime | None = None) -> HostRecord:
        """-> REVOKED, and its verdict UNTRUSTED in the same transaction: no
        reader ever sees a revoked host with its old TRUSTED verdict."""
        now = now or utcnow()
        with self.session() as s:
            if not self._update_host(s, name, status=HostStatus.REVOKED.value):
                raise exception.NotFound(what="host", key=name)
            self._put_verdict(s, name, verifier.TrustStatus.UNTRUSTED, "host revoked", now,
                              expires_at or now)
            return host_rec(self._host_row(s, name))

    def get_host(self, name: str) -> HostRecord:
        with self.session() as s:
            return host_rec(self._host_row(s, name))

    def list_hosts(self, status: HostStatus | None = None) -> list[HostRecord]:
        q = select(models.Host).order_by(models.Host.name)
        if status is not None:
            q = q.where(models.Host.status == status.value)
        with self.session() as s:
            return [host_rec(r) for r in s.scalars(q)]

    def trusted_host(self, name: str, now: datetime.datetime) -> HostRecord | None:
        """The host iff it is APPROVED and has a fresh TRUSTED verdict, read
        in ONE query (the migration gate: its KEM key comes with the check)."""
        q = (select(models.Host).join(models.VerdictRow,
                                      models.VerdictRow.host == models.Host.name)
             .where(models.Host.name == name,
                    models.Host.status == HostStatus.APPROVED.value,
                    models.VerdictRow.status == verifier.TrustStatus.TRUSTED.value,
                    models.VerdictRow.expires_at > now))
        with self.session() as s:
            row = s.scalar(q)
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

    # ---- policies ---------------------------------------------------------------

    def put_policy(self, name: str, bank: str, pcrs: Mapping[int, bytes],
                   description: str = "", now: datetime.datetime | None = None
                   ) -> PolicyRecord:
        """Create or replace a golden policy after checking its shape."""
        if not name or len(name) > 255:
            raise exception.InvalidInput(reason="policy name must be 1-255 characters")
        if bank not in verifier.BANKS:
            raise exception.InvalidInput(reason=f"unsupported PCR bank {bank!r}")
        size = verifier.BANKS[bank][1]
        if not pcrs:
            raise exception.InvalidInput(reason=f"policy {name!r} has no PCRs")
        for index, value in pcrs.items():
            if isinstance(index, bool) or not isinstance(index, int) or \
                    not 0 <= index <= verifier.MAX_PCR:
                raise exception.InvalidInput(reason=f"policy PCR index {index!r} is invalid")
            if not isinstance(value, bytes) or len(value) != size:
                raise exception.InvalidInput(
                    reason=f"policy PCR {index} must be {size} bytes for bank {bank}")
        stored = {str(i): pcrs[i].hex() for i in sorted(pcrs)}
        now = now or utcnow()
        with self.session() as s:
            row = s.scalar(select(models.Policy).where(models.Policy.name == name)
                           .with_for_update())
            if row is None:
                row = models.Policy(name=name, revision=0)
                s.add(row)
            else:
                row.revision = models.Policy.revision + 1  # type: ignore[assignment]
            row.bank, row.pcrs, row.description = bank, stored, description
            row.created_at = now
            s.flush()
            users = select(models.Host.name).where(models.Host.policy_name == name)
            self._expire_verdicts(s, models.VerdictRow.host.in_(users),
                                  f"policy {name} changed", now)
            return policy_rec(row)

    def get_policy(self, name: str) -> PolicyRecord:
        with self.session() as s:
            row = s.scalar(select(models.Policy).where(models.Policy.name == name))
            if row is None:
                raise exception.NotFound(what="policy", key=name)
            return policy_rec(row)

    def list_policies(self) -> list[PolicyRecord]:
        with self.session() as s:
            return [policy_rec(r) for r in
                    s.scalars(select(models.Policy).order_by(models.Policy.name))]

    # ---- verdicts ---------------------------------------------------------------

    def record_attestation(self, basis: TrustBasis, status: verifier.TrustStatus,
                           reason: str, expires_at: datetime.datetime, *,
                           clock: verifier.ClockState | None = None,
                           reapprove: bool = False) -> VerdictRecord:
        """Store an attestation's verdict (one row per host), in ONE
        transaction and only if nothing it was decided on changed since
        its challenge: the host's revision (status, keys, policy
        assignment), the policy's revision, no verdict of a later challenge
        on record (whatever either status: a failing verdict decided
        without a quote leaves no clock to order by) and, for TRUSTED, an
        APPROVED host and no newer quote of it on record. Else
        StaleAttestation and nothing changes. A quote's TPM clock becomes
        the host's baseline (never moved back); ``reapprove`` sends an
        APPROVED host to PENDING.
        """
        trusted = status is verifier.TrustStatus.TRUSTED
        if trusted and basis.policy_revision is None:
            raise exception.InvalidInput(reason="a TRUSTED verdict needs a policy")
        with self.session() as s:
            self._hold_basis(s, basis, trusted)
            later = (select(models.VerdictRow.host)
                     .where(models.VerdictRow.host == basis.host,
                            models.VerdictRow.attested_at > basis.challenged_at))
            if s.scalar(later) is not None:
                raise exception.StaleAttestation(
                    host=basis.host, reason="a newer attestation of the host was recorded")
            if clock is not None:
                self._advance_clock(s, basis.host, clock, newest_only=trusted)
            if reapprove:
                self._update_host(s, basis.host,
                                  models.Host.status == HostStatus.APPROVED.value,
                                  status=HostStatus.PENDING.value)
            row = self._put_verdict(s, basis.host, status, reason, basis.challenged_at,
                                    expires_at)
            return verdict_rec(row)

    def _hold_basis(self, s: Session, basis: TrustBasis, trusted: bool) -> None:
        """Lock the host row iff it is as the basis says, then check the
        policy under a shared lock (a policy change waits for us, or we see it)."""
        conds = [models.Host.revision == basis.host_revision,
                 models.Host.policy_name.is_(None) if basis.policy_name is None
                 else models.Host.policy_name == basis.policy_name]
        if trusted:
            conds.append(models.Host.status == HostStatus.APPROVED.value)
        if not self._update_host(s, basis.host, *conds, bump=False):
            raise exception.StaleAttestation(host=basis.host,
                                             reason=self._why_stale(s, basis))
        if basis.policy_revision is None:  # decided without a policy
            return
        revision = s.scalar(select(models.Policy.revision)
                            .where(models.Policy.name == basis.policy_name)
                            .with_for_update(read=True))
        if revision != basis.policy_revision:
            raise exception.StaleAttestation(
                host=basis.host,
                reason=f"policy {basis.policy_name} changed since the challenge")

    def _why_stale(self, s: Session, basis: TrustBasis) -> str:
        row = s.scalar(select(models.Host).where(models.Host.name == basis.host))
        if row is None:
            return "host is no longer enrolled"
        if row.status != HostStatus.APPROVED.value:
            return f"host is {row.status}"
        if row.policy_name != basis.policy_name:
            return "policy assignment changed since the challenge"
        return "host record changed since the challenge"

    def _put_verdict(self, s: Session, host: str, status: verifier.TrustStatus, reason: str,
                     attested_at: datetime.datetime,
                     expires_at: datetime.datetime) -> models.VerdictRow:
        row = s.get(models.VerdictRow, host, with_for_update=True)
        if row is None:
            row = models.VerdictRow(host=host)
            s.add(row)
        row.status, row.reason = status.value, reason
        row.attested_at, row.expires_at = attested_at, expires_at
        s.flush()
        return row

    @staticmethod
    def _expire_verdicts(s: Session, which: Any, why: str, now: datetime.datetime) -> None:
        q = (update(models.VerdictRow).where(which)
             .values(status=verifier.TrustStatus.UNKNOWN.value, reason=why + "; attest again",
                     attested_at=now, expires_at=now)
             .execution_options(synchronize_session=False))
        s.execute(q)

    def _verdicts_with_hosts(self, *conditions: Any) -> list[VerdictRecord]:
        q = (select(models.VerdictRow, models.Host.status)
             .join(models.Host, models.Host.name == models.VerdictRow.host)
             .where(*conditions).order_by(models.VerdictRow.host))
        with self.session() as s:
            return [_effective_verdict(row, status) for row, status in s.execute(q)]

    def get_verdict(self, host: str) -> VerdictRecord | None:
        """The host's verdict, read with its status (see _effective_verdict)."""
        found = self._verdicts_with_hosts(models.VerdictRow.host == host)
        return found[0] if found else None

    def fresh_verdicts(self, now: datetime.datetime | None = None) -> dict[str, VerdictRecord]:
        """All unexpired verdicts with their hosts' status in ONE query (the
        scheduler filter calls this): only an APPROVED host is TRUSTED."""
        return {v.host: v for v in self._verdicts_with_hosts(
            models.VerdictRow.expires_at > (now or utcnow()))}

    # ---- clock states -----------------------------------------------------------

    def get_clock_state(self, host: str) -> verifier.ClockState | None:
        with self.session() as s:
            row = s.get(models.ClockStateRow, host)
            if row is None:
                return None
            return verifier.ClockState(row.clock, row.reset_count, row.restart_count)

    def set_clock_state(self, host: str, state: verifier.ClockState) -> bool:
        """Store the TPM clock baseline, never moving it backwards."""
        with self.session() as s:
            if not self._update_host(s, host, bump=False):
                raise exception.NotFound(what="host", key=host)
            return self._advance_clock(s, host, state, newest_only=False)

    def _advance_clock(self, s: Session, host: str, state: verifier.ClockState, *,
                       newest_only: bool) -> bool:
        """Move the baseline forward to ``state``; False if it is older.

        Two engine workers attesting one host at once must not leave the
        older quote's clock as the baseline (that would weaken rollback
        detection). ``newest_only``: an older quote is refused
        (StaleAttestation), since a newer one was judged already."""
        row = s.get(models.ClockStateRow, host, with_for_update=True)
        if row is None:
            row = models.ClockStateRow(host=host)
            s.add(row)
        elif (state.reset_count, state.restart_count, state.clock) < \
                (row.reset_count, row.restart_count, row.clock):
            if newest_only:
                raise exception.StaleAttestation(
                    host=host, reason="a newer quote of the host was recorded")
            return False
        row.clock, row.reset_count = state.clock, state.reset_count
        row.restart_count = state.restart_count
        return True
