"""The vTPCM control plane on top of the two-host lab.

Per lab host: a swtpm standing in for the host TPM (measured boot into PCRs
0-7) and a vtpcm-agent whose control sockets live in the host's ``tpm/``
dir, owned by the host's QEMU user. One vtpcm-engine with SQLite. All on the
local RabbitMQ, in an exchange of their own. ``up`` starts from a clean
slate (it stops what a crashed earlier run left behind); ``down`` stops
everything by pid, swtpm processes of the guests included.
"""

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from oslo_log import log as logging

from vtpcm_common import authn
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab import daemons
from vtpcm_lab.hosts import Lab, LabHost
from vtpcm_lab.hosttpm import BOOT_PCRS, HostTPMStandIn, localca_ek_cas, measured_boot
from vtpcm_nova import agentkeys

LOG = logging.getLogger(__name__)
EXCHANGE = "vtpcm-lab"
GOLDEN_POLICY = "lab-golden"
RECONCILE_INTERVAL = 30  # seconds, [migration] reconcile_interval's production default
# [agent] swtpm_uid_range of each lab host: no account uses them, and they lie
# outside systemd's DynamicUser and container ranges and the subuid blocks
SWTPM_UID_RANGES = {"a": "1900100000-1900149999", "b": "1900150000-1900199999"}


@dataclasses.dataclass
class StackHost:
    """One compute host of the lab as the vTPCM services see it."""

    lab_host: LabHost
    name: str
    tpm: HostTPMStandIn
    agent: daemons.AgentDaemon

    @property
    def run_dir(self) -> Path:
        return self.lab_host.tpm_dir

    @property
    def state_dir(self) -> Path:
        return Path(self.agent.config["agent"]["state_dir"])

    def ctrl_socket(self, instance_uuid: str) -> Path:
        return self.run_dir / (instance_uuid + ".ctrl")

    @property
    def command_key(self) -> Path:
        """The host's command key, made by its agent ([agent] host_command_key)."""
        return self.agent.command_key


class Stack:
    def __init__(self, lab: Lab, exchange: str = EXCHANGE, *,
                 agent_extra: dict[str, dict[str, dict[str, Any]]] | None = None,
                 engine_extra: dict[str, dict[str, Any]] | None = None) -> None:
        """``agent_extra`` (by lab host name) and ``engine_extra``: config
        sections merged into the daemons' own (the real-Nova mode's keys)."""
        self.lab = lab
        self.agent_extra = agent_extra or {}
        self.engine_extra = engine_extra or {}
        self.base = lab.base_dir / "vtpcm"
        self.exchange = exchange
        conf = daemons.client_conf(exchange)
        self.agents = AgentAPI(conf, timeout=60)
        self.engine = EngineAPI(conf, timeout=120)
        self.conf = conf
        self.engine_daemon: daemons.EngineDaemon | None = None
        self.hosts: dict[str, StackHost] = {}
        self._host_engines: dict[str, EngineAPI] = {}
        self._host_agents: dict[str, AgentAPI] = {}

    def engine_at(self, host: StackHost) -> EngineAPI:
        """The engine as the Nova driver on ``host`` calls it: compute-node
        calls signed with that host's command key."""
        api = self._host_engines.get(host.name)
        if api is None:
            api = EngineAPI(self.conf, self.engine.transport, timeout=120,
                            host_signer=authn.load_host_key(host.command_key))
            self._host_engines[host.name] = api
        return api

    def agents_at(self, host: StackHost) -> AgentAPI:
        """The agents as the Nova driver on ``host`` reads them
        (``clients.agent_reader``): replies verified with ``host``'s own
        command key, or another host's key as the engine reports it, signed
        with the engine's command key."""
        api = self._host_agents.get(host.name)
        if api is None:
            own = authn.load_host_key(host.command_key).public_key
            # [vtpcm] engine_public_key: the key the lab's agents pin too
            engine_key = authn.load_public_key(authn.public_key_path(
                daemons.ensure_signing_key(self.exchange)))
            api = AgentAPI(self.conf, self.engine.transport, timeout=60, signer=None,
                           reply_keys=agentkeys.EngineReportedKeys(
                               host.name, own, self.engine_at(host), engine_key))
            self._host_agents[host.name] = api
        return api

    @property
    def socket_dirs(self) -> list[str]:
        """Each lab host's swtpm socket dir (two hosts on one machine: two dirs)."""
        return [str(host.run_dir) for host in self.hosts.values()]

    def host(self, lab_host: LabHost) -> StackHost:
        return self.hosts[lab_host.name]

    def up(self) -> None:
        self._kill_leftovers()
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True, mode=0o700)
        # each swtpm uid traverses to its own state (no listing); every file
        # here keeps its own mode
        os.chmod(self.base, 0o711)  # noqa: S103
        try:
            for lab_host in self.lab.hosts:
                name = "lab-" + lab_host.name
                # manufactured like a real host TPM: EKs with certificates
                tpm = HostTPMStandIn(self.base / ("hosttpm-" + lab_host.name), name=name,
                                     with_ek_cert=True)
                tpm.start()
                self._record_pid("hosttpm-" + name, tpm.pid)
                # the lab's TPM "manufacturer": the agent verifies its TPM
                # against it at its first start, the engine at enrollment
                ek_cas = localca_ek_cas(self.base / "ek-cas.pem")
                measured_boot(tpm.tcti)
                # each swtpm as a uid of its own, as in production; the
                # two hosts share one kernel, so their ranges differ
                extra: dict[str, dict[str, Any]] = {
                    "agent": {"expose_data_socket": "false",
                              "register_with_engine": "false",
                              "socket_user": lab_host.user,
                              "swtpm_uid_range": SWTPM_UID_RANGES[lab_host.name],
                              # QEMU reaches swtpm through the agent's proxy
                              "ctrl_proxy": "true"},
                    "host_tpm": {"ek_ca_file": ek_cas}}
                for section, values in self.agent_extra.get(lab_host.name, {}).items():
                    extra.setdefault(section, {}).update(values)
                agent = daemons.AgentDaemon(
                    self.base, name, self.exchange, tpm.tcti, run_dir=lab_host.tpm_dir,
                    extra=extra)
                agent.start()
                self._record(agent)
                self.hosts[lab_host.name] = StackHost(lab_host, name, tpm, agent)
            # the engine trusts the lab's TPM "manufacturer" and no one else
            engine_extra: dict[str, dict[str, Any]] = {
                "attestation": {"verdict_ttl": 300, "ek_ca_file": ek_cas},
                # as in production (the daemons' default of 0 keeps
                # functional tests deterministic): the lab exercises it
                "migration": {"reconcile_interval": RECONCILE_INTERVAL},
                # every lab guest starts behind the proxies: the post-import
                # check compares the blobs QEMU moved, volatile state included
                "engine": {"require_stream_check": True}}
            for section, values in self.engine_extra.items():
                engine_extra.setdefault(section, {}).update(values)
            self.engine_daemon = daemons.EngineDaemon(
                self.base, self.exchange, "sqlite:///%s" % (self.base / "engine.sqlite"),
                extra=engine_extra)
            self.engine_daemon.start()
            self._record(self.engine_daemon)
            for host in self.hosts.values():
                host.agent.wait_ready(self.agents)
            self.engine_daemon.wait_ready(self.engine)
            for host in self.hosts.values():
                self.engine.enroll(host.name)
            first = self.hosts[self.lab.a.name].name
            self.engine.record_policy(GOLDEN_POLICY, first, BOOT_PCRS,
                                      "lab measured boot (PCRs 0-7)")
            for host in self.hosts.values():
                self.engine.assign_policy(host.name, GOLDEN_POLICY)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        for host in self.hosts.values():
            host.agent.stop()
            daemons.kill_pidfiles(host.run_dir)
            host.tpm.cleanup()
        if self.engine_daemon is not None:
            self.engine_daemon.stop()
        self.hosts.clear()
        self._host_engines.clear()
        self.engine_daemon = None
        for pidfile in (self.base / "pids").glob("*.pid") if self.base.exists() else ():
            pidfile.unlink()

    # A crashed earlier run may have left daemons behind: their pids are on disk.
    def _record(self, daemon: daemons.Daemon) -> None:
        self._record_pid(daemon.name, daemon.pid)

    def _record_pid(self, name: str, pid: int | None) -> None:
        if pid is None:
            return
        pids = self.base / "pids"
        pids.mkdir(exist_ok=True)
        (pids / (name + ".pid")).write_text(str(pid))

    def _kill_leftovers(self) -> None:
        daemons.kill_pidfiles(self.base / "pids")
        for lab_host in self.lab.hosts:
            daemons.kill_pidfiles(lab_host.tpm_dir)
