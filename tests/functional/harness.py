"""Test-side names for the daemon helpers (they live in vtpcm_lab.daemons)."""

import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import oslo_messaging as messaging
from cryptography.hazmat.primitives.asymmetric import ed25519

from vtpcm_agent.association import AssociationList, SealRecord
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.keystore import InstanceKeys, KeyStore, TPMSealedHostKey
from vtpcm_agent.swtpm import process
from vtpcm_common import authn, rpc
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_lab.daemons import (
    TRANSPORT_URL,
    AgentDaemon,
    Daemon,
    EngineDaemon,
    client_conf,
    kill_pidfiles,
    short_dir,
    wait_for,
)
from vtpcm_lab.hosttpm import HostTPMStandIn

__all__ = ["TRANSPORT_URL", "AgentDaemon", "ClusterHost", "Daemon", "EngineDaemon",
           "agent_cluster", "client_conf", "random_command_public", "serve_agent_in_process",
           "short_dir", "trust_hosts", "wait_for"]


def agent_seals(agent: AgentDaemon, instance: str) -> list[SealRecord]:
    """The agent's own durable record of the migration keys of ``instance``
    it sealed (its association list), read beside the running daemon."""
    alist = AssociationList(Path(agent.config["agent"]["state_dir"]) / "associations.sqlite")
    try:
        return alist.seals(instance)
    finally:
        alist.close()


@dataclasses.dataclass
class ClusterHost:
    """One host of ``agent_cluster``: ``ClusterHost(*entry)``."""

    name: str
    tpm: HostTPMStandIn
    agent: AgentDaemon
    run_dir: Path

    @property
    def state_root(self) -> Path:
        return Path(self.agent.config["agent"]["state_dir"])

    def keys(self, vtpcm_id: str) -> InstanceKeys:
        """The instance's keys, unwrapped through the host TPM (tests only)."""
        with HostTPM(self.tpm.tcti) as tpm:
            return KeyStore(self.state_root / "keys", TPMSealedHostKey(
                tpm, self.state_root / "hostkey.sealed")).get(vtpcm_id)

    def paths(self, instance: str, vtpcm_id: str) -> process.SwtpmPaths:
        return process.SwtpmPaths.for_data_socket(
            self.state_root / "vtpcms" / vtpcm_id, self.run_dir / instance,
            self.run_dir / (instance + ".pid"), self.state_root / "logs" / (vtpcm_id + ".log"))


@contextlib.contextmanager
def agent_cluster(work: Path, prefix: str, exchange: str, api: AgentAPI,
                  labels: tuple[str, ...] = ("a", "b"), transport_url: str | None = None,
                  agent_extra: dict[str, dict[str, Any]] | None = None,
                  ) -> Iterator[list[tuple[str, HostTPMStandIn, AgentDaemon, Path]]]:
    """Agent daemons with their own host-TPM stand-ins, ready to serve
    (through ``transport_url`` instead of the lab broker if given;
    ``agent_extra``: more configuration groups for every agent).

    Yields (host name, stand-in, agent, run dir) per label. Afterwards the
    agents stop, then the swtpm processes they left running are killed
    through their pid files (in this order: an agent would report each
    swtpm that dies, or commit_incoming restart one), then the stand-ins
    stop, also when the test failed."""
    hosts: list[tuple[str, HostTPMStandIn, AgentDaemon, Path]] = []
    started: list[Any] = []
    try:
        for label in labels:
            name = "%s%s-%s" % (prefix, label, uuid.uuid4().hex[:6])
            tpm = HostTPMStandIn(work / ("tpm-" + label), name=name)
            tpm.start()
            started.append(tpm)
            run_dir = work / ("run-" + label)
            extra: dict[str, dict[str, Any]] = {"agent": {"register_with_engine": "false"}}
            if transport_url is not None:
                extra["DEFAULT"] = {"transport_url": transport_url}
            for group, values in (agent_extra or {}).items():
                extra[group] = {**extra.get(group, {}), **values}
            agent = AgentDaemon(work, name, exchange, tpm.tcti, run_dir=run_dir, extra=extra)
            agent.start()
            started.append(agent)
            agent.wait_ready(api)
            hosts.append((name, tpm, agent, run_dir))
        yield hosts
    finally:
        # agents first: their watchdog would report the swtpm killed below
        for proc in reversed(started):
            if not isinstance(proc, HostTPMStandIn):
                proc.stop()
        for _, _, _, run_dir in hosts:
            kill_pidfiles(run_dir)
        for proc in reversed(started):
            if isinstance(proc, HostTPMStandIn):
                proc.cleanup()  # also removes its socket directory


def serve_agent_in_process(conf: Any, manager: Any) -> Callable[[], None]:
    """Serve an agent endpoint object (a test may bend its answers) on the
    deployment's agent topic as its host, like a daemon; returns the stop."""
    transport = rpc.get_transport(conf)
    server = messaging.get_rpc_server(
        transport, messaging.Target(topic=rpc.topic(conf, "agent_topic"), server=manager.host),
        [manager], access_policy=messaging.DefaultRPCAccessPolicy)
    server.start()

    def stop() -> None:
        server.stop()
        server.wait()
        transport.cleanup()
    return stop


def random_command_public() -> bytes:
    """A host command public key of nobody (for in-process test agents)."""
    return authn.public_raw(ed25519.Ed25519PrivateKey.generate().public_key())


def trust_hosts(operator: Any, names: list[str], pcrs: tuple[int, ...] = (0, 1, 2), *,
                policy: str | None = None, bound: float = 0.0) -> str:
    """Give enrolled, approved hosts a golden policy (``policy``, or a fresh
    name) recorded from the first one's PCRs (the stand-ins' are alike) and
    a fresh TRUSTED verdict, as ``create_vtpcm`` and ``begin`` require.
    ``bound`` > 0: attest again until TRUSTED within that many seconds (a
    short engine RPC timeout can cut a host's first quote, which creates its
    TPM keys). Returns the policy's name."""
    policy = policy or "p-" + uuid.uuid4().hex[:6]
    operator.record_policy(policy, names[0], pcrs, "host-TPM stand-ins")
    for name in names:
        operator.assign_policy(name, policy)
        if bound > 0:
            def trusted(name: str = name) -> bool:
                return bool(operator.attest(name).status == "TRUSTED")
            wait_for("%s attested TRUSTED" % name, trusted, bound)
            continue
        verdict = operator.attest(name)
        assert verdict.status == "TRUSTED", verdict.reason
    return policy

