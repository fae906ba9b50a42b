"""The frozen records the database hands out, and their row converters.

Why apart from the queries: callers (attestation, migration coordinator,
scheduler filter) get these, never ORM objects bound to a session, so the
records are the database's whole vocabulary and every area shares them.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Row

from vtpcm_nova.engine import verifier
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.models import HostStatus


@dataclasses.dataclass(frozen=True)
class HostRecord:
    name: str
    ak_public: bytes = dataclasses.field(repr=False)
    ak_name: bytes
    kem_public: bytes = dataclasses.field(repr=False)
    kem_name: bytes
    ek_certificate: bytes | None = dataclasses.field(repr=False)
    status: HostStatus
    policy_name: str | None
    enrolled_at: datetime.datetime
    approved_at: datetime.datetime | None
    command_public: bytes | None = None
    revision: int = 0
    # the names of the storage parents the AK certified (parentcert), or None
    ak_parent_name: bytes | None = None
    kem_parent_name: bytes | None = None


@dataclasses.dataclass(frozen=True)
class PolicyRecord:
    name: str
    bank: str
    pcrs: Mapping[int, bytes]
    description: str
    created_at: datetime.datetime
    revision: int = 0

    def spec(self) -> verifier.PolicySpec:
        return verifier.PolicySpec(self.name, self.bank, dict(self.pcrs))


@dataclasses.dataclass(frozen=True)
class VerdictRecord:
    host: str
    status: verifier.TrustStatus
    reason: str
    attested_at: datetime.datetime
    expires_at: datetime.datetime

    @property
    def trusted(self) -> bool:
        return self.status is verifier.TrustStatus.TRUSTED

    def is_fresh(self, now: datetime.datetime) -> bool:
        return self.expires_at > now


@dataclasses.dataclass(frozen=True)
class TrustBasis:
    """What an attestation is decided on, read before its challenge: its
    verdict is stored only if all of it still holds (``record_attestation``).
    ``policy_revision`` is None when no policy was judged (e.g. "host is
    PENDING")."""

    host: str
    host_revision: int
    policy_name: str | None
    policy_revision: int | None
    challenged_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Challenge:
    """What an attestation is decided on, read in ONE transaction
    (``TrustStore.open_challenge``): the host, its policy (None when the
    host is not APPROVED or has none: nothing to quote) and its TPM clock
    baseline."""

    host: HostRecord
    policy: PolicyRecord | None
    clock: verifier.ClockState | None


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime.datetime
    event: str
    host: str | None
    instance: str | None
    migration_id: str | None
    outcome: str
    detail: str


@dataclasses.dataclass(frozen=True)
class VtpcmRecord:
    instance_uuid: str
    vtpcm_id: str
    host: str
    generation: int
    state: str
    migration_id: str | None
    updated_at: datetime.datetime
    owner_project: str | None = None  # Nova's owner at create; None: not known


@dataclasses.dataclass(frozen=True)
class MigrationRecord:
    migration_id: str
    instance_uuid: str
    source: str
    dest: str
    generation: int
    state: str
    created_at: datetime.datetime
    updated_at: datetime.datetime
    deadline: datetime.datetime
    error: str | None
    prior_state: str | None = None
    begun_by: str | None = None


@dataclasses.dataclass(frozen=True)
class AbandonedRecord:
    """A vTPCM given up by an evacuation, still to be destroyed on ``host``."""
    instance_uuid: str
    vtpcm_id: str
    host: str
    generation: int
    abandoned_at: datetime.datetime


def host_rec(r: models.Host | Row[Any]) -> HostRecord:
    return HostRecord(r.name, r.ak_public, r.ak_name, r.kem_public, r.kem_name,
                      r.ek_certificate, HostStatus(r.status), r.policy_name, r.enrolled_at,
                      r.approved_at, r.command_public, r.revision, r.ak_parent_name,
                      r.kem_parent_name)


def policy_rec(r: models.Policy | Row[Any]) -> PolicyRecord:
    return PolicyRecord(r.name, r.bank, {int(k): bytes.fromhex(v) for k, v in r.pcrs.items()},
                        r.description, r.created_at, r.revision)


def verdict_rec(r: models.VerdictRow) -> VerdictRecord:
    return VerdictRecord(r.host, verifier.TrustStatus(r.status), r.reason, r.attested_at,
                         r.expires_at)


def vtpcm_rec(r: models.Vtpcm | Row[Any]) -> VtpcmRecord:
    return VtpcmRecord(r.instance_uuid, r.vtpcm_id, r.host, r.generation, r.state,
                       r.migration_id, r.updated_at, r.owner_project)


def migration_rec(r: models.Migration | Row[Any]) -> MigrationRecord:
    return MigrationRecord(r.migration_id, r.instance_uuid, r.source, r.dest, r.generation,
                           r.state, r.created_at, r.updated_at, r.deadline, r.error,
                           r.prior_state, r.begun_by)


def abandoned_rec(r: models.AbandonedVtpcm) -> AbandonedRecord:
    return AbandonedRecord(r.instance_uuid, r.vtpcm_id, r.host, r.generation,
                           r.abandoned_at)

