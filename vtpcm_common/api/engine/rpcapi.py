"""Client side of the vtpcm-engine RPC API (topic vtpcm-engine).

API version history:

    1.0 - Initial version: register_agent (cast), enroll, approve_host,
          revoke_host, list_hosts, show_host, assign_policy, put_policy,
          record_policy, list_policies, attest, verdicts, list_audit,
          create_vtpcm, destroy_vtpcm, get_vtpcm, check_destination, begin,
          commit, abort, get_migration.
    1.1 - admin methods require an operator signature: enroll,
          approve_host, revoke_host, assign_policy, put_policy and
          record_policy take an ``auth`` argument signed with an operator
          key for the engine topic (``vtpcm_common/authn.py``); the other
          methods do not (yet).
    1.2 - the compute-node methods (``HOST_METHODS``: create_vtpcm,
          destroy_vtpcm, check_destination, begin, commit, abort) require
          the signature of a host the call concerns, with the host command
          key the engine learnt at enrollment (agent API 1.4).
    1.3 - start_vtpcm, stop_vtpcm (in ``HOST_METHODS``, signed by the host
          holding the vTPCM): the Nova driver starts and stops its vTPCMs
          through the engine, with only its host command key; answer
          ``VtpcmStatus``.
    1.4 - host_command_key (read-only): a host's status and enrolled
          command public key, so the Nova driver can verify another host's
          signed agent replies (agent API 1.6).
    1.5 - transfer_state (in ``HOST_METHODS``, signed by the migration's
          source): cold migration and resize move the vTPCM's encrypted
          blobs source agent -> destination agent through the engine;
          replace_vtpcm (in ``HOST_METHODS``, signed by the named host):
          evacuation with a fresh vTPCM when the operator allows the state
          loss; shelve_vtpcm (signed by the holder) and unshelve_vtpcm
          (signed by the named host): shelve offload and unshelve onto any
          TRUSTED host.
    1.6 - signed_host_command_key (read-only): the answer of
          host_command_key for the caller's nonce, signed with the engine's
          command key (the key agents pin), so the Nova driver takes
          another host's key only from the engine (``[vtpcm]
          engine_public_key``).
    1.7 - resolve_migration, forget_host (in ``ADMIN_METHODS``): the
          operator settles a migration the protocol cannot settle alone
          (``--to source|destination``) or drops the records of a host gone
          for good; each answers a ``Resolution`` (the plan in plain words,
          and whether it ran). report_swtpm_restart (in ``HOST_METHODS``,
          signed by the reporting host): the agent's watchdog puts each
          swtpm restart (or failed restart) into the engine's audit log.
    1.8 - start_incoming (in ``HOST_METHODS``, signed by the migration's
          destination): restart the received incoming vTPCM of a cold
          migration or resize not yet confirmed (TRANSFERRED or IN_DOUBT)
          whose swtpm stopped with its guest, so the guest can start again
          on the destination before the confirm; answer ``VtpcmStatus``.
          list_vtpcms (read-only, by state and host) and
          destroy_shelved_vtpcm (in ``ADMIN_METHODS``, operator-signed):
          find and crypto-shred the vTPCM of an instance deleted while
          shelved offloaded (Nova's delete never reaches the driver then).
          In the same release: resolve_migration ``past_commit`` (back to
          the source's copy past the commit point, for a destination that
          died before committing, revoked) and forget_host
          ``despite_unverified_answers`` (forget a host whose topic gets
          only answers that do not verify). Each of these two fields is
          sent only when true, and then as 1.8: capped at 1.7 the client
          refuses those two decisions (``RPCVersionCapped``) and sends
          every other resolve and forget as 1.7, as before.
    1.9 - trusted_hosts (read-only): the TRUSTED hosts and their verdicts'
          expiry, paged by host name (``TrustedHostsQuery``/``TrustedHosts``,
          at most 10,000 a page): the scheduler filter's query, since a
          ``verdicts`` reply cannot carry more than 10,000 hosts and costs
          ten times more to check. ``verdicts`` stays for other callers.
    1.10 - abort takes the migration's ``instance_uuid`` (sent only when
          given, and then as 1.10): an abort of a migration id the engine
          has no record of (its begin timed out in the caller before the
          engine wrote it), signed by the host holding that instance's
          vTPCM, leaves an ABORTED tombstone, and a begin of that id
          arriving later is refused. Capped at 1.9, the client sends the
          abort without it (as 1.2), as before.
    1.11 - commit ``shred_later`` (``CommitMigration``): answer once the
          destination's commit is recorded (SHREDDING) and shred the
          source's copy right after the answer; sent only when true, and
          then as 1.11 (a client capped below sends the 1.2 commit, whose
          answer waits for the shred).
    1.12 - record_api_witness (``WITNESS_METHODS``, signed with a nova-api
          witness key, ``[nova] api_witness_public_keys`` on the engine):
          nova-api's word that it accepted an unshelve or a delete of a
          server (``ApiWitness``, with who asked: project, user, roles;
          added before 1.12 was released, so no version of its own); an
          unshelve elsewhere, and the reaper's shred, need one when
          ``[nova] require_api_witness`` is set. Older callers never send
          it and keep working.
    1.13 - resolve_migration ``despite_import_check``: ``--to destination``
          runs the post-import check itself and refuses unless it passed;
          this field is the operator's explicit override. Sent only when
          true, and then as 1.13 (capped below, the client refuses that
          decision, ``RPCVersionCapped``).

Each call is prepared with the version that introduced the method in the
form this client sends it (``METHOD_VERSIONS``): the admin methods carry
``auth`` since 1.1, the compute-node methods since 1.2, nova-api's witness
since 1.12. Only those three sets carry ``auth``.

Any engine worker on the topic may answer: the state lives in the database.

The admin methods (``ADMIN_METHODS``) run only when signed by an operator key
the engine trusts (``[engine] admin_public_keys``); the signature is bound to
the engine topic, since no single worker is addressed. This client signs with
the key given as ``admin_signer`` or named by ``[manage] admin_key``.
"""

import types
from pathlib import Path
from typing import TypeVar

import oslo_messaging as messaging
from oslo_config import cfg

from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.engine import messages as m
from vtpcm_common.wire import Message

RPC_API_VERSION = "1.13"

R = TypeVar("R", bound=Message)
# abort with the instance (the tombstone of an unrecorded migration)
ABORT_TOMBSTONE_VERSION = "1.10"
SHRED_LATER_VERSION = "1.11"
WITNESS_VERSION = "1.12"

# State-changing calls that decide which hosts are trusted: operator-signed.
ADMIN_METHODS = frozenset({"enroll", "approve_host", "revoke_host", "assign_policy",
                           "put_policy", "record_policy", "resolve_migration",
                           "forget_host", "destroy_shelved_vtpcm"})
# Calls of the Nova driver on a compute node: signed with that host's key.
HOST_METHODS = frozenset({"create_vtpcm", "destroy_vtpcm", "start_vtpcm", "stop_vtpcm",
                          "check_destination", "begin", "commit", "abort",
                          "transfer_state", "replace_vtpcm", "shelve_vtpcm",
                          "unshelve_vtpcm", "report_swtpm_restart", "start_incoming"})
# nova-api's witnesses of unshelve and delete requests: signed with a key
# only the API nodes hold (``vtpcm_nova/api/witness.py``).
WITNESS_METHODS = frozenset({"record_api_witness"})

# The version each method is prepared with: where it got the form sent today.
METHOD_VERSIONS: dict[str, str] = {
    **dict.fromkeys(("register_agent", "list_hosts", "show_host", "list_policies",
                     "attest", "verdicts", "list_audit", "get_vtpcm", "get_migration"),
                    "1.0"),
    **dict.fromkeys(ADMIN_METHODS, "1.1"),
    **dict.fromkeys(HOST_METHODS, "1.2"),
    "start_vtpcm": "1.3",
    "stop_vtpcm": "1.3",
    "host_command_key": "1.4",
    "transfer_state": "1.5",
    "replace_vtpcm": "1.5",
    "shelve_vtpcm": "1.5",
    "unshelve_vtpcm": "1.5",
    "signed_host_command_key": "1.6",
    "resolve_migration": "1.7",
    "forget_host": "1.7",
    "report_swtpm_restart": "1.7",
    "start_incoming": "1.8",
    "list_vtpcms": "1.8",
    "destroy_shelved_vtpcm": "1.8",
    "trusted_hosts": "1.9",
    "record_api_witness": WITNESS_VERSION,
}


def admin_key_path(conf: cfg.ConfigOpts) -> Path | None:
    """``[manage] admin_key`` if that option is registered and set."""
    try:
        value = conf.manage.admin_key
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
        return None
    return Path(value) if value else None


def admin_signer_from_conf(conf: cfg.ConfigOpts) -> authn.CommandSigner | None:
    """The operator's signer named by ``[manage] admin_key``; None if unset.
    A key that is set but unusable is an error naming the option (never a
    silent fall back to unsigned calls the engine would refuse anyway)."""
    path = admin_key_path(conf)
    if path is None:
        return None
    try:
        return authn.load_signing_key(path)
    except exception.InvalidInput as err:
        raise exception.InvalidInput(
            reason="[manage] admin_key: %s" % err.kwargs.get("reason", err)) from None


class EngineAPI(rpc.Client):
    API_VERSION = RPC_API_VERSION
    UPGRADE_LEVEL = "vtpcm_engine"

    def __init__(self, conf: cfg.ConfigOpts, transport: messaging.Transport | None = None,
                 timeout: float = 120.0,
                 admin_signer: authn.CommandSigner | None = None,
                 host_signer: authn.CommandSigner | None = None,
                 version_cap: str | None | types.EllipsisType = ...,
                 exchange: str | None = None,
                 witness_signer: authn.CommandSigner | None = None,
                 retry: int | None = None) -> None:
        """``admin_signer``: an operator key; without one the key named by
        ``[manage] admin_key`` is used if set. Without either, admin calls go
        out unsigned and the engine refuses them. The signer is bound to the
        engine topic and signs ``ADMIN_METHODS`` only.

        ``host_signer``: the command key of the compute host this client
        runs on (``[agent] host_command_key``); it signs ``HOST_METHODS``.
        Without it those calls go out unsigned and the engine refuses them.

        ``version_cap``: default ``[upgrade_levels] vtpcm_engine``.

        ``witness_signer``: nova-api's witness key (``[vtpcm]
        api_witness_key_file``); it signs ``WITNESS_METHODS`` only.

        ``retry``: connection retries of a send (``rpc.RpcClient``)."""
        topic = rpc.topic(conf, "engine_topic")
        if admin_signer is None:
            admin_signer = admin_signer_from_conf(conf)
        signer = admin_signer.for_server(topic) if admin_signer is not None else None
        self.host_signer = host_signer.for_server(topic) if host_signer is not None else None
        self.witness_signer = (witness_signer.for_server(topic)
                               if witness_signer is not None else None)
        super().__init__(conf, topic, transport, timeout, signer, version_cap, exchange,
                         retry=retry)

    def _ask(self, method: str, request: Message, reply_type: type[R],
             timeout: float | None = None) -> R:
        signer = (self.host_signer if method in HOST_METHODS
                  else self.signer if method in ADMIN_METHODS
                  else self.witness_signer if method in WITNESS_METHODS else None)
        return self._call(method, METHOD_VERSIONS[method], request, reply_type,
                          timeout=timeout, signer=signer)

    def register_agent(self, host: str) -> None:
        self._cast("register_agent", METHOD_VERSIONS["register_agent"], m.HostRef(host))

    def enroll(self, host: str) -> m.HostInfo:
        return self._ask("enroll", m.HostRef(host), m.HostInfo)

    def approve_host(self, host: str) -> m.HostInfo:
        return self._ask("approve_host", m.HostRef(host), m.HostInfo)

    def revoke_host(self, host: str) -> m.HostInfo:
        return self._ask("revoke_host", m.HostRef(host), m.HostInfo)

    def list_hosts(self, timeout: float | None = None) -> m.HostList:
        return self._ask("list_hosts", m.Empty(), m.HostList, timeout=timeout)

    def show_host(self, host: str) -> m.HostInfo:
        return self._ask("show_host", m.HostRef(host), m.HostInfo)

    def host_command_key(self, host: str) -> m.HostCommandKey:
        return self._ask("host_command_key", m.HostRef(host), m.HostCommandKey)

    def signed_host_command_key(self, host: str, nonce: bytes) -> m.SignedHostCommandKey:
        """The engine-signed answer; the caller checks the signature."""
        return self._ask("signed_host_command_key", m.HostKeyQuery(host, nonce),
                         m.SignedHostCommandKey)

    def assign_policy(self, host: str, policy_name: str | None) -> m.HostInfo:
        return self._ask("assign_policy", m.AssignPolicy(host, policy_name), m.HostInfo)

    def put_policy(self, policy: m.PolicyInfo) -> m.PolicyInfo:
        return self._ask("put_policy", policy, m.PolicyInfo)

    def record_policy(self, name: str, host: str, pcrs: tuple[int, ...],
                      description: str = "") -> m.PolicyInfo:
        return self._ask("record_policy", m.RecordPolicy(name, host, tuple(pcrs),
                                                          description), m.PolicyInfo)

    def list_policies(self) -> m.PolicyList:
        return self._ask("list_policies", m.Empty(), m.PolicyList)

    def attest(self, host: str) -> m.Verdict:
        return self._ask("attest", m.HostRef(host), m.Verdict)

    def verdicts(self, timeout: float | None = None) -> m.VerdictList:
        """All fresh verdicts in one call (the scheduler filter's only query)."""
        return self._ask("verdicts", m.Empty(), m.VerdictList, timeout=timeout)

    def trusted_hosts(self, after: str | None = None, limit: int = m.TRUSTED_PAGE_MAX,
                      timeout: float | None = None) -> m.TrustedHosts:
        """One page of TRUSTED hosts (1.9); ``scheduler.verdicts`` pages on."""
        return self._ask("trusted_hosts", m.TrustedHostsQuery(after, limit), m.TrustedHosts,
                         timeout=timeout)

    def list_audit(self, limit: int = 100, host: str | None = None) -> m.AuditList:
        return self._ask("list_audit", m.AuditQuery(limit, host), m.AuditList)

    def create_vtpcm(self, instance_uuid: str, host: str) -> m.VtpcmRecord:
        return self._ask("create_vtpcm", m.VtpcmPlacement(instance_uuid, host),
                          m.VtpcmRecord)

    def replace_vtpcm(self, instance_uuid: str, host: str) -> m.VtpcmRecord:
        """Evacuation: abandon the vTPCM of the failed host holding it and
        create a fresh one on ``host`` (this client's host). State loss."""
        return self._ask("replace_vtpcm", m.VtpcmPlacement(instance_uuid, host),
                          m.VtpcmRecord)

    def shelve_vtpcm(self, instance_uuid: str) -> m.VtpcmRecord:
        """Shelve offload on the holder (this client's host): stop the
        vTPCM and let a later unshelve move it to another TRUSTED host."""
        return self._ask("shelve_vtpcm", m.InstanceRef(instance_uuid), m.VtpcmRecord)

    def unshelve_vtpcm(self, instance_uuid: str, host: str) -> m.VtpcmRecord:
        """Unshelve onto ``host`` (this client's host): the shelved vTPCM is
        live again there, moved from its holder if need be; a move only
        while Nova's API shows Nova unshelving the instance onto ``host``
        (else ``UnshelveNotAuthorized``; same API version, the engine asks)."""
        return self._ask("unshelve_vtpcm", m.VtpcmPlacement(instance_uuid, host),
                          m.VtpcmRecord)

    def destroy_vtpcm(self, instance_uuid: str) -> m.Empty:
        return self._ask("destroy_vtpcm", m.InstanceRef(instance_uuid), m.Empty)

    def start_vtpcm(self, instance_uuid: str) -> m.VtpcmStatus:
        """Start the vTPCM's swtpm on the host holding it (this client's
        host); an already running one is left as it is."""
        return self._ask("start_vtpcm", m.InstanceRef(instance_uuid), m.VtpcmStatus)

    def stop_vtpcm(self, instance_uuid: str) -> m.VtpcmStatus:
        """Stop the vTPCM's swtpm (its state stays); a stopped one stays so."""
        return self._ask("stop_vtpcm", m.InstanceRef(instance_uuid), m.VtpcmStatus)

    def get_vtpcm(self, instance_uuid: str) -> m.VtpcmRecord:
        return self._ask("get_vtpcm", m.InstanceRef(instance_uuid), m.VtpcmRecord)

    def list_vtpcms(self, state: str | None = None,
                    host: str | None = None) -> m.VtpcmList:
        return self._ask("list_vtpcms", m.VtpcmQuery(state, host), m.VtpcmList)

    def destroy_shelved_vtpcm(self, instance_uuid: str) -> m.Empty:
        """Operator-signed: shred a SHELVED vTPCM whose instance is gone."""
        return self._ask("destroy_shelved_vtpcm", m.InstanceRef(instance_uuid), m.Empty)

    def check_destination(self, instance_uuid: str, dest: str) -> m.Verdict:
        return self._ask("check_destination", m.CheckDestination(instance_uuid, dest),
                          m.Verdict)

    def begin(self, migration_id: str, instance_uuid: str, source: str,
              dest: str) -> m.MigrationInfo:
        return self._ask("begin", m.BeginMigration(migration_id, instance_uuid, source,
                                                    dest), m.MigrationInfo)

    def commit(self, migration_id: str, shred_later: bool = False) -> m.MigrationInfo:
        """``shred_later``: answer SHREDDING once the destination committed,
        the source's shred after the answer (1.11); a client capped below
        1.11, or an engine that cannot serve 1.11, gets the 1.2 commit
        instead (the answer waits for the shred)."""
        if shred_later and self.can_send_version(SHRED_LATER_VERSION):
            try:
                return self._call("commit", SHRED_LATER_VERSION,
                                  m.CommitMigration(migration_id, True),
                                  m.MigrationInfo, signer=self.host_signer)
            except exception.RPCVersionUnsupported:
                # an engine older than 1.11 (a rolling upgrade): its commit
                # answers after the shred; the decision is the same
                pass
        return self._ask("commit", m.MigrationRef(migration_id), m.MigrationInfo)

    def transfer_state(self, migration_id: str) -> m.MigrationInfo:
        """Cold migration, resize: move the stopped guest's vTPCM state to
        the prepared destination (signed by the source; answer TRANSFERRED)."""
        return self._ask("transfer_state", m.MigrationRef(migration_id), m.MigrationInfo)

    def start_incoming(self, migration_id: str) -> m.VtpcmStatus:
        """Cold migration, resize before the confirm: start the destination's
        received incoming vTPCM again (signed by the destination)."""
        return self._ask("start_incoming", m.MigrationRef(migration_id), m.VtpcmStatus)

    def abort(self, migration_id: str, reason: str,
              instance_uuid: str | None = None,
              timeout: float | None = None) -> m.MigrationInfo:
        """``instance_uuid`` (1.10, left out by a client capped below):
        lets the engine tombstone a migration it never recorded.
        ``timeout``: wait at most this long for the answer (the client's
        own timeout if that is shorter)."""
        if timeout is not None:
            timeout = min(timeout, self.timeout)
        if instance_uuid is not None and self.can_send_version(ABORT_TOMBSTONE_VERSION):
            return self._call("abort", ABORT_TOMBSTONE_VERSION,
                              m.AbortMigration(migration_id, reason[:1000], instance_uuid),
                              m.MigrationInfo, signer=self.host_signer, timeout=timeout)
        return self._ask("abort", m.AbortMigration(migration_id, reason[:1000]),
                         m.MigrationInfo, timeout=timeout)

    def resolve_migration(self, migration_id: str, to: str, execute: bool = False,
                          past_commit: bool = False,
                          despite_import_check: bool = False) -> m.Resolution:
        version = "1.13" if despite_import_check else "1.8" if past_commit else "1.7"
        return self._call("resolve_migration", version,
                          m.ResolveMigration(migration_id, to, execute, past_commit,
                                             despite_import_check),
                          m.Resolution, signer=self.signer)

    def forget_host(self, host: str, execute: bool = False,
                    despite_unverified_answers: bool = False) -> m.Resolution:
        return self._call("forget_host", "1.8" if despite_unverified_answers else "1.7",
                          m.ForgetHost(host, execute, despite_unverified_answers),
                          m.Resolution, signer=self.signer)

    def report_swtpm_restart(self, report: m.SwtpmRestartReport,
                             timeout: float | None = None) -> m.Empty:
        return self._ask("report_swtpm_restart", report, m.Empty, timeout=timeout)

    def record_api_witness(self, instance_uuid: str, action: str, host: str | None = None,
                           timeout: float | None = None, *,
                           requester: m.ApiWitness | None = None) -> m.Empty:
        """nova-api's signed word that it accepted ``action`` ("unshelve",
        "delete") of the server (1.12), asked by ``requester``'s project,
        user and roles (its other fields are ignored)."""
        who = requester or m.ApiWitness(instance_uuid, action, host)
        return self._ask("record_api_witness",
                         m.ApiWitness(instance_uuid, action, host, who.project_id,
                                      who.user_id, who.roles),
                         m.Empty, timeout=timeout)

    def get_migration(self, migration_id: str) -> m.MigrationInfo:
        return self._ask("get_migration", m.MigrationRef(migration_id), m.MigrationInfo)
