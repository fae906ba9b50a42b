"""Assemble the engine from its configuration; run RPC and periodic tasks."""

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import oslo_messaging as messaging
from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine import rpcapi
from vtpcm_nova.engine import ekcert, novaapi
from vtpcm_nova.engine.attestation import Attestor
from vtpcm_nova.engine.coordinator import BEGIN_STEP_SLACK, Coordinator, worker_id
from vtpcm_nova.engine.db.api import Database
from vtpcm_nova.engine.manager import NO_ADMIN_KEYS, AgentAttestationClient, EngineManager
from vtpcm_nova.engine.registrations import Registrations
from vtpcm_nova.engine.replykeys import EnrolledReplyKeys
from vtpcm_nova.engine.shelving import WITNESS_NOT_CONFIGURED, WitnessPolicy

LOG = logging.getLogger(__name__)
# An engine run renews its lease this many times per lease TTL: a renewal
# or two may fail (a database hiccup) before the lease lapses.
LEASE_RENEWALS = 4


def admin_verifier_from(conf: cfg.ConfigOpts) -> authn.CommandVerifier | authn.RefuseAll:
    """The check of operator signatures on admin calls, bound to the engine
    topic (any worker may answer). Without keys the engine still starts (the
    Nova-facing and read-only methods work) but refuses every admin call; a
    configured key that cannot be read stops the start, naming it."""
    paths = [Path(p) for p in conf.engine.admin_public_keys if p.strip()]
    if not paths:
        LOG.warning("No operator keys configured ([engine] admin_public_keys): every "
                    "admin call (enroll, approve, revoke, policies) will be refused")
        return authn.RefuseAll(NO_ADMIN_KEYS)
    try:
        return authn.CommandVerifier(paths, rpc.topic(conf, "engine_topic"),
                                     signer_role="operator", service_role="engine",
                                     server_kind="engine topic")
    except exception.InvalidInput as err:
        raise exception.InvalidInput(
            reason="[engine] admin_public_keys: %s" % err.kwargs.get("reason", err)) from None


def witness_verifier_from(conf: cfg.ConfigOpts) -> authn.CommandVerifier | None:
    """The check of nova-api's witnesses (``record_api_witness``), bound to
    the engine topic; None without keys (witnesses are then refused, and
    with ``[nova] require_api_witness`` so is every unshelve elsewhere: a
    WARNING says so at the start). A key that cannot be read stops the
    start, naming the option."""
    paths = [Path(p) for p in conf.nova.api_witness_public_keys if p.strip()]
    if not paths:
        if conf.nova.require_api_witness:
            LOG.warning("%s: every unshelve onto another host than the holder will be "
                        "refused, and the reaper only reports", WITNESS_NOT_CONFIGURED)
        return None
    try:
        return authn.CommandVerifier(paths, rpc.topic(conf, "engine_topic"),
                                     signer_role="nova-api witness", service_role="engine",
                                     server_kind="engine topic")
    except exception.InvalidInput as err:
        raise exception.InvalidInput(
            reason="[nova] api_witness_public_keys: %s"
                   % err.kwargs.get("reason", err)) from None


def ek_cas_from(conf: cfg.ConfigOpts) -> list[Any]:
    """The trusted EK CAs; without them enrollment cannot tell a TPM's AK
    from a software key, which the operator must know."""
    path = conf.attestation.ek_ca_file
    if not path:
        LOG.warning("EK certificates are not checked ([attestation] ek_ca_file is not set): "
                    "enrollment cannot prove a host's attestation key is a TPM key; "
                    "approve hosts only after checking them out of band")
        return []
    try:
        cas = ekcert.load_ca_file(path)
    except exception.InvalidInput as err:
        raise exception.InvalidInput(
            reason="[attestation] ek_ca_file: %s" % err.kwargs.get("reason", err)) from None
    LOG.info("Enrollment requires EK certificates from %(n)d CA(s) in %(path)s",
             {"n": len(cas), "path": path})
    return cas


def nova_from(conf: cfg.ConfigOpts) -> novaapi.NovaServers | None:
    """The engine's client of Nova's API, or None (with a warning: shelved
    vTPCMs then move only back onto their holder, and are never reaped)."""
    nova = novaapi.from_conf(conf)
    if nova is None:
        LOG.warning("[nova] auth_type is not set: the engine cannot ask Nova's API, so it "
                    "refuses every unshelve of a vTPCM onto another host than its holder "
                    "and never destroys the shelved vTPCM of a deleted instance "
                    "(vtpcm-manage vtpcm destroy does)")
    return nova


def agent_answers(agents: AgentAPI, timeout: float) -> Callable[[str], bool]:
    """Whether a host's agent answers ``health`` within ``timeout``: a hint
    only (the answer is unsigned), asked before enrolling an announced
    name so that names no agent serves cost seconds, not rpc_timeout."""
    def answers(host: str) -> bool:
        try:
            agents.health(host, timeout=timeout)
        except (exception.VTPCMException, messaging.MessagingException):
            return False
        return True
    return answers


class EngineService:
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        # Checked first: a bad key path stops the start before anything opens.
        self.admin_verifier = admin_verifier_from(conf)
        self.ek_cas = ek_cas_from(conf)
        self.witness_verifier = witness_verifier_from(conf)
        self.db = Database(conf.engine.connection)
        if isinstance(self.admin_verifier, authn.CommandVerifier):
            # one nonce table for all workers: a captured admin command is
            # refused by every worker, also after a restart
            self.admin_verifier.remember_nonces_in(self.db)
        # compute-node calls: keys per call, from the hosts' enrollment
        self.host_verifier = authn.CommandVerifier(
            None, rpc.topic(conf, "engine_topic"), signer_role="host command",
            service_role="engine", server_kind="engine topic")
        self.host_verifier.remember_nonces_in(self.db)
        if self.witness_verifier is not None:
            self.witness_verifier.remember_nonces_in(self.db)
        self.transport = rpc.get_transport(conf)
        self.signer = authn.load_or_create_signing_key(Path(conf.engine.command_signing_key))
        # replies count only if signed by the host's enrolled command key
        self.agents = AgentAPI(conf, self.transport, timeout=conf.engine.rpc_timeout,
                               signer=self.signer, reply_keys=EnrolledReplyKeys(self.db))
        att = conf.attestation
        client = AgentAttestationClient(self.agents)
        self.attestor = Attestor(self.db, lambda: client, verdict_ttl=att.verdict_ttl,
                                 nonce_ttl=att.nonce_ttl, reboot_policy=att.reboot_policy,
                                 ek_cas=self.ek_cas,
                                 require_kem_pcr_binding=att.require_kem_pcr_binding,
                                 require_certified_parents=att.require_certified_parents)
        # a begin in flight is this run's, and this run holds a lease while
        # it lives: once it lapses, reconcile knows the begins of this run
        # never return (coordinator.begin_abandoned)
        self.worker = worker_id(conf.engine.host)
        self.coordinator = Coordinator(self.db, self.agents, self.attestor,
                                       timeout=conf.migration.timeout,
                                       post_import_check=conf.engine.post_import_check,
                                       require_stream_check=(
                                           conf.engine.require_stream_check),
                                       nova=nova_from(conf),
                                       deleted_confirmations=conf.nova.deleted_confirmations,
                                       worker=self.worker,
                                       begin_step_bound=conf.engine.rpc_timeout
                                       + BEGIN_STEP_SLACK,
                                       reconcile_interval=conf.migration.reconcile_interval,
                                       reap_interval=conf.nova.reap_interval,
                                       reap_max_checks=conf.nova.reap_max_checks,
                                       reap_budget=conf.nova.reap_budget,
                                       witness=WitnessPolicy(
                                           required=conf.nova.require_api_witness,
                                           keys_configured=self.witness_verifier is not None,
                                           max_age=conf.nova.witness_max_age,
                                           admin_projects=frozenset(
                                               p.strip() for p in
                                               conf.nova.witness_admin_projects
                                               if p.strip())))
        self.manager = EngineManager(self.db, self.attestor, self.coordinator,
                                     auto_approve=att.auto_approve,
                                     default_policy=att.default_policy,
                                     admin_verifier=self.admin_verifier,
                                     host_verifier=self.host_verifier,
                                     witness_verifier=self.witness_verifier,
                                     signer=self.signer,
                                     max_unsigned_attestations=conf.engine.max_unsigned_attestations,
                                     min_unsigned_interval=att.min_unsigned_interval)
        reg = conf.engine
        self.registrations = None
        if reg.registration_workers:
            self.registrations = Registrations(
                self.manager.enroll_registered, workers=reg.registration_workers,
                backlog=reg.registration_backlog,
                per_host_interval=reg.registration_interval,
                answers=agent_answers(AgentAPI(conf, self.transport),
                                      reg.registration_probe_timeout))
            self.manager.registrations = self.registrations
        self.server: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        topic = rpc.topic(self.conf, "engine_topic")
        target = messaging.Target(topic=topic, server=self.conf.engine.host)
        self.server = messaging.get_rpc_server(
            self.transport, target, [self.manager],
            access_policy=messaging.DefaultRPCAccessPolicy)
        if self.registrations is not None:
            self.registrations.start()
        # the lease first: no begin of this run is ever recorded without one
        self._start_lease()
        self.server.start()
        # Finish what a previous run left half-done, without holding up the
        # start: an agent that is down must not keep the engine from serving.
        self._once("reconcile-at-start", self.coordinator.reconcile)
        att, mig = self.conf.attestation, self.conf.migration
        if att.interval:
            self._periodic("attest-all", att.interval, att.jitter, self._attest_all)
        if mig.reconcile_interval:
            self._periodic("reconcile", mig.reconcile_interval, 0, self.coordinator.reconcile)
        if self.conf.nova.reap_interval:
            # its own thread: Nova's answers never hold up migration reconcile
            self._periodic("reap-deleted", self.conf.nova.reap_interval, 0,
                           self.coordinator.reap_deleted_shelved)
        LOG.info("vtpcm-engine %(host)s serving topic %(topic)s (API %(v)s); agent "
                 "commands signed with key %(key)s (public key %(pub)s); admin calls "
                 "accepted from operator keys %(ops)s",
                 {"host": self.conf.engine.host, "topic": topic,
                  "v": rpcapi.RPC_API_VERSION, "key": self.signer.fingerprint,
                  "pub": authn.public_key_path(Path(self.conf.engine.command_signing_key)),
                  "ops": getattr(self.admin_verifier, "fingerprint", "(none)")})

    def _start_lease(self) -> None:
        """Register this run's lease; renewed until ``stop`` has drained the
        RPC server."""
        ttl = self.conf.engine.worker_lease_ttl
        self.db.register_worker(self.worker, self.conf.engine.host, ttl)
        self._periodic("lease", ttl / LEASE_RENEWALS, 0, self._renew_lease)

    def _renew_lease(self) -> None:
        _, lapsed = self.db.renew_worker(self.worker, self.conf.engine.host,
                                         self.conf.engine.worker_lease_ttl)
        if lapsed is not None:
            LOG.warning("The lease of engine run %(w)s had lapsed (%(s).1f s ago, or its "
                        "row was gone): other workers may have aborted its begins in "
                        "flight meanwhile; renewed", {"w": self.worker,
                                                      "s": lapsed.total_seconds()})

    def _attest_all(self) -> None:
        self.attestor.attest_all()
        self.db.purge_nonces()

    def _once(self, name: str, func: Any) -> None:
        thread = threading.Thread(target=self._guarded, args=(name, func), name=name,
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def _periodic(self, name: str, interval: float, jitter: float, func: Any) -> None:
        def loop() -> None:
            while not self._stop.wait(interval + random.uniform(0, jitter)):  # noqa: S311
                self._guarded(name, func)
        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    @staticmethod
    def _guarded(name: str, func: Any) -> None:
        """A background task logs its failure and lives on: a dead periodic
        thread would silently stop deadlines, retries and attestation."""
        try:
            func()
        except exception.VTPCMException as err:
            LOG.warning("Task %(name)s failed: %(err)s", {"name": name, "err": err})
        except Exception:  # noqa: BLE001 - logged with its traceback, task continues
            LOG.exception("Task %(name)s failed unexpectedly", {"name": name})

    def stop(self) -> None:
        """Drain the RPC server, then end the periodic tasks, the lease's
        renewal last among them, and drop the lease."""
        if self.server is not None:
            self.server.stop()
            self.server.wait()
            self.server = None
        # no commit queues a shred any more: the running ones end (bounded),
        # the queued ones are reconcile's
        self.coordinator.stop_background(timeout=10)
        if self.registrations is not None:
            self.registrations.stop()
        # only now: a begin draining above (a step waiting up to [engine]
        # rpc_timeout) kept a renewed lease, so no other worker aborted it
        # as a gone run's; the other tasks ran on as in any moment of a run
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        try:
            # no call of this run runs any more (server.wait): a begin it
            # left recorded is abandoned at once, not after the lease
            self.db.deregister_worker(self.worker)
        except Exception:  # noqa: BLE001 - the lease then lapses by itself
            LOG.exception("Could not drop the lease of engine run %(w)s", {"w": self.worker})
        self.db.dispose()
        LOG.info("vtpcm-engine %(host)s stopped", {"host": self.conf.engine.host})
