"""Assemble the agent from its configuration and run its RPC server.

SIGTERM stops the RPC server only: swtpm processes run in their own sessions
and keep serving their guests; the next agent re-adopts them.
"""

import grp
import pwd
import threading
from pathlib import Path
from typing import Any

import oslo_messaging as messaging
from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_agent import keyauth, manager
from vtpcm_agent import keystore as ks
from vtpcm_agent.announce import Announcer
from vtpcm_agent.association import AssociationList
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.instances import AgentSettings, InstanceManager
from vtpcm_agent.uidranges import qemu_uid_range, uid_range
from vtpcm_agent.watchdog import SwtpmWatchdog
from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.agent import rpcapi
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_common.ratelimit import TokenBucket

LOG = logging.getLogger(__name__)
# seconds a restart report waits for the engine (which answers in milliseconds);
# short, so that an engine that is down does not hold up the agent's stop
REPORT_TIMEOUT = 3.0
# the AK and KEM key blobs (TPM-wrapped), next to the sealed host key
HOST_KEY_BLOBS = "hostkeys.tpm"


def settings_from(conf: cfg.ConfigOpts) -> AgentSettings:
    a = conf.agent
    try:
        uid = pwd.getpwnam(a.socket_user).pw_uid if a.socket_user else None
        gid = grp.getgrnam(a.socket_group).gr_gid if a.socket_group else None
    except KeyError as err:
        raise exception.InvalidInput(reason="[agent] socket user/group: %s" % err) from None
    swtpm_uids = uid_range(a.swtpm_uid_range)
    if a.qemu_uid_range and (a.socket_user or a.socket_group):
        # the socket must be U:U 0660: a shared QEMU user or group as its
        # owner would reach every VM's socket, the point of the QEMU uids
        raise exception.InvalidInput(
            reason="[agent] qemu_uid_range needs socket_user and socket_group unset (each "
                   "socket then belongs to its VM's uid and gid)")
    if a.ctrl_proxy and swtpm_uids is None:
        # the proxy runs as the swtpm's uid and the swtpm's own socket is
        # that uid's alone: without per-VM uids QEMU could bypass it
        raise exception.InvalidInput(reason="[agent] ctrl_proxy needs swtpm_uid_range")
    return AgentSettings(
        ctrl_proxy=a.ctrl_proxy, swtpm_uids=swtpm_uids,
        qemu_uids=qemu_uid_range(a.qemu_uid_range, swtpm_uids),
        host=conf.host, state_root=Path(a.state_dir), run_dir=Path(a.run_dir),
        swtpm_binary=a.swtpm_binary, swtpm_setup_binary=a.swtpm_setup_binary,
        socket_mode=int(a.socket_mode, 8), socket_uid=uid, socket_gid=gid, create_ek=a.create_ek,
        expose_data_socket=a.expose_data_socket,
        max_state_blob_bytes=a.max_state_blob_bytes, timeout=a.swtpm_timeout)


def host_key_provider(conf: cfg.ConfigOpts, host_tpm: HostTPM | None,
                      state_root: Path) -> Any:
    if conf.keystore.host_key_mode == "dev-keyfile":
        if not conf.keystore.dev_keyfile:
            raise exception.InvalidInput(
                reason="[keystore] host_key_mode = dev-keyfile needs [keystore] dev_keyfile")
        return ks.DevKeyFileHostKey(Path(conf.keystore.dev_keyfile))
    if host_tpm is None:
        raise exception.InvalidInput(reason="[keystore] host_key_mode = tpm needs a host TPM")
    ca_file = conf.host_tpm.ek_ca_file
    return ks.TPMSealedHostKey(host_tpm, state_root / "hostkey.sealed",
                               ek_ca_file=Path(ca_file) if ca_file else None,
                               key_file=state_root / HOST_KEY_BLOBS,
                               kem_pcrs=conf.host_tpm.kem_policy_pcrs)


def host_command_key_path(conf: cfg.ConfigOpts) -> Path:
    """Where this host's command key is (see ``[agent] host_command_key``)."""
    return Path(conf.agent.host_command_key or Path(conf.agent.state_dir) / "host-command.key")


def host_signer_from(conf: cfg.ConfigOpts) -> authn.CommandSigner:
    group = conf.agent.host_command_key_group
    try:
        gid = grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        raise exception.InvalidInput(
            reason="[agent] host_command_key_group: no group %r" % group) from None
    return authn.load_or_create_host_key(host_command_key_path(conf), gid=gid)


def verifier_from(conf: cfg.ConfigOpts, host: str) -> authn.CommandVerifier:
    """The check of engine signatures; an agent without one would obey any
    broker client, so it does not start."""
    path = conf.agent.engine_public_key
    if not path:
        raise exception.InvalidInput(
            reason="[agent] engine_public_key is not set: the agent needs the "
                   "vtpcm-engine's command signing public key (<[engine] "
                   "command_signing_key>.pub on the controller) to accept commands")
    try:
        return authn.CommandVerifier(Path(path), host)
    except exception.InvalidInput as err:
        raise exception.InvalidInput(
            reason="[agent] engine_public_key: %s" % err.kwargs.get("reason", err)) from None


def rate_limits_from(conf: cfg.ConfigOpts) -> dict[str, TokenBucket]:
    """The agent's limits on its unsigned TPM calls ([host_tpm])."""
    h = conf.host_tpm
    return {"unsigned_limit": TokenBucket(h.unsigned_calls_per_second,
                                          h.unsigned_calls_burst),
            "activation_limit": TokenBucket(h.credential_activations_per_minute / 60.0, 2)}


class AgentService:
    """One agent: instance manager + RPC server on topic vtpcm-agent."""

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        self.settings = settings_from(conf)
        self.verifier = verifier_from(conf, self.settings.host)
        self.settings.state_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.host_signer = host_signer_from(conf)
        self.host_tpm = HostTPM(conf.host_tpm.tcti)
        provider = host_key_provider(conf, self.host_tpm, self.settings.state_root)
        # the AK and KEM key: children whose auth values derive from the
        # host key, their TPM-wrapped blobs in the state directory
        self.host_tpm.use_key_auth(keyauth.derive(provider.host_key()),
                                   self.settings.state_root / HOST_KEY_BLOBS,
                                   conf.host_tpm.kem_policy_pcrs)
        self.keystore = ks.KeyStore(self.settings.state_root / "keys", provider)
        self.associations = AssociationList(self.settings.state_root / "associations.sqlite")
        # accepted command nonces survive a restart: a captured command
        # cannot be replayed into the next agent process
        self.verifier.remember_nonces_in(self.associations)
        self.instances = InstanceManager(self.settings, self.associations, self.keystore,
                                         self.host_tpm)
        self.transport = rpc.get_transport(conf)
        # restarts go to the engine's audit, signed with this host's key
        engine = EngineAPI(conf, self.transport, host_signer=self.host_signer)
        self.watchdog = SwtpmWatchdog(
            self.instances, conf.agent.swtpm_watchdog_interval, self.settings.host,
            lambda report: engine.report_swtpm_restart(report, timeout=REPORT_TIMEOUT))
        self.server: Any = None
        self.announcer: Announcer | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        self.instances.recover()
        if self.conf.agent.swtpm_watchdog_interval > 0:
            self.watchdog.run_once()  # what died while no agent ran, before serving
        self.watchdog.start()
        topic = rpc.topic(self.conf, "agent_topic")
        target = messaging.Target(topic=topic, server=self.settings.host)
        agent = manager.AgentManager(self.settings.host, self.instances, self.host_tpm,
                                     self.verifier,
                                     authn.public_raw(self.host_signer.public_key),
                                     reply_signer=self.host_signer,
                                     **rate_limits_from(self.conf))
        endpoints = [agent]
        self.server = messaging.get_rpc_server(
            self.transport, target, endpoints,
            access_policy=messaging.DefaultRPCAccessPolicy)
        self.server.start()
        if self.conf.agent.register_with_engine:
            # again with backoff until the engine calls: a flood of
            # register_agent casts may have crowded one announcement out
            engine_api = EngineAPI(self.conf, self.transport)
            self.announcer = Announcer(lambda: engine_api.register_agent(self.settings.host),
                                       agent.engine_contact)
            self.announcer.start()
        LOG.info("vtpcm-agent of host %(host)s serving topic %(topic)s (API %(v)s); "
                 "commands must be signed with engine key %(key)s",
                 {"host": self.settings.host, "topic": topic,
                  "v": rpcapi.RPC_API_VERSION, "key": self.verifier.fingerprint})

    def stop(self) -> None:
        """Stop serving RPC. swtpm processes keep running on purpose."""
        self.watchdog.stop()
        if self.announcer is not None:
            self.announcer.stop()
        if self.server is not None:
            self.server.stop()
            self.server.wait()
            self.server = None
        self.associations.close()
        self.host_tpm.close()
        self._stopped.set()
        LOG.info("vtpcm-agent of host %(host)s stopped; swtpm processes left running",
                 {"host": self.settings.host})

    def wait(self) -> None:
        self._stopped.wait()
