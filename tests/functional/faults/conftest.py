"""The fault-injection deployment (``deployment.Deployment``), one per module."""

import contextlib
import shutil
import uuid
from collections.abc import Iterator

import pytest

from tests.functional.faults.deployment import ENGINE_EXTRA, PCRS, Deployment
from tests.functional.faults.relay import BrokerRelay
from tests.functional.harness import (
    TRANSPORT_URL,
    ClusterHost,
    EngineDaemon,
    agent_cluster,
    client_conf,
    short_dir,
    wait_for,
)
from vtpcm_common import authn, exception
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab import daemons


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    """The daemons reach RabbitMQ through a relay the broker cells cut."""
    relay = BrokerRelay(("127.0.0.1", 5672)).start()
    try:
        with make_deployment(relay) as d:
            yield d
    finally:
        relay.stop()


@contextlib.contextmanager
def make_deployment(relay: BrokerRelay | None = None) -> Iterator[Deployment]:
    """The deployment; its daemons reach RabbitMQ through ``relay`` if given
    (the test's own clients directly: they stand for Nova and the operator)."""
    work = short_dir("vtflt")
    url = None if relay is None else TRANSPORT_URL.replace(
        "@127.0.0.1:5672", "@127.0.0.1:%d" % relay.port)
    assert url != TRANSPORT_URL
    exchange = "vtpcm-flt-" + uuid.uuid4().hex[:8]
    conf = client_conf(exchange)
    agents = AgentAPI(conf, timeout=10)
    operator = EngineAPI(conf, timeout=20)
    extra = dict(ENGINE_EXTRA)
    if url is not None:
        extra["DEFAULT"] = {"transport_url": url}
    engine = EngineDaemon(work, exchange, "sqlite:///%s/engine.sqlite" % work, extra=extra)
    try:
        with agent_cluster(work, "fl", exchange, agents, transport_url=url) as raw:
            engine.start()
            engine.wait_ready(operator)
            hosts = {label: ClusterHost(*h) for label, h in zip(("a", "b"), raw, strict=True)}
            for host in hosts.values():
                assert operator.enroll(host.name).status == "APPROVED"
            operator.record_policy("golden", hosts["a"].name, PCRS, "stand-in boot")
            at = {}
            for label, host in hosts.items():
                operator.assign_policy(host.name, "golden")
                # the engine's short agent timeout (ENGINE_EXTRA) can cut a
                # host's first quote, which creates its TPM keys: ask again
                wait_for("%s attested TRUSTED" % host.name,
                         lambda h=host: _attest(operator, h.name), 120)
                at[label] = EngineAPI(conf, operator.transport, timeout=6,
                                      host_signer=authn.load_host_key(host.agent.command_key))
            yield Deployment(operator, at, hosts, agents, engine, relay)
    finally:
        engine.stop()
        agents.transport.cleanup()
        operator.transport.cleanup()
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _attest(operator: EngineAPI, host: str) -> bool:
    try:
        return operator.attest(host).status == "TRUSTED"
    except exception.AttestationError:
        return False
