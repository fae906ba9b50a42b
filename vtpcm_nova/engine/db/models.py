"""SQLAlchemy 2.0 tables of the engine (SQLite by default, PostgreSQL/MySQL by URL).

Why these shapes: every row a security decision reads (host keys, policies,
verdicts, nonces, clock states, vTPCM generation) is a plain typed column so
the checks in ``api`` can be single conditional UPDATEs that stay atomic across
several engine processes. Datetimes are stored as naive UTC and handed back
timezone-aware, identically on every backend.
"""

from __future__ import annotations

import datetime
import enum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class HostStatus(enum.StrEnum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    REVOKED = "REVOKED"
    # Tombstone of a host an operator forgot (``hosts forget``): its keys stay
    # bound to the name, its agent's unsigned registration enrolls nothing;
    # only an operator's ``hosts enroll`` brings the name back.
    FORGOTTEN = "FORGOTTEN"


class UTCDateTime(TypeDecorator[datetime.datetime]):
    """Aware UTC in Python, naive UTC in the database (same on every backend)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime.datetime | None,
                           dialect: Dialect) -> datetime.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime refused: use timezone-aware UTC")
        return value.astimezone(datetime.UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime.datetime | None,
                             dialect: Dialect) -> datetime.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=datetime.UTC)


HOST_LEN = 255
UUID_LEN = 36


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    """The releases before alembic recorded their schema here (1 to 3).
    Kept, at 4 since revision 0002, so that such an engine refuses the
    database; alembic_version is where the schema is now."""

    __tablename__ = "schema_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class Policy(Base):
    __tablename__ = "policies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    bank: Mapped[str] = mapped_column(String(16))
    pcrs: Mapped[dict[str, str]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    # schema v3: +1 at every put; a verdict holds only for the revision it
    # was decided against
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(HOST_LEN), unique=True)
    ak_public: Mapped[bytes] = mapped_column(LargeBinary)
    ak_name: Mapped[bytes] = mapped_column(LargeBinary)
    kem_public: Mapped[bytes] = mapped_column(LargeBinary)
    kem_name: Mapped[bytes] = mapped_column(LargeBinary)
    ek_certificate: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # schema v2: raw Ed25519 key the host's Nova driver signs engine calls with
    command_public: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    policy_name: Mapped[str | None] = mapped_column(
        String(255), ForeignKey("policies.name"), nullable=True)
    enrolled_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    approved_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # schema v3: +1 whenever the status, the keys or the policy assignment
    # change; an attestation's verdict is stored only if it is unchanged
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # revision 0007: the storage parents the AK certified at enrollment
    # (parentcert; NULL: enrolled through an agent older than API 1.10)
    ak_parent_name: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    kem_parent_name: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class EnrolledKey(Base):
    """Every AK, EK and host command key ever enrolled, and for which host
    (schema v3). Rows are never deleted: a key stays bound to its first host
    name through revocation and re-enrollment with other keys."""

    __tablename__ = "enrolled_keys"
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256, hex
    host: Mapped[str] = mapped_column(String(HOST_LEN), index=True)
    enrolled_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)


class VerdictRow(Base):
    __tablename__ = "verdicts"
    host: Mapped[str] = mapped_column(
        String(HOST_LEN), ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    attested_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, index=True)


class ClockStateRow(Base):
    __tablename__ = "clock_states"
    host: Mapped[str] = mapped_column(
        String(HOST_LEN), ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True)
    clock: Mapped[int] = mapped_column(BigInteger)
    reset_count: Mapped[int] = mapped_column(BigInteger)
    restart_count: Mapped[int] = mapped_column(BigInteger)


class Nonce(Base):
    """Nonces are not tied to ``hosts``: enrollment nonces precede the host row."""

    __tablename__ = "nonces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(String(HOST_LEN), index=True)
    nonce: Mapped[str] = mapped_column(String(128), unique=True)
    purpose: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, index=True)
    used: Mapped[bool] = mapped_column(Boolean, default=False)


class CommandNonce(Base):
    """Nonces of operator-signed admin commands already accepted (schema v2).

    Shared by all engine workers, so a captured command replayed to another
    worker, or to a restarted one, is refused. ``keep_until`` is a POSIX time
    (the signed command's own time base)."""

    __tablename__ = "command_nonces"
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    keep_until: Mapped[float] = mapped_column(Float, index=True)


class Audit(Base):
    __tablename__ = "audit"
    # the reaper's tombstone lookup on every create_vtpcm (revision 0005)
    __table_args__ = (Index("ix_audit_instance_event", "instance", "event"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, index=True)
    event: Mapped[str] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(HOST_LEN), nullable=True, index=True)
    instance: Mapped[str | None] = mapped_column(String(UUID_LEN), nullable=True)
    migration_id: Mapped[str | None] = mapped_column(String(UUID_LEN), nullable=True)
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text, default="")


class Vtpcm(Base):
    __tablename__ = "vtpcms"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_uuid: Mapped[str] = mapped_column(String(UUID_LEN), unique=True)
    vtpcm_id: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(HOST_LEN), index=True)
    generation: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(32))
    migration_id: Mapped[str | None] = mapped_column(String(UUID_LEN), nullable=True)
    updated_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    # the project Nova showed owning the instance at create (None: unknown)
    owner_project: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Migration(Base):
    __tablename__ = "migrations"
    __table_args__ = (UniqueConstraint("migration_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    migration_id: Mapped[str] = mapped_column(String(UUID_LEN))
    instance_uuid: Mapped[str] = mapped_column(String(UUID_LEN), index=True)
    source: Mapped[str] = mapped_column(String(HOST_LEN))
    dest: Mapped[str] = mapped_column(String(HOST_LEN))
    generation: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    deadline: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the vTPCM record's state before the migration claimed it (SHELVED for
    # an unshelve), which an abort restores
    prior_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # the engine worker running its begin ("<[engine] host>/<run id>"):
    # reconcile aborts a begin whose worker restarted (0004)
    begun_by: Mapped[str | None] = mapped_column(String(255), nullable=True)


class AbandonedVtpcm(Base):
    """A vTPCM an evacuation gave up on its failed (revoked) host: kept
    until reconcile has that host's agent destroy it."""
    __tablename__ = "abandoned_vtpcms"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_uuid: Mapped[str] = mapped_column(String(UUID_LEN), index=True)
    vtpcm_id: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(HOST_LEN))
    generation: Mapped[int] = mapped_column(BigInteger)
    abandoned_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)


class EngineWorker(Base):
    """One engine run's lease (0006): ``worker_id`` is what its begins
    record in ``migrations.begun_by``. Written with the database's clock
    only (``workers.WorkerStore``), so workers' clocks never meet; a run's
    begins are abandoned once its row is gone (clean stop) or expired."""
    __tablename__ = "engine_workers"
    worker_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(HOST_LEN))
    started_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    renewed_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, index=True)


class ApiWitness(Base):
    """nova-api's signed word that it accepted an unshelve or a delete of a
    server (0008, ``witnesses.WitnessStore``). Written only by the engine
    after the signature verified with a nova-api witness key; compute hosts
    cannot write it (unlike Nova's own database). ``used_at`` marks the one
    move or shred it allowed; rows are purged after ``PURGE_AFTER``."""
    __tablename__ = "api_witnesses"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # key:nonce
    instance_uuid: Mapped[str] = mapped_column(String(UUID_LEN))
    action: Mapped[str] = mapped_column(String(16))
    host: Mapped[str | None] = mapped_column(String(HOST_LEN), nullable=True)
    key: Mapped[str] = mapped_column(String(64))
    requested_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime)
    recorded_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, index=True)
    used_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    used_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # who asked nova-api (keystonemiddleware's X-Project-Id / X-User-Id)
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (Index("ix_api_witnesses_instance_action", "instance_uuid", "action"),)
