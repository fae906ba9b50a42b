"""nova-api's witness of unshelve requests, end to end with the real engine
(``[nova] require_api_witness``, a pinned nova-api witness key), real agent
daemons, real swtpm, RabbitMQ and SQLite; Nova's API is a stand-in whose
answers the test writes (as a compromised compute host can, through
nova-conductor).

The review's attack (issue 8, H2): Nova's view says the shelved instance is
unshelving onto C, C signs its own unshelve, nova-api never saw a request:
refused, nothing sealed. A witness delivered through engine API 1.12
(``record_api_witness``, signed with the nova-api key) lets exactly one
move happen; a forged, tampered, replayed, stale or misdirected witness,
or one for another instance, does not."""

import secrets
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.functional import tpmtools
from tests.nova_functional import deployment as dep_mod
from tests.nova_functional.novafront import ServersStandIn
from vtpcm_common import authn, exception
from vtpcm_common.api.engine import messages as m

pytestmark = pytest.mark.functional
MAX_AGE = 30  # [nova] witness_max_age, its minimum
# who asked nova-api: a user of the servers' project (the stand-in's tenant_id)
USER = m.ApiWitness("00000000-0000-0000-0000-000000000000", "unshelve", None,
                    ServersStandIn.PROJECT, "user-1", "member")


@pytest.fixture(scope="module")
def dep():
    with dep_mod.deployment(witness=True, witness_max_age=MAX_AGE) as deployment:
        deployment.nova.app = ServersStandIn()
        yield deployment


def _names(dep):
    return list(dep.hosts)


def _shelved_on(dep, host):
    instance = str(uuid.uuid4())
    engine = dep.engine_at(host)
    dep.nova.app.building(instance, host)  # the engine records its owner project
    engine.create_vtpcm(instance, host)
    engine.start_vtpcm(instance)
    paths = dep.hosts[host].data_paths(instance)
    tpmtools.write_guest_state(paths, secrets.token_bytes(32), secrets.token_bytes(32),
                               make_key=False)
    before = tpmtools.read_guest_state(paths, with_key=False)
    assert engine.shelve_vtpcm(instance).state == "SHELVED"
    return instance, before


def _audit(dep, instance, event):
    return [e for e in dep.operator.list_audit(limit=500).entries
            if e.event == event and e.instance == instance]


def _refused(dep, instance, holder, target, why="nova-api witnessed no unshelve"):
    with pytest.raises(exception.UnshelveNotAuthorized, match=why):
        dep.engine_at(target).unshelve_vtpcm(instance, target)
    rec = dep.operator.get_vtpcm(instance)
    assert (rec.host, rec.state, rec.migration_id) == (holder, "SHELVED", None)
    assert dep.vtpcm_on(target, instance) is None  # nothing sealed or prepared there


def test_novas_view_alone_moves_nothing_and_one_witness_moves_it_once(dep):
    a, b, c = _names(dep)
    instance, before = _shelved_on(dep, a)
    # the attack: C wrote host/task_state through nova-conductor
    dep.nova.app.unshelving(instance, c)
    _refused(dep, instance, a, c)
    assert [e.outcome for e in _audit(dep, instance, "vtpcm.unshelve")] == ["refused"]

    # nova-api accepted the user's unshelve: one witness, one move
    dep.nova_api().record_api_witness(instance, "unshelve", requester=USER)
    assert [e.outcome for e in _audit(dep, instance, "vtpcm.witness")] == ["recorded"]
    rec = dep.engine_at(c).unshelve_vtpcm(instance, c)
    assert (rec.host, rec.generation, rec.state) == (c, 1, "ACTIVE")
    assert dep.vtpcm_on(a, instance) is None
    dep.engine_at(c).start_vtpcm(instance)
    after = tpmtools.read_guest_state(dep.hosts[c].data_paths(instance), with_key=False)
    assert after["nv"] == before["nv"]

    # shelved again on C; Nova's view says B: the used witness does not count twice
    dep.engine_at(c).stop_vtpcm(instance)
    assert dep.engine_at(c).shelve_vtpcm(instance).state == "SHELVED"
    dep.nova.app.unshelving(instance, b)
    _refused(dep, instance, c, b)
    assert sorted(e.outcome for e in _audit(dep, instance, "vtpcm.witness")) == \
        ["recorded", "used"]


def test_a_witness_naming_another_host_or_instance_is_no_witness(dep):
    a, b, c = _names(dep)
    instance, _ = _shelved_on(dep, a)
    dep.nova.app.unshelving(instance, c)
    witness = dep.nova_api()
    # the user asked for B (2.91)
    witness.record_api_witness(instance, "unshelve", b, requester=USER)
    witness.record_api_witness(str(uuid.uuid4()), "unshelve")  # another instance
    witness.record_api_witness(instance, "delete", requester=USER)  # not an unshelve
    _refused(dep, instance, a, c)
    # positive control: B, which the user named, gets it
    dep.nova.app.unshelving(instance, b)
    assert dep.engine_at(b).unshelve_vtpcm(instance, b).host == b
    dep.engine_at(b).destroy_vtpcm(instance)


def test_forged_tampered_replayed_and_misdirected_witnesses_are_refused(dep):
    a, _, c = _names(dep)
    instance, _ = _shelved_on(dep, a)
    dep.nova.app.unshelving(instance, c)
    # signed with a key the engine does not pin (a compute host's own, say)
    forger = dep.nova_api(authn.CommandSigner(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(exception.CommandRefused, match="signature does not verify"):
        forger.record_api_witness(instance, "unshelve", requester=USER)
    # a compute host's command key is no witness key either
    host_key = dep.nova_api(authn.load_host_key(dep.hosts[c].command_key))
    with pytest.raises(exception.CommandRefused, match="signature does not verify"):
        host_key.record_api_witness(instance, "unshelve", requester=USER)
    # the real key over another instance, the payload then changed on the wire
    api = dep.nova_api()
    signer = api.witness_signer
    payload = {"instance_uuid": str(uuid.uuid4()), "action": "unshelve", "host": None,
               "project_id": ServersStandIn.PROJECT}
    auth = signer.sign("record_api_witness", signer.server, payload)
    tampered = dict(payload, instance_uuid=instance)
    sent = api.client.prepare(version="1.12")
    with pytest.raises(exception.CommandRefused, match="signature does not verify"):
        _call(sent, payload=tampered, auth=auth)
    # replayed: the same signed witness twice
    good = dict(payload, instance_uuid=instance)
    auth = signer.sign("record_api_witness", signer.server, good)
    _call(sent, payload=good, auth=auth)
    with pytest.raises(exception.CommandReplayed):
        _call(sent, payload=good, auth=auth)
    # misdirected: signed for another engine topic
    other = authn.load_signing_key(dep.witness_key).for_server("another-engine-topic")
    auth = other.sign("record_api_witness", other.server, good)
    with pytest.raises(exception.CommandRefused, match="misdirected"):
        _call(sent, payload=good, auth=auth)
    refused = [e for e in _audit(dep, instance, "vtpcm.witness") if e.outcome == "refused"]
    assert len(refused) >= 4
    assert all("signature\": \"" not in e.detail for e in refused)
    # the one good witness moves it, once
    assert dep.engine_at(c).unshelve_vtpcm(instance, c).host == c
    dep.engine_at(c).destroy_vtpcm(instance)


def test_a_stale_witness_is_refused(dep):
    a, _, c = _names(dep)
    instance, _ = _shelved_on(dep, a)
    dep.nova.app.unshelving(instance, c)
    # nova-api accepted the unshelve MAX_AGE + 5 s ago (its clock says so;
    # still valid as a signed call, so the engine records it)
    key = serialization.load_pem_private_key(dep.witness_key.read_bytes(), password=None)
    past = authn.CommandSigner(key, clock=lambda: time.time() - MAX_AGE - 5)
    try:
        dep.nova_api(past).record_api_witness(instance, "unshelve", requester=USER)
    except exception.CommandStale:
        pass  # an engine started since refuses it at once (a busy machine)
    _refused(dep, instance, a, c)
    dep.engine_at(a).unshelve_vtpcm(instance, a)
    dep.engine_at(a).destroy_vtpcm(instance)


def _call(prepared, **kwargs):
    """A raw RPC call, as any broker client can make one."""
    return prepared.call({}, "record_api_witness", **kwargs)


@pytest.mark.parametrize("project", [None, "the-service-project"])
def test_a_witness_of_another_project_moves_nothing(dep, project):
    """Review finding 1 (b): a request nova-api accepted from a project that
    does not own the server (a compute host's service credentials, say)
    is no witness for the engine; the owner's is."""
    a, _, c = _names(dep)
    instance, _ = _shelved_on(dep, a)
    dep.nova.app.unshelving(instance, c)
    other = m.ApiWitness(instance, "unshelve", None, project, "nova", "admin")
    dep.nova_api().record_api_witness(instance, "unshelve", c, requester=other)
    _refused(dep, instance, a, c, why="by its project %s" % ServersStandIn.PROJECT)
    dep.nova_api().record_api_witness(instance, "unshelve", c, requester=USER)
    assert dep.engine_at(c).unshelve_vtpcm(instance, c).host == c
    dep.engine_at(c).destroy_vtpcm(instance)


BROKER_DOWN = textwrap.dedent("""
    import sys, time
    from oslo_config import cfg
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from vtpcm_common import authn
    from vtpcm_nova.api import witness
    from vtpcm_nova.conf import api as api_conf, compute as compute_conf
    conf = cfg.ConfigOpts()
    conf([], project="nova-test")
    api_conf.register_opts(conf)
    compute_conf.register_opts(conf)
    conf.set_override("transport_url", "rabbit://guest:guest@127.0.0.1:1/", group="vtpcm")
    conf.set_override("api_witness_timeout", 1.0, group="vtpcm")
    send = witness.EngineWitness(conf, authn.CommandSigner(
        ed25519.Ed25519PrivateKey.generate()))
    for _ in range(2):
        started = time.monotonic()
        try:
            send("6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11", "delete", None,
                 witness.Requester())
        except Exception as err:
            print("raised %s after %.2f" % (type(err).__name__, time.monotonic() - started))
        else:
            print("returned after %.2f" % (time.monotonic() - started))
""")


def test_a_broker_down_does_not_hold_novas_answer():
    """Review finding 4: oslo.messaging's timeout bounds only the wait for
    the reply; without ``retry`` it reconnects to a broker that is down
    forever, and nova-api's answer to the DELETE waits with it. The
    witness send gives up within [vtpcm] api_witness_timeout (1 s here)
    plus its slack, with an error the filter logs; while it is stuck the
    next one fails at once."""
    try:
        done = subprocess.run([sys.executable, "-c", BROKER_DOWN], capture_output=True,
                              text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the witness send to a broker that is down did not return in 20 s")
    first, second = [x.split() for x in done.stdout.splitlines()
                     if x.startswith(("raised", "returned"))]
    assert first[1] == "ServiceUnreachable" and float(first[-1]) < 1.0 + 1.0, first
    # the first send is still stuck: the next one fails at once, no pile-up
    assert second[1] == "ServiceUnreachable" and float(second[-1]) < 0.5, second
