"""RPC endpoints of the vtpcm-agent: check the message, call the instance
manager, answer with one checked message.

Errors raised here are vTPCM exceptions whose text names what was wrong;
oslo.messaging sends them back to the caller (``allowed_remote_exmods``).
Each refusal is logged once, with ids and reasons only. State-changing
methods (``signed=True``) run only for commands the engine signed. Replies
are signed with the host command key when the caller asks (API 1.6).
"""

import threading
from typing import Any

import oslo_messaging as messaging
from oslo_log import log as logging

from vtpcm_agent.association import Association
from vtpcm_agent.instances import InstanceManager, context_from
from vtpcm_agent.swtpm import ctrl
from vtpcm_common import authn, exception
from vtpcm_common.api.agent import messages as m
from vtpcm_common.api.agent import rpcapi
from vtpcm_common.authn import CommandVerifier
from vtpcm_common.ratelimit import TokenBucket
from vtpcm_common.rpc import endpoint

LOG = logging.getLogger(__name__)


class AgentManager:
    target = messaging.Target(version=rpcapi.RPC_API_VERSION)

    def __init__(self, host: str, instances: InstanceManager, host_tpm: Any = None,
                 verifier: CommandVerifier | None = None,
                 command_public: bytes | None = None,
                 reply_signer: authn.CommandSigner | None = None,
                 unsigned_limit: TokenBucket | None = None,
                 activation_limit: TokenBucket | None = None) -> None:
        """``verifier`` checks the engine's signature on state-changing
        commands; without one, those commands are all refused.
        ``command_public``: this host's command public key, reported (and
        bound into the TPM's certify) by ``get_identity``.
        ``reply_signer``: that key's private half; every reply a 1.6 caller
        asks for is signed with it (``rpc.endpoint``).
        ``unsigned_limit`` / ``activation_limit``: rates of the unsigned
        TPM calls (get_identity and quote / activate_credential), which
        any broker client can send; unlimited when None. The engine's own
        calls of these (signed, ``vouched``) are not counted."""
        self.host = host
        self.unsigned_limit = unsigned_limit
        self.activation_limit = activation_limit
        self.instances = instances
        self.host_tpm = host_tpm
        self.verifier = verifier
        self.reply_signer = reply_signer
        if reply_signer is not None:
            own = authn.public_raw(reply_signer.public_key)
            if command_public is not None and command_public != own:
                raise exception.InvalidInput(
                    reason="the reply signer is not the host command key reported")
            command_public = own
        self.command_public = command_public
        # set by the engine's first verified (vouched) TPM call: the
        # engine knows this agent, it need not announce itself again
        self.engine_contact = threading.Event()

    def _info(self, assoc: Association, ids: bool = False) -> m.VTPCMInfo:
        """``ids`` (asked as 1.11): with the VM's QEMU uid and gid, if any."""
        vm = self.instances.vm_ids(assoc.instance_uuid) if ids else None
        return m.VTPCMInfo(
            instance_uuid=assoc.instance_uuid, vtpcm_id=assoc.vtpcm_id,
            state=assoc.state.value, generation=assoc.generation,
            migration_id=assoc.migration_id, ctrl_socket=assoc.ctrl_socket,
            running=self.instances.is_running(assoc), pid=assoc.pid,
            qemu_uid=vm[0] if vm else None, vm_gid=vm[1] if vm else None)

    # 1.0 ---------------------------------------------------------------------
    @endpoint(m.InstanceRef, signed=True)
    def create(self, req: m.InstanceRef) -> m.VTPCMInfo:
        return self._info(self.instances.create(req.instance_uuid))

    @endpoint(m.InstanceRef)
    def get(self, req: m.InstanceRef) -> m.VTPCMInfo:
        return self._info(self.instances.get(req.instance_uuid), ids=req.ids)

    @endpoint(m.Empty)
    def list(self, req: m.Empty) -> m.VTPCMList:
        return m.VTPCMList(tuple(self._info(a) for a in self.instances.list_vtpcms()))

    @endpoint(m.InstanceRef, signed=True)
    def start(self, req: m.InstanceRef) -> m.VTPCMInfo:
        return self._info(self.instances.start(req.instance_uuid))

    @endpoint(m.InstanceRef, signed=True)
    def stop(self, req: m.InstanceRef) -> m.VTPCMInfo:
        return self._info(self.instances.stop(req.instance_uuid))

    @endpoint(m.InstanceRef, signed=True)
    def destroy(self, req: m.InstanceRef) -> m.VTPCMInfo:
        return self._info(self.instances.destroy(req.instance_uuid))

    @endpoint(m.InstanceRef, signed=True)
    def export_state(self, req: m.InstanceRef) -> m.StateBlobs:
        assoc, state = self.instances.export_state(req.instance_uuid)
        return m.StateBlobs(
            instance_uuid=assoc.instance_uuid, migration_id=assoc.migration_id,
            generation=assoc.generation, permanent=state.permanent,
            permanent_flags=state.permanent_flags, volatile=state.volatile,
            volatile_flags=state.volatile_flags)

    @endpoint(m.StateBlobs, signed=True)
    def import_state(self, req: m.StateBlobs) -> m.VTPCMInfo:
        state = ctrl.ExportedState(
            permanent=req.permanent, permanent_flags=req.permanent_flags,
            volatile=req.volatile, volatile_flags=req.volatile_flags)
        return self._info(self.instances.import_state(req.instance_uuid, req.migration_id,
                                                      req.generation, state))

    @endpoint(m.Empty)
    def health(self, req: m.Empty) -> m.Health:
        vtpcms = self.instances.list_vtpcms()
        return m.Health(
            host=self.host, api_version=rpcapi.RPC_API_VERSION, vtpcms=len(vtpcms),
            running=sum(1 for a in vtpcms if self.instances.is_running(a)),
            crashed=tuple(self.instances.crashed()))

    # 1.7 ---------------------------------------------------------------------
    @endpoint(m.MigrationContext)
    def incoming_state(self, req: m.MigrationContext) -> m.IncomingState:
        assoc = self.instances.get(req.instance_uuid)
        return m.IncomingState(
            state=assoc.state.value, generation=assoc.generation,
            migration_id=assoc.migration_id, running=self.instances.is_running(assoc),
            holds_state=self.instances.holds_state(assoc))

    # 1.1 ---------------------------------------------------------------------
    def _tpm(self, limit: TokenBucket | None = None, what: str = "") -> Any:
        """The host TPM, after ``limit`` allowed one more unsigned ``what``
        (refused at once otherwise: no TPM work queued for a flood)."""
        if self.host_tpm is None:
            raise exception.HostTPMError(reason="this agent has no host TPM configured")
        if limit is not None:
            limit.take(what)
        return self.host_tpm

    def _limit(self, vouched: bool, limit: TokenBucket | None) -> TokenBucket | None:
        """The engine's own (signed) calls pass; everyone else's count."""
        if vouched:
            self.engine_contact.set()
            return None
        return limit

    @endpoint(m.IdentityRequest, vouched=True)
    def get_identity(self, req: m.IdentityRequest, vouched: bool) -> m.HostIdentity:
        qualifying = req.nonce if self.command_public is None else \
            authn.host_key_binding(req.nonce, self.command_public, self.host)
        ident = self._tpm(self._limit(vouched, self.unsigned_limit),
                          "unsigned TPM calls").identity(qualifying, rotate_kem=vouched,
                                                         parents=req.parents)
        return m.HostIdentity(
            host=self.host, ak_public=ident.ak_public, kem_public=ident.kem_public,
            kem_certify_attest=ident.kem_certify_attest,
            kem_certify_signature=ident.kem_certify_signature,
            ek_certificate=ident.ek_certificate, command_public=self.command_public,
            ek_public=ident.ek_public,
            parent_certs=tuple(m.ParentCertification(*c) for c in ident.parent_certs))

    @endpoint(m.CredentialChallenge, vouched=True)
    def activate_credential(self, req: m.CredentialChallenge,
                            vouched: bool) -> m.ActivatedCredential:
        tpm = self._tpm(self._limit(vouched, self.activation_limit), "credential activations")
        secret = tpm.activate_credential(req.credential_blob, req.encrypted_secret,
                                         signed=vouched)
        return m.ActivatedCredential(host=self.host, secret=secret)

    @endpoint(m.QuoteRequest, vouched=True)
    def quote(self, req: m.QuoteRequest, vouched: bool) -> m.Quote:
        tpm = self._tpm(self._limit(vouched, self.unsigned_limit), "unsigned TPM calls")
        result = tpm.quote(req.nonce, req.pcrs, req.bank)
        if not req.kem:  # asked below 1.9: the reply such a caller accepts
            return m.Quote(host=self.host, attest=result.attest, signature=result.signature,
                           pcr_values=dict(result.pcr_values))
        return m.Quote(host=self.host, attest=result.attest, signature=result.signature,
                       pcr_values=dict(result.pcr_values), kem_pcrs=tpm.kem_pcrs,
                       kem_current=tpm.kem_current())

    # 1.2 ---------------------------------------------------------------------
    @endpoint(m.SealRequest, signed=True)
    def seal_migration_key(self, req: m.SealRequest) -> m.SealedKey:
        return m.SealedKey(self.instances.seal_migration_key(
            context_from(req.context), req.dest_kem_public))

    @endpoint(m.PrepareIncoming, signed=True)
    def prepare_incoming(self, req: m.PrepareIncoming) -> m.VTPCMInfo:
        return self._info(self.instances.prepare_incoming(
            context_from(req.context), req.envelope))

    @endpoint(m.MigrationStep, signed=True)
    def commit_incoming(self, req: m.MigrationStep) -> m.Empty:
        self.instances.commit_incoming(context_from(req.context))
        return m.Empty()

    @endpoint(m.MigrationStep, signed=True)
    def commit_outgoing(self, req: m.MigrationStep) -> m.Empty:
        self.instances.commit_outgoing(context_from(req.context))
        return m.Empty()

    @endpoint(m.MigrationStep, signed=True)
    def abort_incoming(self, req: m.MigrationStep) -> m.Empty:
        self.instances.abort_incoming(context_from(req.context), req.only_if_unused)
        return m.Empty()

    @endpoint(m.MigrationStep, signed=True)
    def abort_outgoing(self, req: m.MigrationStep) -> m.Empty:
        self.instances.abort_outgoing(context_from(req.context))
        return m.Empty()

    # 1.8 ---------------------------------------------------------------------
    @endpoint(m.ReclaimOutgoing, signed=True)
    def reclaim_outgoing(self, req: m.ReclaimOutgoing) -> m.Empty:
        self.instances.reclaim_outgoing(context_from(req.context), req.generation)
        return m.Empty()

    # 1.12 --------------------------------------------------------------------
    @endpoint(m.StateDigestRequest)
    def state_digest(self, req: m.StateDigestRequest) -> m.StateDigest:
        found = self.instances.state_digest(context_from(req.context), req.side, req.nonce,
                                            streams=req.streams)
        if not req.streams:
            return m.StateDigest(side=req.side, digest=found.digest, reason=found.reason[:1000])
        return m.StateDigest(side=req.side, digest=found.digest, reason=found.reason[:1000],
                             stream=found.stream, stream_reason=found.stream_reason[:1000])
