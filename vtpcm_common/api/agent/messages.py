"""One schema-checked message type per agent RPC method (see rpcapi.py)."""

import dataclasses

from vtpcm_common import wire
from vtpcm_common.wire import Message, field

MAX_STATE_BLOB = 256 * 1024
NONCE = wire.blob_field(max_len=64, min_len=16)
STATES = ("CREATING", "STOPPED", "ACTIVE", "MIGRATING_OUT", "MIGRATING_IN", "DESTROYED")


@dataclasses.dataclass(frozen=True)
class InstanceRef(Message):
    """Names one instance's vTPCM (get, start, stop, destroy, export_state)."""

    message_type = "instance_ref"
    instance_uuid: str = field(wire.uuid_field)
    # 1.11 (get): also report the VM's QEMU uid and gid (VTPCMInfo.qemu_uid)
    ids: bool = field(wire.bool_field, default=False, omit_default=True)


@dataclasses.dataclass(frozen=True)
class Empty(Message):
    message_type = "empty"


@dataclasses.dataclass(frozen=True)
class VTPCMInfo(Message):
    message_type = "vtpcm_info"
    instance_uuid: str = field(wire.uuid_field)
    vtpcm_id: str = field(wire.uuid_field)
    state: str = field(wire.choice_field(*STATES))
    generation: int = field(wire.int_field(0, 2**62))
    migration_id: str | None = field(wire.optional(wire.uuid_field))
    ctrl_socket: str = field(wire.text_field(4096))
    running: bool = field(wire.bool_field)
    pid: int | None = field(wire.optional(wire.int_field(1, 2**31)))
    # 1.11, only when asked (InstanceRef.ids) and the agent has per-VM QEMU
    # uids ([agent] qemu_uid_range): the uid the VM's QEMU runs as and the
    # VM's gid (its swtpm's uid, the group of its 0660 socket)
    qemu_uid: int | None = field(wire.optional(wire.int_field(0, 2**32 - 2)), default=None,
                                 omit_default=True)
    vm_gid: int | None = field(wire.optional(wire.int_field(0, 2**32 - 2)), default=None,
                               omit_default=True)


@dataclasses.dataclass(frozen=True)
class VTPCMList(Message):
    message_type = "vtpcm_list"
    vtpcms: tuple[VTPCMInfo, ...] = field(wire.message_list_field(VTPCMInfo))


@dataclasses.dataclass(frozen=True)
class StateBlobs(Message):
    """Permanent + volatile blobs as swtpm gave them: encrypted and MACed under
    the instance's migration key; opaque to everyone without that key."""

    message_type = "state_blobs"
    instance_uuid: str = field(wire.uuid_field)
    migration_id: str | None = field(wire.optional(wire.uuid_field))
    generation: int = field(wire.int_field(0, 2**62))
    permanent: bytes = field(wire.blob_field(MAX_STATE_BLOB, 1), secret=True)
    permanent_flags: int = field(wire.int_field(0, 2**32 - 1))
    volatile: bytes = field(wire.blob_field(MAX_STATE_BLOB, 0), secret=True)
    volatile_flags: int = field(wire.int_field(0, 2**32 - 1))


@dataclasses.dataclass(frozen=True)
class Health(Message):
    message_type = "health"
    host: str = field(wire.host_field)
    api_version: str = field(wire.text_field(16))
    vtpcms: int = field(wire.int_field(0, 2**31))
    running: int = field(wire.int_field(0, 2**31))
    crashed: tuple[str, ...] = field(wire.list_field(wire.uuid_field))


# --- 1.1: host identity ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IdentityRequest(Message):
    message_type = "identity_request"
    nonce: bytes = field(NONCE)
    # 1.10: also certify the pinned storage parents (HostIdentity.parent_certs)
    parents: bool = field(wire.bool_field, default=False, omit_default=True)


@dataclasses.dataclass(frozen=True)
class ParentCertification(Message):
    """1.10: TPM2_CertifyCreation by the AK of one storage parent the agent
    salts its sessions to (``hostkeys.ParentCertification``): the engine
    checks that ``pinned_name`` is the name of a primary this TPM created
    in ``hierarchy`` (``vtpcm_nova/engine/parentcert.py``). The reply is
    not signed by the host: ``attest``'s extraData binds ``pinned_name``
    (``authn.parent_binding``), so a rewritten one is refused."""

    message_type = "parent_certification"
    hierarchy: str = field(wire.choice_field("owner", "endorsement"))
    public: bytes = field(wire.blob_field(1024, 1))
    pinned_name: bytes = field(wire.blob_field(66, 1))
    creation_data: bytes = field(wire.blob_field(1024, 1))
    attest: bytes = field(wire.blob_field(1024, 1))
    signature: bytes = field(wire.blob_field(512, 1))


@dataclasses.dataclass(frozen=True)
class HostIdentity(Message):
    message_type = "host_identity"
    host: str = field(wire.host_field)
    ak_public: bytes = field(wire.blob_field(1024, 1))
    kem_public: bytes = field(wire.blob_field(1024, 1))
    kem_certify_attest: bytes = field(wire.blob_field(1024, 1))
    kem_certify_signature: bytes = field(wire.blob_field(512, 1))
    ek_certificate: bytes | None = field(wire.optional(wire.blob_field(8192, 1)))
    # 1.4: raw Ed25519 public key the host's Nova driver signs engine calls with
    command_public: bytes | None = field(wire.optional(wire.blob_field(32, 32)),
                                         default=None)
    # 1.5: marshaled TPMT_PUBLIC of the EK that ek_certificate certifies
    ek_public: bytes | None = field(wire.optional(wire.blob_field(1024, 1)), default=None)
    # 1.10, only when asked (IdentityRequest.parents): both parents certified
    parent_certs: tuple[ParentCertification, ...] = field(
        wire.message_list_field(ParentCertification, 2), default=(), omit_default=True)


@dataclasses.dataclass(frozen=True)
class CredentialChallenge(Message):
    """TPM2_MakeCredential output (marshaled TPM2B_ID_OBJECT and
    TPM2B_ENCRYPTED_SECRET) for this host's EK and AK name."""

    message_type = "credential_challenge"
    credential_blob: bytes = field(wire.blob_field(1024, 1))
    encrypted_secret: bytes = field(wire.blob_field(1024, 1))


@dataclasses.dataclass(frozen=True)
class ActivatedCredential(Message):
    message_type = "activated_credential"
    host: str = field(wire.host_field)
    secret: bytes = field(wire.blob_field(64, 1))


@dataclasses.dataclass(frozen=True)
class QuoteRequest(Message):
    message_type = "quote_request"
    nonce: bytes = field(NONCE)
    pcrs: tuple[int, ...] = field(wire.int_list_field(0, 23))
    bank: str = field(wire.choice_field("sha256"), default="sha256")
    # 1.9: also report the KEM key's PCR binding (Quote.kem_pcrs/kem_current)
    kem: bool = field(wire.bool_field, default=False, omit_default=True)


@dataclasses.dataclass(frozen=True)
class Quote(Message):
    message_type = "quote"
    host: str = field(wire.host_field)
    attest: bytes = field(wire.blob_field(2048, 1))
    signature: bytes = field(wire.blob_field(512, 1))
    pcr_values: dict[int, bytes] = field(
        wire.map_field(24, wire.digit_key(0, 23), wire.blob_field(64, 20)))
    # 1.9, only when asked (QuoteRequest.kem): the sha256 PCRs the host binds
    # its KEM key to ([host_tpm] kem_policy_pcrs, empty: unbound) and whether
    # the enrolled KEM key is bound as configured to the PCRs' values now
    # (False: stale until the engine's signed re-enrollment). Unsigned
    # claims: the engine checks the certified authPolicy against its own
    # golden values (kembinding) and takes a False here as a refusal.
    kem_pcrs: tuple[int, ...] | None = field(wire.optional(wire.int_list_field(0, 23)),
                                             default=None, omit_default=True)
    kem_current: bool | None = field(wire.optional(wire.bool_field), default=None,
                                     omit_default=True)


# --- 1.2: migration -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MigrationContext(Message):
    """What a sealed key is bound to (the AEAD associated data)."""

    message_type = "migration_context"
    migration_id: str = field(wire.uuid_field)
    instance_uuid: str = field(wire.uuid_field)
    generation: int = field(wire.int_field(0, 2**62))
    source_host: str = field(wire.host_field)
    dest_host: str = field(wire.host_field)


@dataclasses.dataclass(frozen=True)
class SealRequest(Message):
    message_type = "seal_request"
    context: MigrationContext = field(wire.message_field(MigrationContext))
    dest_kem_public: bytes = field(wire.blob_field(1024, 1))


@dataclasses.dataclass(frozen=True)
class SealedKey(Message):
    message_type = "sealed_key"
    envelope: bytes = field(wire.blob_field(1024, 1), secret=True)


@dataclasses.dataclass(frozen=True)
class PrepareIncoming(Message):
    message_type = "prepare_incoming"
    context: MigrationContext = field(wire.message_field(MigrationContext))
    envelope: bytes = field(wire.blob_field(1024, 1), secret=True)


@dataclasses.dataclass(frozen=True)
class MigrationStep(Message):
    """commit/abort on either side: which migration, bound to which context."""

    message_type = "migration_step"
    context: MigrationContext = field(wire.message_field(MigrationContext))
    # Abort of an incoming vTPCM after the deadline: refuse if state arrived.
    only_if_unused: bool = field(wire.bool_field, default=False)


# --- 1.7: convergence ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IncomingState(Message):
    """What the agent holds for one migration's incoming side: the proof an
    operator's ``resolve --to destination`` needs before the commit point
    (an incoming vTPCM that never received the state must not become the
    authority). Answered for any vTPCM of the instance; the engine checks
    that it is this migration's."""

    message_type = "incoming_state"
    state: str = field(wire.choice_field(*STATES))
    generation: int = field(wire.int_field(0, 2**62))
    migration_id: str | None = field(wire.optional(wire.uuid_field))
    running: bool = field(wire.bool_field)
    # The permanent state file exists: QEMU or import_state set the state.
    holds_state: bool = field(wire.bool_field)


# --- 1.12: the post-import check ------------------------------------------------------

DIGEST_SIDES = ("source", "destination")


@dataclasses.dataclass(frozen=True)
class StateDigestRequest(Message):
    """Ask one side of a live migration for a keyed digest of its vTPCM's
    permanent state, before the commit point (the post-import check): the
    source's current state (what QEMU read for the stream), the
    destination's as its swtpm first wrote it after the import (before the
    guest could change it). ``nonce`` keys the digest (fresh per check)."""

    message_type = "state_digest_request"
    context: MigrationContext = field(wire.message_field(MigrationContext))
    side: str = field(wire.choice_field(*DIGEST_SIDES))
    nonce: bytes = field(wire.blob_field(32, 32))
    # 1.13: also the digest of the state blobs QEMU read or set through the
    # control-channel proxy (StateDigest.stream)
    streams: bool = field(wire.bool_field, default=False, omit_default=True)


@dataclasses.dataclass(frozen=True)
class StateDigest(Message):
    """``statedigest.permanent_state_digest(nonce, plaintext)`` of one side,
    or None with the reason the agent cannot tell (the destination saw no
    write yet, saw more than one before it could read the first, or lost
    its capture in a restart)."""

    message_type = "state_digest"
    side: str = field(wire.choice_field(*DIGEST_SIDES))
    digest: bytes | None = field(wire.optional(wire.blob_field(32, 32)))
    reason: str = field(wire.text_field(1000), default="")
    # 1.13, when asked (StateDigestRequest.streams):
    # ``statedigest.stream_digest(nonce, blobs)`` of the state blobs the
    # source's QEMU last read (permanent, volatile) or the destination's
    # QEMU set, as the control-channel proxy saw them; None with the reason
    # when this side has no proxy or it saw no such blobs
    stream: bytes | None = field(wire.optional(wire.blob_field(32, 32)), default=None,
                                 omit_default=True)
    stream_reason: str = field(wire.text_field(1000), default="", omit_default=True)


# --- 1.8: an operator's rollback past the commit point ------------------------------

@dataclasses.dataclass(frozen=True)
class ReclaimOutgoing(Message):
    """The source's outgoing vTPCM of ``context`` becomes live again at
    ``generation``, a generation never used (above the destination's
    ``context.generation + 1``), so no copy of the migration can pass for it."""

    message_type = "reclaim_outgoing"
    context: MigrationContext = field(wire.message_field(MigrationContext))
    generation: int = field(wire.int_field(0, 2**62))
