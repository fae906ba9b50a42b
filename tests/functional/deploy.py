"""One builder for the functional tests that stand up a whole deployment:
real engine daemon(s), real agent daemons with swtpm host-TPM stand-ins,
RabbitMQ. The tests differ in how they configure the engine (options,
database, workers, the broker address), so each passes a ``Spec``; what they
share (the isolated exchange, enrollment, the golden policy, each host's
signed engine client, stopping every process by pid also when the test
failed) lives here once.

Also the steps several of these tests take on such a deployment: a running
vTPCM with guest state in it, the QEMU switchover stood in for by the
agents' state collector."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from oslo_config import cfg

from tests.functional import tpmtools
from tests.functional.harness import (
    ClusterHost,
    EngineDaemon,
    agent_cluster,
    client_conf,
    short_dir,
    trust_hosts,
)
from vtpcm_common import authn
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab import daemons

Sections = Mapping[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Trust:
    """Which hosts get a golden PCR policy and a TRUSTED verdict at setup
    (``create_vtpcm`` and ``begin`` need one)."""

    labels: tuple[str, ...] | None = None  # None: every host
    pcrs: tuple[int, ...] = (0, 1, 2)
    policy: str | None = None  # None: a fresh name
    # > 0: attest again until TRUSTED within this many seconds (a short
    # engine RPC timeout can cut a host's first quote, which creates its TPM
    # keys); 0: the first verdict must be TRUSTED
    bound: float = 0.0


@dataclasses.dataclass(frozen=True)
class Spec:
    """What differs between the deployments of the functional tests."""

    name: str  # names the work dir, the exchange and (first two letters) the hosts
    labels: tuple[str, ...] = ("a", "b")
    engine: Sections = dataclasses.field(default_factory=dict)  # more engine config
    workers: int = 1  # engine daemons on the one database, the first one syncs it
    db_url: str | None = None  # None: a SQLite file in the work dir
    transport_url: str | None = None  # the daemons' broker (the tests' clients use the lab's)
    agent: Sections | None = None  # more config for every agent
    trust: Trust | None = Trust()  # None: hosts enrolled only
    agent_timeout: float = 30  # of the test's agent client
    operator_timeout: float = 60  # of the operator's engine client
    host_timeout: float = 60  # of each host's signed engine client (``Deployment.at``)
    keep_work: bool = False  # leave the work dir (logs, databases) for a post-mortem


@dataclasses.dataclass
class Deployment:
    conf: cfg.ConfigOpts  # the tests' client configuration (signed, admin key)
    exchange: str
    work: Path
    db_url: str
    operator: EngineAPI  # admin key, no host key: what a broker client can do
    agents: AgentAPI  # the engine's signing key, replies unverified (a tool)
    hosts: dict[str, ClusterHost]  # label -> host
    at: dict[str, EngineAPI]  # label -> the engine as that host's Nova driver calls it
    engines: list[EngineDaemon]
    policy: str | None  # the golden policy's name (``Spec.trust``)

    @property
    def engine(self) -> EngineDaemon:
        return self.engines[0]

    @property
    def names(self) -> dict[str, str]:
        """label -> host name."""
        return {label: host.name for label, host in self.hosts.items()}

    def host_api(self, label: str, timeout: float) -> EngineAPI:
        """A new engine client signed with the host's command key as it is
        on disk now (after a key rotation too), on the operator's transport."""
        return EngineAPI(self.conf, self.operator.transport, timeout=timeout,
                         host_signer=authn.load_host_key(self.hosts[label].agent.command_key))

    def restart_engine(self, index: int = 0) -> None:
        """Start an engine worker again (after a kill) and wait until it serves."""
        self.engines[index].start()
        self.engines[index].wait_ready(self.operator)

    def restart_agent(self, label: str) -> None:
        agent = self.hosts[label].agent
        agent.start()
        agent.wait_ready(self.agents)


@contextlib.contextmanager
def build(spec: Spec) -> Iterator[Deployment]:
    """The agents (ready), then the engine worker(s) (ready), every host
    enrolled (APPROVED) and ``spec.trust`` applied. Afterwards, also when
    the test failed: the agents stop and their swtpm processes are killed by
    pid file (``agent_cluster``), the engines stop by pid, the clients'
    transports close, the exchange's keys and the work dir go."""
    with contextlib.ExitStack() as stack:
        work = short_dir("vt" + spec.name)
        if not spec.keep_work:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        exchange = "vtpcm-%s-%s" % (spec.name, uuid.uuid4().hex[:8])
        stack.callback(shutil.rmtree, daemons.signing_key_path(exchange).parent,
                       ignore_errors=True)
        conf = client_conf(exchange)
        agents = AgentAPI(conf, timeout=spec.agent_timeout)
        stack.callback(agents.transport.cleanup)
        operator = EngineAPI(conf, timeout=spec.operator_timeout)
        stack.callback(operator.transport.cleanup)
        url = spec.db_url or "sqlite:///%s/engine.sqlite" % work
        extra = {group: dict(values) for group, values in copy.deepcopy(spec.engine).items()}
        if spec.transport_url is not None:
            extra.setdefault("DEFAULT", {})["transport_url"] = spec.transport_url
        engines = [EngineDaemon(work, exchange, url, extra=copy.deepcopy(extra),
                                name="engine" if spec.workers == 1 else "engine%d" % (i + 1),
                                db_sync=i == 0) for i in range(spec.workers)]
        for engine in engines:
            stack.callback(engine.stop)  # by pid; a killed (None) one is skipped
        raw = stack.enter_context(agent_cluster(
            work, spec.name[:2], exchange, agents, labels=spec.labels,
            transport_url=spec.transport_url,
            agent_extra=None if spec.agent is None else
            {group: dict(values) for group, values in spec.agent.items()}))
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_ready(operator)
        hosts = {label: ClusterHost(*h) for label, h in zip(spec.labels, raw, strict=True)}
        for host in hosts.values():
            assert operator.enroll(host.name).status == "APPROVED"
        policy = None
        if spec.trust is not None:
            labels = spec.labels if spec.trust.labels is None else spec.trust.labels
            policy = trust_hosts(operator, [hosts[label].name for label in labels],
                                 spec.trust.pcrs, policy=spec.trust.policy,
                                 bound=spec.trust.bound)
        d = Deployment(conf, exchange, work, url, operator, agents, hosts, {}, engines, policy)
        d.at = {label: d.host_api(label, spec.host_timeout) for label in hosts}
        yield d


def running_vtpcm(d: Deployment, label: str) -> tuple[str, str]:
    """A started vTPCM on host ``label`` with guest state in it: (instance, vtpcm id)."""
    instance = str(uuid.uuid4())
    rec = d.at[label].create_vtpcm(instance, d.hosts[label].name)
    d.at[label].start_vtpcm(instance)
    tpmtools.write_guest_state(d.hosts[label].paths(instance, rec.vtpcm_id),
                               b"tenant NV " + os.urandom(8), os.urandom(32), make_key=True)
    return instance, rec.vtpcm_id


def switchover(d: Deployment, instance: str, src: str, dst: str) -> None:
    """QEMU's stop-and-copy, stood in for by the state collector."""
    d.agents.import_state(d.hosts[dst].name,
                          d.agents.export_state(d.hosts[src].name, instance))


def permanent(state: dict[str, bytes]) -> dict[str, bytes]:
    """The guest's TPM state that must survive a move: all but PCR 16 (the
    resettable debug PCR)."""
    return {k: v for k, v in state.items() if k != "pcr16"}


FROZEN_AT_MOST = 300.0  # inside pytest-timeout's 600 s


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) until the block ends (SIGCONT, also on
    failure; a process killed meanwhile is gone and that is fine): holds a
    step on the agent's side, e.g. ``begin`` between the seal and the
    prepare. A timer resumes it after ``FROZEN_AT_MOST`` s in any case (a
    block stuck in a TPM call that the frozen agent holds up, a C call
    pytest-timeout cannot interrupt, would otherwise never reach the
    finally), and the block then fails: it ran against a live agent."""
    fired = threading.Event()

    def resume() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def thaw() -> None:
        fired.set()
        resume()

    watchdog = threading.Timer(FROZEN_AT_MOST, thaw)
    watchdog.daemon = True
    watchdog.start()  # before the stop: a timer that cannot start stops nothing
    try:
        os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        watchdog.cancel()
        resume()
    if fired.is_set():
        raise AssertionError("pid %d was resumed after %ss, inside the frozen block"
                             % (pid, FROZEN_AT_MOST))
