"""The vTPCM side of the Nova functional tests: a real vtpcm-engine, real
vtpcm-agents with real swtpm, a swtpm host-TPM stand-in per host, on the local
RabbitMQ. Nova's own harness (in-process, fake libvirt) runs beside it and
reaches it through the driver and the filter, as nova-compute and
nova-scheduler would.

Host names are the Nova compute host names. Agents expose each vTPCM's TPM
data socket (``[agent] expose_data_socket``) so the tests can read and write
the guest-visible TPM state with tpm2-pytss.
"""

import contextlib
import dataclasses
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.functional.harness import ClusterHost
from tests.nova_functional.novafront import NovaFront
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.swtpm import process
from vtpcm_common import authn, exception
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab import daemons
from vtpcm_lab.hosttpm import BOOT_PCRS, HostTPMStandIn, measured_boot

GOLDEN = "nova-golden"


@dataclasses.dataclass
class Host(ClusterHost):
    """A host of the functional tests' agent clusters, plus what the Nova
    tests need: its command key, its vTPCMs' TPM data sockets, its logs."""

    @property
    def state_dir(self) -> Path:
        return self.state_root

    @property
    def command_key(self) -> Path:
        return self.state_dir / "host-command.key"

    def data_paths(self, instance: str) -> process.SwtpmPaths:
        """What tpm2-pytss needs to talk to the instance's vTPCM on this host."""
        return process.SwtpmPaths.for_data_socket(
            self.state_dir, self.run_dir / instance, self.run_dir / (instance + ".pid"),
            self.state_dir / "unused.log")

    def logs(self) -> list[Path]:
        """The agent's log and every swtpm log of this host."""
        return [Path(self.agent.log_file), *sorted((self.state_dir / "logs").glob("*"))]

    def untrust(self) -> None:
        """Something unmeasured ran: PCR 7 no longer matches the golden policy."""
        with HostTPM(self.tpm.tcti) as tpm:
            tpm.extend_pcr(7, b"\x66" * 32)


@dataclasses.dataclass
class Deployment:
    exchange: str
    conf: Any  # client options of this deployment (topics, exchange, keys)
    operator: EngineAPI  # the operator's key, no host key
    agents: AgentAPI  # engine-signed agent calls (tests only)
    engine: daemons.EngineDaemon
    hosts: dict[str, Host]
    nova: NovaFront  # where the engine's [nova] client asks Nova's API
    # nova-api's witness key when the engine requires witnesses (else None)
    witness_key: Path | None = None
    _at: dict[str, EngineAPI] = dataclasses.field(default_factory=dict)

    def nova_api(self, signer: authn.CommandSigner | None = None) -> EngineAPI:
        """The engine as nova-api's vtpcm_witness filter calls it (its
        witness key, or ``signer``)."""
        if signer is None:
            assert self.witness_key is not None, "a deployment without witnesses"
            signer = authn.load_signing_key(self.witness_key)
        return EngineAPI(self.conf, self.operator.transport, timeout=30,
                         witness_signer=signer)

    def engine_at(self, host: str) -> EngineAPI:
        """The engine as the driver on ``host`` calls it (that host's key)."""
        api = self._at.get(host)
        if api is None:
            api = EngineAPI(self.conf, self.operator.transport, timeout=60,
                            host_signer=authn.load_host_key(self.hosts[host].command_key))
            self._at[host] = api
        return api

    def vtpcm_on(self, host: str, instance: str) -> Any:
        """The agent's record of the instance's vTPCM on ``host``, None if it
        has none. A copy the engine shreds after the commit's answer (engine
        API 1.11: MIGRATING_OUT of a migration the engine shows SHREDDING)
        is waited for, up to 30 s."""
        deadline = time.monotonic() + 30
        while True:
            try:
                info = self.agents.get(host, instance)
            except exception.NotFound:
                return None
            if info.state == "DESTROYED":
                return None
            if not (info.state == "MIGRATING_OUT" and info.migration_id
                    and self.operator.get_migration(info.migration_id).state == "SHREDDING"
                    and time.monotonic() < deadline):
                return info
            time.sleep(0.05)


@contextlib.contextmanager
def deployment(labels: tuple[str, ...] = ("a", "b", "c"), *,
               reconcile_interval: int = 0, witness: bool = False,
               witness_max_age: int = 600) -> Iterator[Deployment]:
    """Engine + one agent per label, enrolled, approved, golden policy
    assigned; the engine's ``[nova]`` points at a ``NovaFront`` (the test
    plugs in the API behind it); ``reconcile_interval``: the engine's
    periodic reconcile (0: none), and as often its reaper of deleted
    shelved vTPCMs (``[nova] reap_interval``). ``witness``: the engine
    requires nova-api's witnesses (``[nova] require_api_witness``, the
    shipped default) and pins a witness key made here; without it the
    engine takes Nova's view alone (``require_api_witness = false``), what
    the tests written before engine API 1.12 check."""
    work = daemons.short_dir("vtnf")
    exchange = "vtpcm-nf-" + uuid.uuid4().hex[:8]
    conf = daemons.client_conf(exchange)
    agents = AgentAPI(conf, timeout=30)
    operator = EngineAPI(conf, agents.transport, timeout=60)
    nova = NovaFront()
    witness_key = None
    witness_opts: dict[str, Any] = {"require_api_witness": "false"}
    if witness:
        witness_key = work / "nova-api-witness.key"
        authn.load_or_create_signing_key(witness_key)
        witness_opts = {"require_api_witness": "true",
                        "api_witness_public_keys": str(authn.public_key_path(witness_key)),
                        "witness_max_age": witness_max_age}
    engine = daemons.EngineDaemon(
        work, exchange, "sqlite:///%s/engine.sqlite" % work,
        extra={"attestation": {"auto_approve": "true", "verdict_ttl": 600},
               "nova": {**nova.engine_options(), "reap_interval": reconcile_interval,
                        **witness_opts},
               "migration": {"reconcile_interval": reconcile_interval}})
    started: list[object] = [nova]
    hosts: dict[str, Host] = {}
    try:
        nova.start()
        for label in labels:
            name = "nf%s-%s" % (label, uuid.uuid4().hex[:6])
            tpm = HostTPMStandIn(work / ("tpm-" + label), name=name)
            tpm.start()
            started.append(tpm)
            measured_boot(tpm.tcti)
            run_dir = work / ("run-" + label)
            agent = daemons.AgentDaemon(
                work, name, exchange, tpm.tcti, run_dir=run_dir,
                extra={"agent": {"register_with_engine": "false",
                                 "expose_data_socket": "true"}})
            agent.start()
            started.append(agent)
            hosts[name] = Host(name, tpm, agent, run_dir)
        engine.start()
        started.append(engine)
        for host in hosts.values():
            host.agent.wait_ready(agents)
        engine.wait_ready(operator)
        for name in hosts:
            assert operator.enroll(name).status == "APPROVED"
        first = next(iter(hosts))
        operator.record_policy(GOLDEN, first, BOOT_PCRS, "nova functional golden boot")
        for name in hosts:
            operator.assign_policy(name, GOLDEN)
            assert operator.attest(name).status == "TRUSTED"
        yield Deployment(exchange, conf, operator, agents, engine, hosts, nova, witness_key)
    finally:
        # agents before their swtpm: an agent's watchdog reports one that dies
        for proc in reversed(started):
            if not isinstance(proc, HostTPMStandIn):
                proc.stop()  # type: ignore[attr-defined]
        for host in hosts.values():
            daemons.kill_pidfiles(host.run_dir)
        for proc in reversed(started):
            if isinstance(proc, HostTPMStandIn):
                proc.cleanup()
        agents.transport.cleanup()
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
