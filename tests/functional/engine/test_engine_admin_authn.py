"""Operator-signed admin calls on a real vtpcm-engine daemon over RabbitMQ,
with a real agent daemon on a host-TPM stand-in.

A broker participant without an operator key (any compute node has broker
credentials) and a client signing with a key the engine does not know can
neither enroll, approve, revoke, assign nor store policies: the engine
refuses, audits the refusal and changes nothing. The operator's signed calls
work, once each: a replayed signed approve is refused. An engine without
operator keys refuses every admin call and says which option to set."""

import shutil
import uuid

import pytest

from tests.functional.hosttpm_fixture import HostTPMStandIn
from vtpcm_common import authn, exception
from vtpcm_common.api.agent import rpcapi as agent_rpcapi
from vtpcm_common.api.engine import messages as m
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab import daemons
from vtpcm_lab.daemons import AgentDaemon, EngineDaemon, client_conf, short_dir
from vtpcm_lab.hosttpm import measured_boot

pytestmark = pytest.mark.functional
PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
GOLDEN = m.PolicyInfo(name="set-by-hand", bank="sha256", pcrs={16: b"\x16" * 32},
                      description="hand-made")


@pytest.fixture(scope="module")
def deployment():
    """Engine (operator key trusted, no auto-approve) + one agent; clients:
    the operator, a rogue with broker credentials only, a stranger key."""
    work = short_dir("vtadm")
    exchange = "vtpcm-adm-" + uuid.uuid4().hex[:8]
    started, apis = [], []
    try:
        tpm = HostTPMStandIn(work / "tpm", name="a")
        tpm.start()
        started.append(tpm)
        measured_boot(tpm.tcti)
        host = "adm-" + uuid.uuid4().hex[:6]
        operator = EngineAPI(client_conf(exchange), timeout=60)
        apis.append(operator)
        agents = agent_rpcapi.AgentAPI(client_conf(exchange), timeout=30)
        apis.append(agents)
        agent = AgentDaemon(work, host, exchange, tpm.tcti, run_dir=work / "run",
                            extra={"agent": {"register_with_engine": "false"}})
        agent.start()
        started.append(agent)
        agent.wait_ready(agents)
        engine = EngineDaemon(work, exchange, "sqlite:///%s/engine.sqlite" % work,
                              extra={"attestation": {"auto_approve": "false"}})
        engine.start()
        started.append(engine)
        engine.wait_ready(operator)
        rogue = EngineAPI(client_conf(exchange, signing=False), timeout=60)
        apis.append(rogue)
        stranger = EngineAPI(client_conf(exchange, signing=False), timeout=60,
                             admin_signer=authn.load_or_create_signing_key(
                                 work / "stranger.key"))
        apis.append(stranger)
        yield operator, rogue, stranger, engine, host
    finally:
        for proc in reversed(started):
            proc.cleanup() if isinstance(proc, HostTPMStandIn) else proc.stop()
        for api in apis:
            api.transport.cleanup()
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _admin_calls(host):
    """Every admin method, as (name, call on an EngineAPI)."""
    return [
        ("enroll", lambda api: api.enroll(host)),
        ("approve_host", lambda api: api.approve_host(host)),
        ("revoke_host", lambda api: api.revoke_host(host)),
        ("assign_policy", lambda api: api.assign_policy(host, "golden")),
        ("put_policy", lambda api: api.put_policy(GOLDEN)),
        ("record_policy", lambda api: api.record_policy("golden", host, PCRS, "boot")),
    ]


def _state(api, host):
    """What an admin call could change: the host's record and the policies."""
    hosts = {h.name: h for h in api.list_hosts().hosts}
    return hosts.get(host), api.list_policies().policies


def _refusals(api, host):
    return [e for e in api.list_audit(limit=500, host=host).entries
            if e.event == "admin" and e.outcome == "refused"]


def _check_all_refused(client, operator, engine, host, reason):
    before = _state(operator, host)
    refused_before = len(_refusals(operator, host))
    for name, call in _admin_calls(host):
        with pytest.raises(exception.CommandRefused) as err:
            call(client)
        assert name in str(err.value) and reason in str(err.value), str(err.value)
        assert "Refused %s" % name in engine.log_text()
    assert _state(operator, host) == before
    # put_policy names no host; the five others are audited under the host
    assert len(_refusals(operator, host)) == refused_before + 5


def test_unsigned_admin_calls_are_refused_before_and_after_enrollment(deployment):
    operator, rogue, _, engine, host = deployment
    _check_all_refused(rogue, operator, engine, host, "no operator signature")
    assert host not in {h.name for h in operator.list_hosts().hosts}
    assert operator.enroll(host).status == "PENDING"
    _check_all_refused(rogue, operator, engine, host, "no operator signature")
    assert operator.show_host(host).status == "PENDING"
    # what stays unsigned still answers a broker participant
    assert host in {h.name for h in rogue.list_hosts().hosts}
    assert rogue.show_host(host).status == "PENDING"


def test_a_key_the_engine_does_not_know_is_refused(deployment):
    operator, _, stranger, engine, host = deployment
    if host not in {h.name for h in operator.list_hosts().hosts}:
        operator.enroll(host)
    _check_all_refused(stranger, operator, engine, host,
                       "signature does not verify with the operator key")


def test_operator_signed_calls_work_and_name_the_key(deployment):
    operator, _, _, _, host = deployment
    if host not in {h.name for h in operator.list_hosts().hosts}:
        operator.enroll(host)
    assert operator.approve_host(host).status == "APPROVED"
    assert sorted(operator.record_policy("golden", host, PCRS, "boot").pcrs) == list(PCRS)
    assert operator.assign_policy(host, "golden").policy_name == "golden"
    assert operator.attest(host).status == "TRUSTED"
    assert operator.put_policy(GOLDEN).name == GOLDEN.name
    assert operator.revoke_host(host).status == "REVOKED"
    assert operator.enroll(host).status == "PENDING"  # a revoked host may enroll again
    accepted = [e for e in operator.list_audit(limit=500, host=host).entries
                if e.event == "admin" and e.outcome == "accepted"]
    methods = {e.detail.split()[0] for e in accepted}
    assert methods >= {"enroll", "approve_host", "record_policy", "assign_policy",
                       "revoke_host"}
    assert all(e.detail.endswith("operator key " + operator.signer.fingerprint)
               for e in accepted)


def _assert_replay_refused(cctxt, method, payload, auth):
    """The raw call of someone who saw ``auth`` on the broker is refused."""
    with pytest.raises(exception.CommandRefused, match="replayed"):
        cctxt.call({}, method, payload=payload, auth=dict(auth))


def test_a_replayed_signed_approve_is_refused(deployment):
    operator, rogue, _, _, host = deployment
    if host not in {h.name for h in operator.list_hosts().hosts}:
        operator.enroll(host)
    if operator.show_host(host).status != "PENDING":
        operator.revoke_host(host)
        operator.enroll(host)
    payload = m.HostRef(host).validated().to_wire()
    auth = operator.signer.sign("approve_host", "", payload)
    assert auth["server"] == operator.topic  # bound to the topic, not to a worker
    cctxt = rogue.client.prepare(version="1.0")  # anyone who saw the message
    assert cctxt.call({}, "approve_host", payload=payload, auth=dict(auth))["status"] == \
        "APPROVED"
    operator.revoke_host(host)
    operator.enroll(host)
    assert operator.show_host(host).status == "PENDING"
    _assert_replay_refused(cctxt, "approve_host", payload, auth)
    assert operator.show_host(host).status == "PENDING"


def test_a_replay_after_an_engine_restart_is_refused(deployment):
    """Accepted nonces live in the engine database, not in the process: a
    restarted worker (or another one on the same database) still knows them.
    The replay comes seconds after signing, well inside the validity period
    and the start-time allowance, so only the stored nonce can refuse it."""
    operator, rogue, _, engine, host = deployment
    if host not in {h.name for h in operator.list_hosts().hosts}:
        operator.enroll(host)
    if operator.show_host(host).status != "APPROVED":
        operator.approve_host(host)
    payload = m.HostRef(host).validated().to_wire()
    auth = operator.signer.sign("revoke_host", "", payload)
    cctxt = rogue.client.prepare(version="1.0")
    assert cctxt.call({}, "revoke_host", payload=payload, auth=dict(auth))["status"] == \
        "REVOKED"
    operator.enroll(host)
    operator.approve_host(host)
    engine.stop()
    engine.start()
    engine.wait_ready(operator)
    _assert_replay_refused(cctxt, "revoke_host", payload, auth)
    assert operator.show_host(host).status == "APPROVED"


def test_engine_without_operator_keys_refuses_every_admin_call():
    """Fail closed: no [engine] admin_public_keys, no admin calls, and the
    refusal says what to configure. Its own deployment (topic) and database."""
    work = short_dir("vtadm0")
    exchange = "vtpcm-adm0-" + uuid.uuid4().hex[:8]
    engine = EngineDaemon(work, exchange, "sqlite:///%s/engine.sqlite" % work,
                          extra={"engine": {"admin_public_keys": ""}})
    api = EngineAPI(client_conf(exchange), timeout=30)
    try:
        engine.start()
        engine.wait_ready(api)
        assert "No operator keys configured" in engine.log_text()
        for name, call in _admin_calls("nokeys-host"):
            with pytest.raises(exception.CommandRefused) as err:
                call(api)
            assert name in str(err.value)
            assert "no operator keys configured: set [engine] admin_public_keys" \
                in str(err.value)
        assert api.list_hosts().hosts == () and api.list_policies().policies == ()
    finally:
        engine.stop()
        api.transport.cleanup()
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
