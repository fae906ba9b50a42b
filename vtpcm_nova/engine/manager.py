"""RPC endpoints of the vtpcm-engine: parse, delegate, answer.

Attestation lives in ``attestation.Attestor``, the migration protocol in
``coordinator.Coordinator``; this module only maps checked messages onto
them and records refusals in the log.

The admin methods (``rpcapi.ADMIN_METHODS``) are signed endpoints: they run
only for a call an operator key signed (``AuditedVerifier``). The compute-node
methods (``rpcapi.HOST_METHODS``) run only for a call signed by the command
key of a host the call concerns (``verify_host_command``): a broker client
cannot destroy, start or stop a vTPCM, nor begin, commit or abort a
migration of hosts it does not hold the keys of. Read-only methods and ``attest`` are unsigned.
"""

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import oslo_messaging as messaging
from oslo_log import log as logging

from vtpcm_common import authn, exception
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.agent.rpcapi import IDENTITY_PARENTS_VERSION, AgentAPI
from vtpcm_common.api.engine import messages as m
from vtpcm_common.api.engine import rpcapi
from vtpcm_common.ratelimit import InFlight
from vtpcm_common.rpc import endpoint
from vtpcm_nova.engine.attestation import PARENTS_ASKED, Attestor
from vtpcm_nova.engine.coordinator import Coordinator
from vtpcm_nova.engine.db import api as db_api
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.registrations import Registrations
from vtpcm_nova.engine.resolve import Answer, Resolver

LOG = logging.getLogger(__name__)

NO_ADMIN_KEYS = "no operator keys configured: set [engine] admin_public_keys"


class AgentAttestationClient:
    """Adapts the agent RPC client to what the Attestor expects (mappings of bytes)."""

    def __init__(self, agents: AgentAPI) -> None:
        self.agents = agents

    def get_identity(self, host: str, nonce: bytes) -> Mapping[str, Any]:
        """The identity, and whether it was asked with the parents'
        certifications (``PARENTS_ASKED``: then none is a refusal)."""
        asked = self.agents.can_send_version(IDENTITY_PARENTS_VERSION)
        return dict(dataclasses.asdict(self.agents.get_identity(host, nonce)),
                    **{PARENTS_ASKED: asked})

    def quote(self, host: str, nonce: bytes, pcrs: Sequence[int],
              bank: str) -> Mapping[str, Any]:
        return dataclasses.asdict(self.agents.quote(host, nonce, tuple(pcrs), bank))

    def activate_credential(self, host: str, credential_blob: bytes,
                            encrypted_secret: bytes) -> bytes:
        return self.agents.activate_credential(host, credential_blob,
                                               encrypted_secret).secret


class AuditedVerifier:
    """Checks the operator signature of an admin call and audits the outcome:
    which operator key changed trust, and every call refused for want of
    one (as the endpoint did the schema check first, ``host`` is a valid
    host name when present)."""

    def __init__(self, inner: authn.Verifier, db: db_api.Database) -> None:
        self.inner = inner
        self.db = db

    def __repr__(self) -> str:
        return "<AuditedVerifier %r>" % (self.inner,)

    def verify(self, method: str, payload: Any, auth: Any) -> str:
        host = payload.get("host") if isinstance(payload, Mapping) else None
        host = host if isinstance(host, str) else None
        try:
            key = self.inner.verify(method, payload, auth)
        except exception.CommandRefused as err:
            self.db.audit("admin", "refused", host=host, detail=str(err)[:1000])
            raise
        self.db.audit("admin", "accepted", host=host,
                      detail="%s signed by operator key %s" % (method, key))
        LOG.info("Admin call %(method)s signed by operator key %(key)s",
                 {"method": method, "key": key})
        return key


@dataclasses.dataclass(frozen=True)
class Witnessed:
    """What a verified nova-api witness signature says: which key, when
    nova-api signed it (the request's time), and its nonce."""
    key: str
    nonce: str
    requested_at: datetime.datetime


def _ts(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def host_info(rec: db_api.HostRecord) -> m.HostInfo:
    return m.HostInfo(name=rec.name, status=rec.status.value, policy_name=rec.policy_name,
                      ak_name=rec.ak_name.hex(), enrolled_at=_ts(rec.enrolled_at) or "",
                      approved_at=_ts(rec.approved_at),
                      has_ek_certificate=rec.ek_certificate is not None)


def verdict_info(rec: db_api.VerdictRecord) -> m.Verdict:
    return m.Verdict(host=rec.host, status=rec.status.value, reason=rec.reason[:2000],
                     attested_at=_ts(rec.attested_at), expires_at=_ts(rec.expires_at))


def policy_info(rec: db_api.PolicyRecord) -> m.PolicyInfo:
    return m.PolicyInfo(name=rec.name, bank=rec.bank, pcrs=dict(rec.pcrs),
                        description=rec.description)


def migration_info(st: db_api.MigrationRecord) -> m.MigrationInfo:
    return m.MigrationInfo(st.migration_id, st.instance_uuid, st.source, st.dest,
                           st.generation, st.state, (st.error or None) and st.error[:4000])


def vtpcm_info(rec: db_api.VtpcmRecord) -> m.VtpcmRecord:
    return m.VtpcmRecord(rec.instance_uuid, rec.vtpcm_id, rec.host, rec.generation,
                         rec.state, rec.migration_id)


def vtpcm_status(host: str, info: am.VTPCMInfo) -> m.VtpcmStatus:
    return m.VtpcmStatus(instance_uuid=info.instance_uuid, vtpcm_id=info.vtpcm_id, host=host,
                         generation=info.generation, state=info.state, running=info.running,
                         ctrl_socket=info.ctrl_socket)


class EngineManager:
    target = messaging.Target(version=rpcapi.RPC_API_VERSION)

    def __init__(self, db: db_api.Database, attestor: Attestor, coordinator: Coordinator,
                 *, auto_approve: bool = False, default_policy: str | None = None,
                 admin_verifier: authn.Verifier | None = None,
                 host_verifier: authn.CommandVerifier | None = None,
                 witness_verifier: authn.CommandVerifier | None = None,
                 signer: authn.CommandSigner | None = None,
                 registrations: Registrations | None = None,
                 max_unsigned_attestations: int = 8,
                 min_unsigned_interval: float = 5.0) -> None:
        """``admin_verifier`` checks operator signatures on the admin
        methods; without one they are all refused (fail closed).
        ``host_verifier`` checks compute-node calls against the enrolled
        host command keys (bound to the engine topic); without one those
        calls are all refused. ``signer``: the engine's command key, which
        signs its answers about host keys (without it they are refused).
        ``registrations`` enrolls announced agents in the background;
        without it only operators enroll hosts.
        ``max_unsigned_attestations``: ``attest`` calls served at once;
        ``min_unsigned_interval``: seconds during which ``attest`` answers
        with the verdict in force instead of quoting the host again."""
        self.db = db
        self.signer = signer
        self.verifier = AuditedVerifier(admin_verifier or authn.RefuseAll(NO_ADMIN_KEYS), db)
        self.host_verifier = host_verifier
        self.witness_verifier = witness_verifier
        self.attestor = attestor
        self.coordinator = coordinator
        self.auto_approve = auto_approve
        self.default_policy = default_policy
        self.registrations = registrations
        self.attest_slots = InFlight(max_unsigned_attestations)
        self.min_unsigned_interval = min_unsigned_interval
        self.resolver = Resolver(db, coordinator,
                                 lambda host, instance: self.coordinator.agents.get(
                                     host, instance),
                                 self._agent_alive,
                                 lambda host, ctx: self.coordinator.agents.incoming_state(
                                     host, ctx))

    def _agent_alive(self, host: str) -> Answer:
        """How the agent of ``host`` answers (``hosts forget`` refuses unless
        SILENT). ``health`` is asked with a signed reply even of a revoked
        host (``replykeys.TOWARD_SAFETY``); a reply that does not verify is
        UNVERIFIED: the agent with another key, or anyone on the broker, so
        only an operator's explicit word overrides it."""
        try:
            self.coordinator.agents.health(host, timeout=5)
        except exception.ReplyNotAuthenticated:
            return Answer.UNVERIFIED
        except (exception.VTPCMException, messaging.MessagingException):
            return Answer.SILENT
        return Answer.VERIFIED

    # compute-node calls ------------------------------------------------------------
    def _hosts_concerned(self, method: str, request: Any) -> tuple[str, ...]:
        """Who may sign a compute-node call, from the engine's own records
        wherever a vTPCM or migration exists (never from names the caller
        chose): moving a vTPCM out needs the consent of the host holding it.
        A commit may come from either side of the migration: the source saw
        it complete (post_live_migration), the destination saw the guest
        arrive (post_live_migration_at_destination), and the coordinator
        takes the destination's word before the commit point only once the
        agents show the guest left the source. A NotFound here is the
        honest answer to any caller."""
        if method in ("create_vtpcm", "replace_vtpcm", "unshelve_vtpcm"):  # who gets it
            return (request.host,)
        if method in ("destroy_vtpcm", "start_vtpcm", "stop_vtpcm", "shelve_vtpcm"):
            return (self.db.get_vtpcm(request.instance_uuid).host,)
        if method == "check_destination":
            try:
                return (request.dest, self.db.get_vtpcm(request.instance_uuid).host)
            except exception.NotFound:
                return (request.dest,)
        if method == "begin":  # the source, as recorded: Nova's live_migration on it
            return (self.db.get_vtpcm(request.instance_uuid).host,)
        if method == "transfer_state":  # the source: its guest is off, it consents
            return (self.db.get_migration(request.migration_id).source,)
        if method == "start_incoming":  # the destination, where the guest runs
            return (self.db.get_migration(request.migration_id).dest,)
        if method == "report_swtpm_restart":  # a host speaks for its own swtpm only
            return (request.host,)
        if method == "abort" and request.instance_uuid is not None:
            try:
                rec = self.db.get_migration(request.migration_id)
            except exception.NotFound:
                # no record: a tombstone, only by the host a begin of that
                # instance's vTPCM needs (who else could have begun it)
                return (self.db.get_vtpcm(request.instance_uuid).host,)
            return (rec.source, rec.dest)
        if method in ("commit", "abort"):  # either side may settle it
            rec = self.db.get_migration(request.migration_id)
            return (rec.source, rec.dest)
        raise exception.CommandRefused(method=method, reason="not a compute-node method")

    def verify_host_command(self, method: str, payload: Any, auth: Any, request: Any) -> str:
        """Run ``method`` only if a host it concerns signed it with the
        command key enrolled for that host; refusals are audited."""
        hosts = tuple(dict.fromkeys(self._hosts_concerned(method, request)))
        try:
            if self.host_verifier is None:
                raise exception.CommandRefused(
                    method=method, reason="this engine checks no host command keys")
            keys = {}
            for host in hosts:
                try:
                    rec = self.db.get_host(host)
                except exception.NotFound:
                    continue
                # only approved hosts act: a PENDING record may be anyone's
                # (the registration cast is unsigned), a REVOKED one is out
                if rec.command_public is not None and rec.status is HostStatus.APPROVED:
                    keys[host] = authn.load_public_raw(rec.command_public,
                                                       what="command key of " + host)
            if not keys:
                raise exception.CommandRefused(
                    method=method,
                    reason="no approved host with an enrolled command key may sign it "
                           "(%s)" % " or ".join(hosts))
            signer = self.host_verifier.verify_with(method, payload, auth, keys)
        except (exception.CommandRefused, exception.InvalidInput) as err:
            # not attributed to a host: the caller chose the names
            self.db.audit("host-call", "refused",
                          detail=("%s (for %s)" % (err, ", ".join(hosts)))[:1000])
            raise
        LOG.debug("%(method)s signed by host %(host)s", {"method": method, "host": signer})
        return signer

    def verify_witness(self, method: str, payload: Any, auth: Any,
                       request: m.ApiWitness) -> Witnessed:
        """nova-api's witness counts only signed by a nova-api witness key
        (``[nova] api_witness_public_keys``), for the engine topic, fresh
        and never seen before (nonces in the database: no worker accepts a
        replay). Refusals are audited, without the signature."""
        try:
            if self.witness_verifier is None:
                raise exception.CommandRefused(
                    method=method, reason="this engine has no nova-api witness keys "
                                          "([nova] api_witness_public_keys)")
            key = self.witness_verifier.verify(method, payload, auth)
        except (exception.CommandRefused, exception.InvalidInput) as err:
            self.db.audit("vtpcm.witness", "refused", instance=request.instance_uuid,
                          detail=("%s of the server: %s" % (request.action, err))[:1000])
            raise
        return Witnessed(key=key, nonce=str(auth["nonce"]),
                         requested_at=datetime.datetime.fromtimestamp(
                             float(auth["issued_at"]), datetime.UTC))

    # hosts -----------------------------------------------------------------------
    def register_agent(self, ctxt: dict[str, Any], payload: Any) -> None:
        """Unsigned cast from an agent at start: queue the name for a
        background enrollment (``registrations``) and return. Nothing here
        waits for an agent or the database: anyone can send this cast with
        any name, as fast as they like."""
        try:
            req = m.HostRef.from_wire(payload)
        except exception.VTPCMException as err:
            LOG.warning("Agent registration refused: %(err)s", {"err": err})
            return
        if self.registrations is None:
            LOG.debug("Agent of host %(host)s registered; automatic enrollment is off "
                      "(vtpcm-manage hosts enroll)", {"host": req.host})
        elif not self.registrations.submit(req.host):
            LOG.debug("Registration of host %(host)s ignored: queued or queued lately",
                      {"host": req.host})

    def enroll_registered(self, host: str) -> None:
        """Background half of ``register_agent``: enroll ``host`` by pulling
        a fresh identity, unless it is enrolled already (a revoked host must
        be re-enrolled by an operator)."""
        try:
            existing = self.db.get_host(host)
        except exception.NotFound:
            self._enroll(m.HostRef(host))
        else:
            LOG.debug("Agent of host %(host)s registered; host already %(status)s",
                      {"host": host, "status": existing.status.value})

    @endpoint(m.HostRef, signed=True)
    def enroll(self, req: m.HostRef) -> m.HostInfo:
        return self._enroll(req)

    def _enroll(self, req: m.HostRef) -> m.HostInfo:
        rec = self.attestor.enroll_from_agent(req.host, auto_approve=self.auto_approve)
        if rec.policy_name is None and self.default_policy:
            rec = self.db.assign_policy(req.host, self.default_policy)
        return host_info(rec)

    @endpoint(m.HostRef, signed=True)
    def approve_host(self, req: m.HostRef) -> m.HostInfo:
        return host_info(self.attestor.approve(req.host))

    @endpoint(m.HostRef, signed=True)
    def revoke_host(self, req: m.HostRef) -> m.HostInfo:
        return host_info(self.attestor.revoke(req.host))

    def _known_host(self, name: str) -> db_api.HostRecord:
        """A host as the API shows it: a FORGOTTEN one is a tombstone the
        engine keeps for itself (its keys stay bound), NotFound to callers
        as before the tombstones (engine API unchanged)."""
        rec = self.db.get_host(name)
        if rec.status is HostStatus.FORGOTTEN:
            raise exception.NotFound(what="host", key=name)
        return rec

    @endpoint(m.Empty)
    def list_hosts(self, req: m.Empty) -> m.HostList:
        return m.HostList(tuple(host_info(h) for h in self.db.list_hosts()
                                if h.status is not HostStatus.FORGOTTEN))

    @endpoint(m.HostRef)
    def show_host(self, req: m.HostRef) -> m.HostInfo:
        return host_info(self._known_host(req.host))

    @endpoint(m.HostRef)
    def host_command_key(self, req: m.HostRef) -> m.HostCommandKey:
        rec = self._known_host(req.host)
        return m.HostCommandKey(rec.name, rec.status.value, rec.command_public)

    @endpoint(m.HostKeyQuery)
    def signed_host_command_key(self, req: m.HostKeyQuery) -> m.SignedHostCommandKey:
        if self.signer is None:
            raise exception.CommandRefused(
                method="signed_host_command_key",
                reason="this engine has no command signing key to sign its answer")
        rec = self._known_host(req.host)
        return m.SignedHostCommandKey(
            rec.name, rec.status.value, rec.command_public,
            self.signer.sign_host_key(rec.name, rec.status.value, rec.command_public,
                                      req.nonce))

    @endpoint(m.AssignPolicy, signed=True)
    def assign_policy(self, req: m.AssignPolicy) -> m.HostInfo:
        # the host's verdict expires with the change, in one transaction
        rec = self.db.assign_policy(req.host, req.policy_name)
        self.db.audit("policy.assign", "assigned", host=req.host,
                      detail="policy %s" % req.policy_name)
        return host_info(rec)

    # policies ----------------------------------------------------------------------
    @endpoint(m.PolicyInfo, signed=True)
    def put_policy(self, req: m.PolicyInfo) -> m.PolicyInfo:
        # the verdicts of its hosts expire with the change, in one transaction
        rec = self.db.put_policy(req.name, req.bank, req.pcrs, description=req.description)
        self.db.audit("policy.put", "stored", detail="policy %s PCRs %s"
                      % (req.name, sorted(req.pcrs)))
        return policy_info(rec)

    @endpoint(m.RecordPolicy, signed=True)
    def record_policy(self, req: m.RecordPolicy) -> m.PolicyInfo:
        return policy_info(self.attestor.record_policy_from_host(
            req.name, req.host, req.pcrs, description=req.description))

    @endpoint(m.Empty)
    def list_policies(self, req: m.Empty) -> m.PolicyList:
        return m.PolicyList(tuple(policy_info(p) for p in self.db.list_policies()))

    # verdicts ----------------------------------------------------------------------
    @endpoint(m.HostRef)
    def attest(self, req: m.HostRef) -> m.Verdict:
        # unsigned and it waits for the host's reply (up to the RPC
        # timeout): one at a time per host, a few in all, so a host that
        # holds its replies cannot take the RPC threads migrations need
        # The engine's quote is vouched (the agent does not count it):
        # at most one per host per min_unsigned_interval from unsigned
        # callers, who get the verdict in force meanwhile.
        with self.attest_slots.slot(req.host, "unsigned attestations"):
            recent = self.attestor.recent(req.host, self.min_unsigned_interval)
            if recent is not None:
                LOG.debug("attest of %(host)s answered with the verdict of %(at)s",
                          {"host": req.host, "at": recent.attested_at})
                return verdict_info(recent)
            return verdict_info(self.attestor.attest(req.host))

    @endpoint(m.Empty)
    def verdicts(self, req: m.Empty) -> m.VerdictList:
        return m.VerdictList(tuple(verdict_info(v)
                                   for v in self.db.fresh_verdicts().values()))

    @endpoint(m.TrustedHostsQuery)
    def trusted_hosts(self, req: m.TrustedHostsQuery) -> m.TrustedHosts:
        trusted = self.db.trusted_page(req.after, req.limit)  # paged in SQL
        page = trusted[:req.limit]
        more = len(trusted) > req.limit
        return m.TrustedHosts({host: expires.isoformat() for host, expires in page},
                              next_after=page[-1][0] if more else None)

    @endpoint(m.AuditQuery)
    def list_audit(self, req: m.AuditQuery) -> m.AuditList:
        return m.AuditList(tuple(
            m.AuditEntry(at=_ts(a.at) or "", event=a.event[:64], outcome=a.outcome[:64],
                         host=a.host, instance=a.instance, migration_id=a.migration_id,
                         detail=a.detail[:4000])
            for a in self.db.list_audit(limit=req.limit, host=req.host)))

    # vTPCMs and migrations ------------------------------------------------------------
    @endpoint(m.VtpcmPlacement, host_signed=True)
    def create_vtpcm(self, req: m.VtpcmPlacement, signer: str) -> m.VtpcmRecord:
        return vtpcm_info(self.coordinator.create_vtpcm(req.instance_uuid, req.host))

    @endpoint(m.VtpcmPlacement, host_signed=True)
    def replace_vtpcm(self, req: m.VtpcmPlacement, signer: str) -> m.VtpcmRecord:
        return vtpcm_info(self.coordinator.replace_vtpcm(req.instance_uuid, req.host,
                                                         requested_by=signer))

    @endpoint(m.InstanceRef, host_signed=True)
    def shelve_vtpcm(self, req: m.InstanceRef, signer: str) -> m.VtpcmRecord:
        return vtpcm_info(self.coordinator.shelve_vtpcm(req.instance_uuid,
                                                        requested_by=signer))

    @endpoint(m.VtpcmPlacement, host_signed=True)
    def unshelve_vtpcm(self, req: m.VtpcmPlacement, signer: str) -> m.VtpcmRecord:
        return vtpcm_info(self.coordinator.unshelve_vtpcm(req.instance_uuid, req.host,
                                                          requested_by=signer))

    @endpoint(m.InstanceRef, host_signed=True)
    def destroy_vtpcm(self, req: m.InstanceRef, signer: str) -> m.Empty:
        self.coordinator.destroy_vtpcm(req.instance_uuid, requested_by=signer)
        return m.Empty()

    @endpoint(m.InstanceRef, host_signed=True)
    def start_vtpcm(self, req: m.InstanceRef, signer: str) -> m.VtpcmStatus:
        return vtpcm_status(*self.coordinator.start_vtpcm(req.instance_uuid,
                                                          requested_by=signer))

    @endpoint(m.InstanceRef, host_signed=True)
    def stop_vtpcm(self, req: m.InstanceRef, signer: str) -> m.VtpcmStatus:
        return vtpcm_status(*self.coordinator.stop_vtpcm(req.instance_uuid,
                                                         requested_by=signer))

    @endpoint(m.InstanceRef)
    def get_vtpcm(self, req: m.InstanceRef) -> m.VtpcmRecord:
        return vtpcm_info(self.db.get_vtpcm(req.instance_uuid))

    @endpoint(m.VtpcmQuery)
    def list_vtpcms(self, req: m.VtpcmQuery) -> m.VtpcmList:
        return m.VtpcmList(tuple(vtpcm_info(r) for r in self.db.list_vtpcms(host=req.host)
                                 if req.state is None or r.state == req.state))

    @endpoint(m.ApiWitness, witness_signed=True)
    def record_api_witness(self, req: m.ApiWitness, signer: Witnessed) -> m.Empty:
        """nova-api accepted an unshelve (onto ``req.host`` if it named one)
        or a delete of the server: kept for one move at unshelve, or one
        shred by the reaper (``shelving``)."""
        self.db.record_witness("%s:%s" % (signer.key, signer.nonce), req.instance_uuid,
                               req.action, req.host, signer.key, signer.requested_at,
                               db_api.utcnow(), req.project_id, req.user_id)
        self.db.audit("vtpcm.witness", "recorded", host=req.host,
                      instance=req.instance_uuid,
                      detail="%s requested at %s by user %s of project %s (roles %s; "
                             "nova-api key %s)"
                             % (req.action, signer.requested_at.isoformat(), req.user_id,
                                req.project_id, req.roles, signer.key))
        return m.Empty()

    @endpoint(m.InstanceRef, signed=True)
    def destroy_shelved_vtpcm(self, req: m.InstanceRef) -> m.Empty:
        """An operator's decision that a shelved instance is gone (Nova
        deleted it while SHELVED_OFFLOADED, which never reaches the
        driver): the engine has the holder shred it."""
        self.coordinator.destroy_shelved_vtpcm(req.instance_uuid)
        return m.Empty()

    @endpoint(m.CheckDestination, host_signed=True)
    def check_destination(self, req: m.CheckDestination, signer: str) -> m.Verdict:
        return verdict_info(self.coordinator.check_destination(req.instance_uuid, req.dest))

    @endpoint(m.BeginMigration, host_signed=True)
    def begin(self, req: m.BeginMigration, signer: str) -> m.MigrationInfo:
        # the coordinator refuses unless req.source is (still) where the
        # vTPCM lives, i.e. the signer
        return migration_info(self.coordinator.begin(req.migration_id, req.instance_uuid,
                                                     req.source, req.dest))

    @endpoint(m.CommitMigration, host_signed=True)
    def commit(self, req: m.CommitMigration, signer: str) -> m.MigrationInfo:
        return migration_info(self.coordinator.commit(req.migration_id, requested_by=signer,
                                                      shred_later=req.shred_later))

    @endpoint(m.MigrationRef, host_signed=True)
    def transfer_state(self, req: m.MigrationRef, signer: str) -> m.MigrationInfo:
        return migration_info(self.coordinator.transfer(req.migration_id,
                                                        requested_by=signer))

    @endpoint(m.MigrationRef, host_signed=True)
    def start_incoming(self, req: m.MigrationRef, signer: str) -> m.VtpcmStatus:
        host, info = self.coordinator.start_incoming(req.migration_id, requested_by=signer)
        return vtpcm_status(host, info)

    @endpoint(m.AbortMigration, host_signed=True)
    def abort(self, req: m.AbortMigration, signer: str) -> m.MigrationInfo:
        return migration_info(self.coordinator.abort(req.migration_id, req.reason,
                                                     instance_uuid=req.instance_uuid,
                                                     requested_by=signer))

    @endpoint(m.SwtpmRestartReport, host_signed=True)
    def report_swtpm_restart(self, req: m.SwtpmRestartReport, signer: str) -> m.Empty:
        """Audit an agent's swtpm restart; refused for a vTPCM the engine
        does not place on that host (a host reports on its own only)."""
        rec = self.db.get_vtpcm(req.instance_uuid)
        hosts = {rec.host}
        if rec.migration_id is not None:  # the incoming side reports too
            mig = self.db.get_migration(rec.migration_id)
            hosts |= {mig.source, mig.dest}
        if signer not in hosts:
            raise exception.VTPCMNotHere(instance_uuid=req.instance_uuid, holder=rec.host,
                                         host=signer, reason="a host reports on its own "
                                                             "vTPCMs only")
        self.db.audit("vtpcm.swtpm", req.outcome, host=signer, instance=req.instance_uuid,
                      detail=("vTPCM %s (%s): %s" % (req.vtpcm_id, req.state,
                                                     req.detail))[:4000])
        return m.Empty()

    # operator decisions ------------------------------------------------------------
    @endpoint(m.ResolveMigration, signed=True)
    def resolve_migration(self, req: m.ResolveMigration) -> m.Resolution:
        plan, state = self.resolver.resolve_migration(req.migration_id, req.to, req.execute,
                                                      past_commit=req.past_commit,
                                                      despite_import_check=(
                                                          req.despite_import_check))
        return m.Resolution(action=plan.action, plan=plan.text[:4000], done=req.execute,
                            state=state)

    @endpoint(m.ForgetHost, signed=True)
    def forget_host(self, req: m.ForgetHost) -> m.Resolution:
        plan = self.resolver.forget_host(req.host, req.execute,
                                         despite_unverified=req.despite_unverified_answers)
        return m.Resolution(action=plan.action, plan=plan.text[:4000], done=req.execute,
                            state=None)

    @endpoint(m.MigrationRef)
    def get_migration(self, req: m.MigrationRef) -> m.MigrationInfo:
        return migration_info(self.coordinator.get_migration(req.migration_id))
