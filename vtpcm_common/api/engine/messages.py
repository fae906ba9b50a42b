"""One schema-checked message type per engine RPC method (see rpcapi.py)."""

import dataclasses

from vtpcm_common import wire
from vtpcm_common.wire import Message, field

_TS = wire.text_field(40)
_OPT_TS = wire.optional(_TS)
_NAME = wire.text_field(64, r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass(frozen=True)
class Empty(Message):
    message_type = "empty"


@dataclasses.dataclass(frozen=True)
class HostRef(Message):
    message_type = "host_ref"
    host: str = field(wire.host_field)


@dataclasses.dataclass(frozen=True)
class InstanceRef(Message):
    message_type = "instance_ref"
    instance_uuid: str = field(wire.uuid_field)


@dataclasses.dataclass(frozen=True)
class HostInfo(Message):
    message_type = "host_info"
    name: str = field(wire.host_field)
    status: str = field(wire.choice_field("PENDING", "APPROVED", "REVOKED"))
    policy_name: str | None = field(wire.optional(_NAME))
    ak_name: str = field(wire.text_field(140))
    enrolled_at: str = field(_TS)
    approved_at: str | None = field(_OPT_TS)
    has_ek_certificate: bool = field(wire.bool_field)


@dataclasses.dataclass(frozen=True)
class HostCommandKey(Message):
    """A host's enrolled command public key (1.4): what the Nova driver
    checks another host's agent replies with."""
    message_type = "host_command_key"
    host: str = field(wire.host_field)
    status: str = field(wire.choice_field("PENDING", "APPROVED", "REVOKED"))
    command_public: bytes | None = field(wire.optional(wire.blob_field(32, 32)))


@dataclasses.dataclass(frozen=True)
class HostKeyQuery(Message):
    """Ask for a host's command key with a fresh nonce (1.6)."""
    message_type = "host_key_query"
    host: str = field(wire.host_field)
    nonce: bytes = field(wire.blob_field(max_len=64, min_len=16))


@dataclasses.dataclass(frozen=True)
class SignedHostCommandKey(Message):
    """``HostCommandKey`` signed by the engine's command key over the host,
    status, key and the caller's nonce (1.6; ``authn.host_key_bytes``)."""
    message_type = "signed_host_command_key"
    host: str = field(wire.host_field)
    status: str = field(wire.choice_field("PENDING", "APPROVED", "REVOKED"))
    command_public: bytes | None = field(wire.optional(wire.blob_field(32, 32)))
    signature: bytes = field(wire.blob_field(64, 64))


@dataclasses.dataclass(frozen=True)
class HostList(Message):
    message_type = "host_list"
    hosts: tuple[HostInfo, ...] = field(wire.message_list_field(HostInfo))


@dataclasses.dataclass(frozen=True)
class AssignPolicy(Message):
    message_type = "assign_policy"
    host: str = field(wire.host_field)
    policy_name: str | None = field(wire.optional(_NAME))


@dataclasses.dataclass(frozen=True)
class Verdict(Message):
    message_type = "verdict"
    host: str = field(wire.host_field)
    status: str = field(wire.choice_field("TRUSTED", "UNTRUSTED", "UNKNOWN"))
    reason: str = field(wire.text_field(2000))
    attested_at: str | None = field(_OPT_TS)
    expires_at: str | None = field(_OPT_TS)


@dataclasses.dataclass(frozen=True)
class VerdictList(Message):
    message_type = "verdict_list"
    verdicts: tuple[Verdict, ...] = field(wire.message_list_field(Verdict))


# hosts per trusted_hosts page: the most one reply carries (wire.py's list cap)
TRUSTED_PAGE_MAX = 10000


@dataclasses.dataclass(frozen=True)
class TrustedHostsQuery(Message):
    """One page of the TRUSTED hosts, by host name after ``after`` (1.9)."""
    message_type = "trusted_hosts_query"
    after: str | None = field(wire.optional(wire.host_field), default=None)
    limit: int = field(wire.int_field(1, TRUSTED_PAGE_MAX), default=TRUSTED_PAGE_MAX)


@dataclasses.dataclass(frozen=True)
class TrustedHosts(Message):
    """TRUSTED host -> expiry of its verdict, for the scheduler (1.9).

    Only what the filter reads: one map entry costs a tenth of a ``Verdict``
    to check, and paging (``next_after``: the ``after`` of the next page,
    None on the last) lifts ``VerdictList``'s 10,000-host ceiling."""
    message_type = "trusted_hosts"
    expires: dict[str, str] = field(wire.map_field(TRUSTED_PAGE_MAX, wire.host_field, _TS))
    next_after: str | None = field(wire.optional(wire.host_field), default=None)


@dataclasses.dataclass(frozen=True)
class PolicyInfo(Message):
    message_type = "policy_info"
    name: str = field(_NAME)
    bank: str = field(wire.choice_field("sha256"))
    pcrs: dict[int, bytes] = field(wire.map_field(24, wire.digit_key(0, 23),
                                                  wire.blob_field(32, 32)))
    description: str = field(wire.text_field(255), default="")


@dataclasses.dataclass(frozen=True)
class PolicyList(Message):
    message_type = "policy_list"
    policies: tuple[PolicyInfo, ...] = field(wire.message_list_field(PolicyInfo))


@dataclasses.dataclass(frozen=True)
class RecordPolicy(Message):
    """Record a golden policy from what a known-good host quotes now."""

    message_type = "record_policy"
    name: str = field(_NAME)
    host: str = field(wire.host_field)
    pcrs: tuple[int, ...] = field(wire.int_list_field(0, 23))
    description: str = field(wire.text_field(255), default="")


@dataclasses.dataclass(frozen=True)
class AuditQuery(Message):
    message_type = "audit_query"
    limit: int = field(wire.int_field(1, 10000), default=100)
    host: str | None = field(wire.optional(wire.host_field), default=None)


@dataclasses.dataclass(frozen=True)
class AuditEntry(Message):
    message_type = "audit_entry"
    at: str = field(_TS)
    event: str = field(wire.text_field(64))
    outcome: str = field(wire.text_field(64))
    host: str | None = field(wire.optional(wire.text_field(255)))
    instance: str | None = field(wire.optional(wire.text_field(64)))
    migration_id: str | None = field(wire.optional(wire.text_field(64)))
    detail: str = field(wire.text_field(4000))


@dataclasses.dataclass(frozen=True)
class AuditList(Message):
    message_type = "audit_list"
    entries: tuple[AuditEntry, ...] = field(wire.message_list_field(AuditEntry))


@dataclasses.dataclass(frozen=True)
class VtpcmQuery(Message):
    message_type = "vtpcm_query"
    state: str | None = field(wire.optional(wire.text_field(32)), default=None)
    host: str | None = field(wire.optional(wire.host_field), default=None)


@dataclasses.dataclass(frozen=True)
class VtpcmPlacement(Message):
    message_type = "vtpcm_placement"
    instance_uuid: str = field(wire.uuid_field)
    host: str = field(wire.host_field)


@dataclasses.dataclass(frozen=True)
class ApiWitness(Message):
    """What nova-api witnessed (engine API 1.12, ``record_api_witness``):
    it answered 2xx to an ``unshelve`` action or a ``DELETE`` of this
    server; ``host`` is the target an unshelve request named (microversion
    2.91), if any. ``project_id``, ``user_id`` and ``roles`` (comma
    separated) are who asked, from keystonemiddleware's headers: the engine
    takes an unshelve witness only from the instance's project or a listed
    admin project. The time and nonce are the signature's (``auth``)."""
    message_type = "api_witness"
    instance_uuid: str = field(wire.uuid_field)
    action: str = field(wire.choice_field("unshelve", "delete"))
    host: str | None = field(wire.optional(wire.host_field))
    project_id: str | None = field(wire.optional(wire.text_field(64)), default=None,
                                   omit_default=True)
    user_id: str | None = field(wire.optional(wire.text_field(64)), default=None,
                                omit_default=True)
    roles: str | None = field(wire.optional(wire.text_field(255)), default=None,
                              omit_default=True)


@dataclasses.dataclass(frozen=True)
class VtpcmRecord(Message):
    message_type = "vtpcm_record"
    instance_uuid: str = field(wire.uuid_field)
    vtpcm_id: str = field(wire.uuid_field)
    host: str = field(wire.host_field)
    generation: int = field(wire.int_field(0, 2**62))
    state: str = field(wire.text_field(32))
    migration_id: str | None = field(wire.optional(wire.uuid_field))


@dataclasses.dataclass(frozen=True)
class VtpcmList(Message):
    message_type = "vtpcm_list"
    vtpcms: tuple[VtpcmRecord, ...] = field(wire.message_list_field(VtpcmRecord))


@dataclasses.dataclass(frozen=True)
class VtpcmStatus(Message):
    """A vTPCM as the agent holding it answered start_vtpcm or stop_vtpcm (1.3)."""

    message_type = "vtpcm_status"
    instance_uuid: str = field(wire.uuid_field)
    vtpcm_id: str = field(wire.uuid_field)
    host: str = field(wire.host_field)
    generation: int = field(wire.int_field(0, 2**62))
    state: str = field(wire.text_field(32))
    running: bool = field(wire.bool_field)
    ctrl_socket: str = field(wire.text_field(4096))


@dataclasses.dataclass(frozen=True)
class CheckDestination(Message):
    message_type = "check_destination"
    instance_uuid: str = field(wire.uuid_field)
    dest: str = field(wire.host_field)


@dataclasses.dataclass(frozen=True)
class BeginMigration(Message):
    message_type = "begin_migration"
    migration_id: str = field(wire.uuid_field)
    instance_uuid: str = field(wire.uuid_field)
    source: str = field(wire.host_field)
    dest: str = field(wire.host_field)


@dataclasses.dataclass(frozen=True)
class MigrationRef(Message):
    message_type = "migration_ref"
    migration_id: str = field(wire.uuid_field)


@dataclasses.dataclass(frozen=True)
class CommitMigration(Message):
    """``commit``'s request. 1.11: ``shred_later`` asks the answer as soon as
    the destination's commit is recorded (SHREDDING); the source's copy is
    shredded right after it. Sent only when true, as 1.11; without it (an
    older client) the answer waits for the shred (COMMITTED), as before."""

    message_type = "commit_migration"
    migration_id: str = field(wire.uuid_field)
    shred_later: bool = field(wire.bool_field, default=False, omit_default=True)


@dataclasses.dataclass(frozen=True)
class AbortMigration(Message):
    message_type = "abort_migration"
    migration_id: str = field(wire.uuid_field)
    reason: str = field(wire.text_field(1000))
    # 1.10: the instance the migration moves. For an id the engine has no
    # record of (the caller's begin timed out before it was written), the
    # abort is then signed by the host holding that instance's vTPCM and
    # leaves an ABORTED tombstone a late begin of the id is refused by.
    # Sent only when set, and then as 1.10.
    instance_uuid: str | None = field(wire.optional(wire.uuid_field), default=None,
                                      omit_default=True)


@dataclasses.dataclass(frozen=True)
class MigrationInfo(Message):
    message_type = "migration_info"
    migration_id: str = field(wire.uuid_field)
    instance_uuid: str = field(wire.uuid_field)
    source: str = field(wire.host_field)
    dest: str = field(wire.host_field)
    generation: int = field(wire.int_field(0, 2**62))
    state: str = field(wire.text_field(32))
    error: str | None = field(wire.optional(wire.text_field(4000)))


# --- 1.7: operator decisions (issue 10) ----------------------------------------

@dataclasses.dataclass(frozen=True)
class ResolveMigration(Message):
    """Settle a migration the protocol cannot settle alone; without
    ``execute`` only the plan is returned."""

    message_type = "resolve_migration"
    migration_id: str = field(wire.uuid_field)
    to: str = field(wire.choice_field("source", "destination"))
    execute: bool = field(wire.bool_field)
    # 1.8: back to the source past the commit point (the destination died
    # before committing); sent only when true, as 1.8.
    past_commit: bool = field(wire.bool_field, default=False, omit_default=True)
    # 1.13: to the destination, commit although the post-import check the
    # resolve runs did not pass; sent only when true, as 1.13.
    despite_import_check: bool = field(wire.bool_field, default=False,
                                       omit_default=True)


@dataclasses.dataclass(frozen=True)
class ForgetHost(Message):
    """Drop the records of a host gone for good; without ``execute`` only the plan."""

    message_type = "forget_host"
    host: str = field(wire.host_field)
    execute: bool = field(wire.bool_field)
    # 1.8: forget it although something answers on its topic with replies
    # that do not verify; sent only when true, as 1.8.
    despite_unverified_answers: bool = field(wire.bool_field, default=False,
                                             omit_default=True)


@dataclasses.dataclass(frozen=True)
class Resolution(Message):
    """What an operator decision does (``plan``, plain words) and whether it ran."""

    message_type = "resolution"
    action: str = field(wire.text_field(200))
    plan: str = field(wire.text_field(4000))
    done: bool = field(wire.bool_field)
    state: str | None = field(wire.optional(wire.text_field(32)))


@dataclasses.dataclass(frozen=True)
class SwtpmRestartReport(Message):
    """An agent's report that a vTPCM's swtpm died and what it did about it."""

    message_type = "swtpm_restart_report"
    host: str = field(wire.host_field)
    instance_uuid: str = field(wire.uuid_field)
    vtpcm_id: str = field(wire.uuid_field)
    state: str = field(wire.text_field(32))
    outcome: str = field(wire.choice_field("restarted", "not-restarted"))
    detail: str = field(wire.text_field(1000))
