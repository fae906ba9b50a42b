"""Client side of the vtpcm-agent RPC API.

API version history:

    1.0 - Initial version: create, get, list, start, stop, destroy,
          export_state, import_state, health.
    1.1 - Host identity: get_identity, quote.
    1.2 - Migration: seal_migration_key, prepare_incoming, commit_incoming,
          commit_outgoing, abort_incoming, abort_outgoing.
    1.3 - state-changing methods require an engine signature: create, start,
          stop, destroy, export_state, import_state and every 1.2 method take
          an ``auth`` argument signed with the engine's command key
          (``vtpcm_common/authn.py``); get, list, health, get_identity and
          quote do not (read-only, or bound to the caller's nonce).
    1.4 - get_identity also returns the host's command public key
          (``command_public``), bound into the KEM certify's qualifying data
          (``authn.host_key_binding``): the engine checks the Nova driver's
          calls from this host against it.
    1.5 - get_identity also returns ``ek_public`` (the EK its certificate
          certifies) and activate_credential (TPM2_ActivateCredential with
          the AK and that EK), so the engine can prove the AK is a key of
          the TPM the EK certificate vouches for. Unsigned: the answer is
          only the engine's one-time challenge.
    1.6 - signed replies: a call with ``reply_nonce`` gets its outcome
          (reply or refusal) signed with the host command key over the
          method, the host, the nonce (a signed command's own nonce) and
          the request (``authn.reply_bytes``), every method alike
          (``rpc.endpoint``). A client with ``reply_keys`` asks every call
          but ``UNVERIFIED_REPLIES`` as 1.6 and acts only on replies that
          verify; capped below 1.6 it refuses those calls
          (``RPCVersionCapped``) rather than act on unsigned answers.
          get_identity's certify binds the host name as well
          (``authn.host_key_binding`` v2), so an identity relayed under
          another name does not enroll.
    1.7 - incoming_state: whether an incoming vTPCM holds the state it
          received (the proof ``vtpcm-manage migration resolve --to
          destination`` needs before the commit point). Read-only, unsigned
          request, signed reply. Capped below 1.7 the engine refuses that
          resolve instead (nothing proves the destination holds the state).
    1.8 - reclaim_outgoing (signed): the source's outgoing vTPCM becomes
          live again under a new generation, past the commit point of a
          migration whose destination died before committing (``vtpcm-manage
          migration resolve --to source --past-commit``). Capped below 1.8
          the engine cannot take that decision (``RPCVersionCapped``).
    1.9 - quote with ``kem=True`` also reports the KEM key's PCR binding
          (``kem_pcrs``: the PCRs the host binds it to; ``kem_current``:
          whether the enrolled key is bound as configured to the PCRs'
          values now). Capped below 1.9 the quote is asked as 1.1 without
          them: the engine then checks the certified binding against the
          policy's whole selection and has no staleness report.
    1.10 - get_identity with ``parents=True`` also returns ``parent_certs``:
          the AK's TPM2_CertifyCreation of both storage parents the agent
          pinned, each with the identity's qualifying data bound to the
          hierarchy and the agent's pin (``authn.parent_binding``, so the
          AK's signature covers the reported ``pinned_name``) (issue 9: the
          engine checks they are real primaries of this TPM, which ends the
          trust on first use of the pins). Capped below 1.10 it is asked as 1.5
          without them; ``[attestation] require_certified_parents`` then
          refuses the enrollment.
    1.11 - get with ``ids=True`` also returns ``qemu_uid`` and ``vm_gid``:
          the uid the VM's QEMU runs as and the VM's gid (its swtpm's uid),
          when the agent has per-VM QEMU uids (``[agent] qemu_uid_range``),
          for the Nova driver's DAC label (``[vtpcm] qemu_dac_label``).
          Capped below 1.11 (or an older agent) the driver refuses to build
          a labelled guest.
    1.12 - state_digest (unsigned read-only request, like incoming_state;
          signed reply bound to the request; made so before 1.12 was
          released, to save the engine's signature on the commit's path):
          a keyed digest of
          the permanent state of one side of a migration, the source's
          current one or the destination's first write after the import,
          for the engine's post-import check before the commit point.
          Capped below 1.12 (or an older agent) the engine cannot check,
          and with ``[engine] post_import_check`` on it holds the commit.
    1.13 - state_digest asked with ``streams`` also answers ``stream``: a
          keyed digest of the state blobs (permanent and volatile) the
          source's QEMU last read or the destination's QEMU set, as the
          agent's control-channel proxy between QEMU and swtpm saw them
          (``[agent] ctrl_proxy``), or why not. An older agent refuses the
          request; the engine then asks as 1.12 (no stream digest).

Every method sends one schema-checked message and checks the one it gets
back; ``prepare(server=host)`` addresses the agent of one compute host.

Each call is prepared with the version that introduced the method in the
form this client sends it and relies on: the state-changing methods carry
``auth`` since 1.3, ``get_identity`` must answer ``command_public`` (1.4)
and preferably ``ek_public`` (1.5). An agent older than that refuses the
call (oslo.messaging ``UnsupportedVersion``) instead of misreading it.
Only ``SIGNED_METHODS`` and ``VOUCHED_METHODS`` carry ``auth``. With ``reply_keys`` every other
method is asked as 1.6 too (signed replies), except ``UNVERIFIED_REPLIES``.
"""

import types
from typing import TypeVar

import oslo_messaging as messaging
from oslo_config import cfg

from vtpcm_common import authn, rpc
from vtpcm_common.api.agent import messages as m
from vtpcm_common.wire import Message

RPC_API_VERSION = "1.13"
# state_digest: the post-import check
STATE_DIGEST_VERSION = "1.12"
# state_digest asked as this version also answers the proxy's stream digest
STREAM_DIGEST_VERSION = "1.13"
# get asked as this version reports the VM's QEMU uid and gid
VM_IDS_VERSION = "1.11"
# get_identity asked as this version carries the parents' certifications:
# an engine that asked so refuses an answer without them (the reply is unsigned)
IDENTITY_PARENTS_VERSION = "1.10"
REPLY_VERSION = "1.6"


R = TypeVar("R", bound=Message)

# State-changing calls: signed with the engine's command key (1.3).
SIGNED_METHODS = frozenset({"create", "start", "stop", "destroy", "export_state",
                            "import_state", "seal_migration_key", "prepare_incoming",
                            "commit_incoming", "commit_outgoing", "abort_incoming",
                            "abort_outgoing", "reclaim_outgoing"})
# Unsigned methods (any broker client may call them) that the engine signs
# all the same, so that the agent serves its calls ahead of its rate limit
# for unsigned ones; an agent that does not know this ignores ``auth``.
VOUCHED_METHODS = frozenset({"get_identity", "activate_credential", "quote"})
VOUCHED_SINCE = "1.3"  # every endpoint takes ``auth`` since
# Answers checked by the TPM's signature instead (the engine verifies them
# against the AK; get_identity and activate_credential also serve hosts
# whose command key it does not know yet): asked as before.
UNVERIFIED_REPLIES = frozenset({"get_identity", "activate_credential", "quote"})


class AgentAPI(rpc.Client):
    API_VERSION = RPC_API_VERSION
    UPGRADE_LEVEL = "vtpcm_agent"
    REPLY_VERSION = REPLY_VERSION
    UNVERIFIED_REPLIES = UNVERIFIED_REPLIES

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport | None = None,
                 timeout: float = 60.0, signer: authn.CommandSigner | None = None,
                 version_cap: str | None | types.EllipsisType = ...,
                 exchange: str | None = None,
                 reply_keys: authn.ReplyKeys | None = None) -> None:
        """``signer``: the engine's command signer. Without one, the key named
        by ``[engine] command_signing_key`` is used if it exists (tools and
        tests next to the engine); otherwise state-changing calls are sent
        unsigned and agents refuse them.

        ``version_cap``: default ``[upgrade_levels] vtpcm_agent``.

        ``reply_keys``: the hosts' command keys; the engine and the Nova
        driver always pass them (replies they act on must verify)."""
        if signer is None:
            signer = authn.signer_from_conf(conf)
        super().__init__(conf, rpc.topic(conf, "agent_topic"), transport, timeout, signer,
                         version_cap, exchange, reply_keys)

    def _at(self, host: str, method: str, version: str, request: Message,
            reply_type: type[R]) -> R:
        """Call the agent of one compute host; signed if the method needs it,
        or vouched for when every agent takes ``auth`` (1.3)."""
        signer = self.signer if method in SIGNED_METHODS else None
        if method in VOUCHED_METHODS and self.signer is not None \
                and self.can_send_version(VOUCHED_SINCE):
            signer = self.signer
            version = rpc._later(version, VOUCHED_SINCE)
        return self._call(method, version, request, reply_type, server=host, signer=signer)

    # 1.0 (state-changing ones signed since 1.3)
    def create(self, host: str, instance_uuid: str) -> m.VTPCMInfo:
        return self._at(host, "create", "1.3", m.InstanceRef(instance_uuid), m.VTPCMInfo)

    def get(self, host: str, instance_uuid: str, ids: bool = False) -> m.VTPCMInfo:
        """``ids``: asked as 1.11, the answer also carries ``qemu_uid`` and
        ``vm_gid`` if that agent runs per-VM QEMU uids. Capped below 1.11
        nothing is sent (``RPCVersionCapped``); an older agent refuses the
        version."""
        if ids:
            return self._at(host, "get", VM_IDS_VERSION, m.InstanceRef(instance_uuid, ids=True),
                            m.VTPCMInfo)
        return self._at(host, "get", "1.0", m.InstanceRef(instance_uuid), m.VTPCMInfo)

    def list(self, host: str) -> m.VTPCMList:
        return self._at(host, "list", "1.0", m.Empty(), m.VTPCMList)

    def start(self, host: str, instance_uuid: str) -> m.VTPCMInfo:
        return self._at(host, "start", "1.3", m.InstanceRef(instance_uuid), m.VTPCMInfo)

    def stop(self, host: str, instance_uuid: str) -> m.VTPCMInfo:
        return self._at(host, "stop", "1.3", m.InstanceRef(instance_uuid), m.VTPCMInfo)

    def destroy(self, host: str, instance_uuid: str) -> m.VTPCMInfo:
        return self._at(host, "destroy", "1.3", m.InstanceRef(instance_uuid), m.VTPCMInfo)

    def export_state(self, host: str, instance_uuid: str) -> m.StateBlobs:
        return self._at(host, "export_state", "1.3", m.InstanceRef(instance_uuid),
                          m.StateBlobs)

    def import_state(self, host: str, blobs: m.StateBlobs) -> m.VTPCMInfo:
        return self._at(host, "import_state", "1.3", blobs, m.VTPCMInfo)

    def health(self, host: str, timeout: float | None = None) -> m.Health:
        return self._call("health", "1.0", m.Empty(), m.Health, server=host, timeout=timeout,
                          signer=None)

    # 1.1; get_identity answers command_public since 1.4 (the engine needs
    # it) and ek_public since 1.5; activate_credential is 1.5
    def get_identity(self, host: str, nonce: bytes) -> m.HostIdentity:
        """Asked as 1.10 with the parents' certifications unless capped
        below (then as 1.5 without). Capped below 1.5, asked as 1.4: the answer lacks ``ek_public``,
        so an engine that checks EK certificates refuses to enroll the
        host until the cap is lifted; an engine that does not, enrolls it."""
        if self.can_send_version(IDENTITY_PARENTS_VERSION):
            return self._at(host, "get_identity", IDENTITY_PARENTS_VERSION,
                            m.IdentityRequest(nonce, parents=True), m.HostIdentity)
        version = "1.5" if self.can_send_version("1.5") else "1.4"
        return self._at(host, "get_identity", version, m.IdentityRequest(nonce),
                        m.HostIdentity)

    def activate_credential(self, host: str, credential_blob: bytes,
                            encrypted_secret: bytes) -> m.ActivatedCredential:
        return self._at(host, "activate_credential", "1.5",
                        m.CredentialChallenge(credential_blob, encrypted_secret),
                        m.ActivatedCredential)

    def quote(self, host: str, nonce: bytes, pcrs: tuple[int, ...],
              bank: str = "sha256") -> m.Quote:
        """Asked as 1.9 with the KEM report unless capped below (then 1.1)."""
        if self.can_send_version("1.9"):
            return self._at(host, "quote", "1.9",
                            m.QuoteRequest(nonce, tuple(pcrs), bank, kem=True), m.Quote)
        return self._at(host, "quote", "1.1", m.QuoteRequest(nonce, tuple(pcrs), bank),
                        m.Quote)

    # 1.2, signed since 1.3
    def seal_migration_key(self, host: str, context: m.MigrationContext,
                           dest_kem_public: bytes) -> m.SealedKey:
        return self._at(host, "seal_migration_key", "1.3",
                          m.SealRequest(context, dest_kem_public), m.SealedKey)

    def prepare_incoming(self, host: str, context: m.MigrationContext,
                         envelope: bytes) -> m.VTPCMInfo:
        return self._at(host, "prepare_incoming", "1.3",
                          m.PrepareIncoming(context, envelope), m.VTPCMInfo)

    def commit_incoming(self, host: str, context: m.MigrationContext) -> m.Empty:
        return self._at(host, "commit_incoming", "1.3", m.MigrationStep(context), m.Empty)

    def commit_outgoing(self, host: str, context: m.MigrationContext) -> m.Empty:
        return self._at(host, "commit_outgoing", "1.3", m.MigrationStep(context), m.Empty)

    def abort_incoming(self, host: str, context: m.MigrationContext,
                       only_if_unused: bool = False) -> m.Empty:
        return self._at(host, "abort_incoming", "1.3",
                          m.MigrationStep(context, only_if_unused), m.Empty)

    def abort_outgoing(self, host: str, context: m.MigrationContext) -> m.Empty:
        return self._at(host, "abort_outgoing", "1.3", m.MigrationStep(context), m.Empty)

    # 1.7
    def incoming_state(self, host: str, context: m.MigrationContext) -> m.IncomingState:
        return self._at(host, "incoming_state", "1.7", context, m.IncomingState)

    # 1.8
    def reclaim_outgoing(self, host: str, context: m.MigrationContext,
                         generation: int) -> m.Empty:
        return self._at(host, "reclaim_outgoing", "1.8",
                        m.ReclaimOutgoing(context, generation), m.Empty)

    # 1.12
    def state_digest(self, host: str, context: m.MigrationContext, side: str,
                     nonce: bytes, streams: bool = True) -> m.StateDigest:
        """Asked as 1.13 with the stream digest when ``streams`` and not
        capped below (an older agent refuses it: ask again without), else
        as 1.12."""
        if streams and self.can_send_version(STREAM_DIGEST_VERSION):
            return self._at(host, "state_digest", STREAM_DIGEST_VERSION,
                            m.StateDigestRequest(context, side, nonce, streams=True),
                            m.StateDigest)
        return self._at(host, "state_digest", STATE_DIGEST_VERSION,
                        m.StateDigestRequest(context, side, nonce), m.StateDigest)
