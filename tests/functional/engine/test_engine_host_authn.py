"""The engine runs the Nova driver's calls (create/destroy a vTPCM,
check_destination, begin, commit, abort) only when a host the call concerns
signed it with the command key the engine learnt when it enrolled that host,
bound into the host TPM's certify. A broker client without a host key, or a
compromised compute node C, cannot destroy host A's vTPCM nor start, commit
or abort a migration between A and B. Real agent daemons, engine daemon,
RabbitMQ and swtpm host TPMs."""

import dataclasses
import shutil
import uuid
from pathlib import Path

import oslo_messaging as messaging
import pytest

from tests.functional.harness import (
    AgentDaemon,
    EngineDaemon,
    agent_cluster,
    client_conf,
    short_dir,
)
from vtpcm_agent.rpcapi import AgentAPI
from vtpcm_common import authn, exception, rpc
from vtpcm_lab import daemons
from vtpcm_nova.engine import messages as m
from vtpcm_nova.engine.rpcapi import EngineAPI

pytestmark = pytest.mark.functional


@dataclasses.dataclass
class Deployment:
    operator: EngineAPI  # admin key, no host key: what a broker client can do
    at: dict[str, EngineAPI]  # label -> the engine as that host's Nova driver calls it
    names: dict[str, str]  # label -> host name
    agents: AgentAPI
    engine: EngineDaemon


def _host_key(agent: AgentDaemon) -> Path:
    return Path(agent.config["agent"]["state_dir"]) / "host-command.key"


@pytest.fixture(scope="module")
def deployment():
    work = short_dir("vthost")
    exchange = "vtpcm-host-" + uuid.uuid4().hex[:8]
    conf = client_conf(exchange)
    agents = AgentAPI(conf, timeout=30)
    operator = EngineAPI(conf, timeout=60)
    engine = EngineDaemon(work, exchange, "sqlite:///%s/engine.sqlite" % work,
                          extra={"attestation": {"auto_approve": "true"}})
    apis: list[EngineAPI] = []
    try:
        with agent_cluster(work, "ha", exchange, agents, labels=("a", "b", "c")) as hosts:
            engine.start()
            engine.wait_ready(operator)
            names = {}
            for (name, _, agent, _), label in zip(hosts, ("a", "b", "c"), strict=True):
                assert operator.enroll(name).status == "APPROVED"
                names[label] = name
                api = EngineAPI(conf, operator.transport, timeout=60,
                                host_signer=authn.load_host_key(_host_key(agent)))
                apis.append(api)
            yield Deployment(operator, dict(zip(("a", "b", "c"), apis, strict=True)), names,
                             agents, engine)
    finally:
        engine.stop()
        agents.transport.cleanup()
        operator.transport.cleanup()
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _refused(call, reason):
    with pytest.raises(exception.CommandRefused) as err:
        call()
    assert reason in str(err.value), str(err.value)


def test_the_host_itself_may_create_and_destroy_its_vtpcm(deployment):
    d = deployment
    instance = str(uuid.uuid4())
    rec = d.at["a"].create_vtpcm(instance, d.names["a"])
    assert rec.host == d.names["a"] and rec.state != "CREATING"
    assert d.agents.get(d.names["a"], instance).vtpcm_id == rec.vtpcm_id
    d.at["a"].destroy_vtpcm(instance)
    with pytest.raises(exception.NotFound):
        d.operator.get_vtpcm(instance)


def test_calls_without_the_concerned_hosts_key_are_refused_and_change_nothing(deployment):
    d = deployment
    a, b = d.names["a"], d.names["b"]
    instance = str(uuid.uuid4())
    # create for host A: unsigned (any broker client), or signed by host C
    _refused(lambda: d.operator.create_vtpcm(instance, a), "no host command signature")
    _refused(lambda: d.at["c"].create_vtpcm(instance, a),
             "signature does not verify with the host command key of %s" % a)
    with pytest.raises(exception.NotFound):
        d.operator.get_vtpcm(instance)
    with pytest.raises(exception.NotFound):
        d.agents.get(a, instance)
    rec = d.at["a"].create_vtpcm(instance, a)
    before = d.agents.get(a, instance)
    # destroy, begin (A -> B) and check_destination need A's or B's key
    for who in ("operator", "c"):
        api = d.operator if who == "operator" else d.at["c"]
        _refused(lambda api=api: api.destroy_vtpcm(instance), "destroy_vtpcm")
        mid = str(uuid.uuid4())
        _refused(lambda api=api, mid=mid: api.begin(mid, instance, a, b), "begin")
        with pytest.raises(exception.NotFound):
            d.operator.get_migration(mid)
        _refused(lambda api=api: api.check_destination(instance, b), "check_destination")
    assert d.operator.get_vtpcm(instance) == rec
    assert d.agents.get(a, instance) == before
    refusals = [e for e in d.operator.list_audit(limit=200, host=a).entries
                if e.event == "host-call" and e.outcome == "refused"]
    assert len(refusals) >= 5
    d.at["a"].destroy_vtpcm(instance)


def test_a_captured_host_call_cannot_be_replayed(deployment):
    d = deployment
    a = d.names["a"]
    instance = str(uuid.uuid4())
    payload = m.VtpcmPlacement(instance, a).validated().to_wire()
    assert d.at["a"].host_signer is not None
    auth = d.at["a"].host_signer.sign("create_vtpcm", "", payload)
    cctxt = d.operator.client.prepare(version="1.0")  # anyone who saw the message
    assert cctxt.call({}, "create_vtpcm", payload=payload, auth=dict(auth))["host"] == a
    d.at["a"].destroy_vtpcm(instance)
    with pytest.raises(messaging.RemoteError) as err:
        cctxt.call({}, "create_vtpcm", payload=payload, auth=dict(auth))
    refused = rpc.remote_to_local(err.value)
    assert isinstance(refused, exception.CommandRefused) and "replayed" in str(refused)
    with pytest.raises(exception.NotFound):
        d.operator.get_vtpcm(instance)
    tombstone = d.agents.get(a, instance)  # not created again after the destroy
    assert tombstone.state == "DESTROYED" and not tombstone.running


def test_reenrolment_learns_the_hosts_key_again(deployment):
    """A revoked host re-enrolled: the engine learns the command key afresh
    from the TPM-vouched identity, and the host's calls work again."""
    d = deployment
    c = d.names["c"]
    d.operator.revoke_host(c)
    assert d.operator.enroll(c).status == "APPROVED"
    instance = str(uuid.uuid4())
    assert d.at["c"].create_vtpcm(instance, c).host == c
    d.at["c"].destroy_vtpcm(instance)
