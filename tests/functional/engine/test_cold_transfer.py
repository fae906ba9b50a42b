"""Cold migration and resize through the engine: the source-signed
``transfer_state`` moves a stopped vTPCM's blobs (encrypted by swtpm under
the migration key) from the source's agent into the destination's prepared
incoming vTPCM. Real engine and agent daemons, real swtpm (vTPCMs and host
TPM stand-ins), RabbitMQ; hosts TRUSTED under a golden policy."""

import secrets
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.functional import tpmtools
from tests.nova_functional import deployment as dep_mod
from tests.nova_functional.novafront import ServersStandIn
from vtpcm_agent.swtpm.client import CtrlClient
from vtpcm_common import authn, exception
from vtpcm_common.api.engine import messages as m

pytestmark = pytest.mark.functional
PERMALL = "tpm2-00.permall"


@pytest.fixture(scope="module")
def dep():
    with dep_mod.deployment() as deployment:
        deployment.nova.app = ServersStandIn()  # no Nova here: its API's answers
        yield deployment


def _names(dep):
    return list(dep.hosts)


def _vtpcm_with_state(dep, host):
    """A vTPCM on ``host`` whose guest wrote NV and PCR16. Its swtpm keeps
    running (as after Nova's power off), so the volatile state (PCR16) goes
    along with the permanent one."""
    instance = str(uuid.uuid4())
    engine = dep.engine_at(host)
    engine.create_vtpcm(instance, host)
    engine.start_vtpcm(instance)
    paths = dep.hosts[host].data_paths(instance)
    tpmtools.write_guest_state(paths, secrets.token_bytes(32), secrets.token_bytes(32),
                               make_key=False)
    return instance, tpmtools.read_guest_state(paths, with_key=False)


def _received(dep, host, instance):
    info = dep.agents.get(host, instance)
    return (dep.hosts[host].state_dir / "vtpcms" / info.vtpcm_id / PERMALL).exists()


def _audit(dep, instance, event):
    return [e for e in dep.operator.list_audit(limit=500).entries
            if e.event == event and (e.instance in (None, instance))]


def test_only_the_source_moves_the_state_once_and_confirm_commits(dep):
    a, b, c = _names(dep)
    instance, before = _vtpcm_with_state(dep, a)
    mid = str(uuid.uuid4())
    assert dep.engine_at(a).begin(mid, instance, a, b).state == "PREPARED"
    refusals = len(_audit(dep, instance, "host-call"))

    # the destination, a third host, a broker client: refused before any agent call
    for api, why in ((dep.engine_at(b), "host command key of %s" % a),
                     (dep.engine_at(c), "host command key of %s" % a),
                     (dep.operator, "no host command signature")):
        with pytest.raises(exception.CommandRefused, match=why):
            api.transfer_state(mid)
    assert len(_audit(dep, instance, "host-call")) == refusals + 3
    assert dep.operator.get_migration(mid).state == "PREPARED"
    assert not _received(dep, b, instance)

    # positive control: the source's transfer
    assert dep.engine_at(a).transfer_state(mid).state == "TRANSFERRED"
    assert _received(dep, b, instance)
    assert tpmtools.read_guest_state(dep.hosts[b].data_paths(instance),
                                     with_key=False) == before
    # a retry is a no-op; a replay of the captured signed call is refused
    assert dep.engine_at(a).transfer_state(mid).state == "TRANSFERRED"
    payload = m.MigrationRef(mid).validated().to_wire()
    auth = dep.engine_at(a).host_signer.sign("transfer_state", "", payload)
    cctxt = dep.operator.client.prepare(version="1.4")
    cctxt.call({}, "transfer_state", payload=payload, auth=dict(auth))  # the original
    with pytest.raises(exception.CommandRefused, match="replayed"):
        cctxt.call({}, "transfer_state", payload=payload, auth=dict(auth))
    transfers = [e for e in _audit(dep, instance, "migration.transfer")
                 if e.migration_id == mid]
    assert [e.outcome for e in transfers] == ["state transferred"]

    assert dep.engine_at(a).commit(mid).state == "COMMITTED"
    rec = dep.operator.get_vtpcm(instance)
    assert (rec.host, rec.generation) == (b, 1)
    assert dep.agents.get(a, instance).state == "DESTROYED"
    dep.engine_at(b).start_vtpcm(instance)
    assert tpmtools.read_guest_state(dep.hosts[b].data_paths(instance),
                                     with_key=False) == before
    dep.engine_at(b).destroy_vtpcm(instance)


def test_old_blobs_never_reach_a_second_migration(dep):
    """Migration 1 is reverted after its transfer; what a broker client saw
    of it (the blobs, the signed transfer) opens nothing in migration 2."""
    a, b, _ = _names(dep)
    instance, before = _vtpcm_with_state(dep, a)
    first = str(uuid.uuid4())
    dep.engine_at(a).begin(first, instance, a, b)
    dep.engine_at(a).transfer_state(first)
    old = dep.agents.export_state(a, instance)  # as seen on the broker
    assert old.migration_id == first
    assert dep.engine_at(a).abort(first, "resize reverted").state == "ABORTED"
    assert dep.vtpcm_on(b, instance) is None
    second = str(uuid.uuid4())
    dep.engine_at(a).begin(second, instance, a, b)

    # the ended migration cannot transfer again
    with pytest.raises(exception.InvalidTransition, match="ABORTED"):
        dep.engine_at(a).transfer_state(first)
    # the old blobs sent by a broker client (its own key): refused by the agent
    forger = type(dep.agents)(dep.conf, dep.operator.transport, timeout=30,
                              signer=authn.CommandSigner(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(exception.CommandRefused, match="signature"):
        forger.import_state(b, old)
    # even signed by the engine, blobs of migration 1 do not fit migration 2
    with pytest.raises(exception.MigrationError, match="prepared for migration %s" % second):
        dep.agents.import_state(b, old)
    assert not _received(dep, b, instance)
    assert dep.operator.get_migration(second).state == "PREPARED"
    assert sorted(e.outcome for e in _audit(dep, instance, "migration.transfer")
                  if e.migration_id == first) == ["refused", "state transferred"]

    # positive control: migration 2's own transfer, and the state is the source's
    assert dep.engine_at(a).transfer_state(second).state == "TRANSFERRED"
    assert tpmtools.read_guest_state(dep.hosts[b].data_paths(instance),
                                     with_key=False) == before
    dep.engine_at(a).abort(second, "done")
    dep.engine_at(a).destroy_vtpcm(instance)


def test_a_shelved_vtpcm_opens_only_for_a_trusted_host_and_only_once(dep):
    """Shelve offload on A, then unshelve: an UNTRUSTED host gets nothing
    (the vTPCM stays shelved on A), a TRUSTED one gets it once; a second
    unshelve elsewhere is refused. (Last in the module: C stays UNTRUSTED.)"""
    a, b, c = _names(dep)
    instance, before = _vtpcm_with_state(dep, a)
    assert dep.engine_at(a).shelve_vtpcm(instance).state == "SHELVED"
    assert not dep.agents.get(a, instance).running
    dep.hosts[c].untrust()
    assert dep.operator.attest(c).status == "UNTRUSTED"

    dep.nova.app.unshelving(instance, c)
    with pytest.raises(exception.HostNotTrusted, match="PCR 7"):
        dep.engine_at(c).unshelve_vtpcm(instance, c)
    rec = dep.operator.get_vtpcm(instance)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == (a, 0, "SHELVED", None)
    assert dep.vtpcm_on(c, instance) is None
    # only the host that gets it may ask
    with pytest.raises(exception.CommandRefused, match="host command key of %s" % b):
        dep.engine_at(c).unshelve_vtpcm(instance, b)

    # a TRUSTED host that Nova is not unshelving onto (Nova chose c) gets nothing
    with pytest.raises(exception.UnshelveNotAuthorized, match="onto %s, not onto %s" % (c, b)):
        dep.engine_at(b).unshelve_vtpcm(instance, b)
    dep.nova.app.unshelving(instance, b)
    # positive control: the TRUSTED host gets it, the holder's copy is shredded
    rec = dep.engine_at(b).unshelve_vtpcm(instance, b)
    assert (rec.host, rec.generation, rec.state) == (b, 1, "ACTIVE")
    assert dep.agents.get(a, instance).state == "DESTROYED"
    dep.engine_at(b).start_vtpcm(instance)
    after = tpmtools.read_guest_state(dep.hosts[b].data_paths(instance), with_key=False)
    assert after["nv"] == before["nv"]

    # restored twice: refused, audited, nothing moves
    with pytest.raises(exception.CommandRefused, match="not shelved"):
        dep.engine_at(a).unshelve_vtpcm(instance, a)
    assert dep.operator.get_vtpcm(instance).host == b
    assert sorted(e.outcome for e in _audit(dep, instance, "vtpcm.unshelve")) == \
        ["moved", "refused", "refused", "refused"]
    dep.engine_at(b).destroy_vtpcm(instance)


def test_a_confirm_after_the_guest_stopped_on_the_destination_commits(dep):
    """Review finding F2: QEMU's CMD_SHUTDOWN (the resized guest shut down
    inside, or the destination rebooted) stops the incoming swtpm before the
    confirm. The confirm used to pass the commit point and then wedge (the
    agent refused to commit a stopped incoming vTPCM, forever): now it
    commits at generation + 1, the source is shredded, and the guest's next
    start finds its state. Issue 8 point 3: the clean exit commits STOPPED
    (it used to be started again, serving no guest until the guest
    started); a crash is still restarted (test_convergence)."""
    a, b, _ = _names(dep)
    instance, before = _vtpcm_with_state(dep, a)
    mid = str(uuid.uuid4())
    assert dep.engine_at(a).begin(mid, instance, a, b).state == "PREPARED"
    assert dep.engine_at(a).transfer_state(mid).state == "TRANSFERRED"
    inc = dep.agents.get(b, instance)
    assert (inc.state, inc.running) == ("MIGRATING_IN", True)
    with CtrlClient(inc.ctrl_socket) as client:  # what QEMU sends when it exits
        client.shutdown()
    for _ in range(100):
        if not dep.agents.get(b, instance).running:
            break
        time.sleep(0.1)
    assert not dep.agents.get(b, instance).running

    assert dep.engine_at(a).commit(mid).state == "COMMITTED"
    rec = dep.operator.get_vtpcm(instance)
    assert (rec.host, rec.generation, rec.migration_id) == (b, 1, None)
    dest = dep.agents.get(b, instance)  # committed as the stopped guest left it
    assert (dest.state, dest.generation, dest.running) == ("STOPPED", 1, False)
    assert not Path(dest.ctrl_socket).exists()  # no swtpm serves its socket
    assert dep.agents.get(a, instance).state == "DESTROYED"
    # a retried confirm is a success; the guest starts on its vTPCM, state kept
    assert dep.engine_at(a).commit(mid).state == "COMMITTED"
    assert not dep.agents.get(b, instance).running
    # the guest's next power on
    dep.engine_at(b).start_vtpcm(instance)
    assert dep.agents.get(b, instance).running
    after = tpmtools.read_guest_state(dep.hosts[b].data_paths(instance), with_key=False)
    assert after["nv"] == before["nv"]
    dep.engine_at(b).destroy_vtpcm(instance)


def test_the_destination_restarts_a_stopped_incoming_vtpcm_before_the_confirm(dep):
    """Review finding F2, second half: the resized guest stopped on the
    destination and is started again there before the confirm; only the
    destination may have the engine restart its received incoming vTPCM,
    which keeps its state, migration and generation."""
    a, b, c = _names(dep)
    instance, before = _vtpcm_with_state(dep, a)
    mid = str(uuid.uuid4())
    dep.engine_at(a).begin(mid, instance, a, b)
    assert dep.engine_at(a).transfer_state(mid).state == "TRANSFERRED"
    with CtrlClient(dep.agents.get(b, instance).ctrl_socket) as client:
        client.shutdown()
    for _ in range(100):
        if not dep.agents.get(b, instance).running:
            break
        time.sleep(0.1)
    for api, why in ((dep.engine_at(a), "host command key of %s" % b),
                     (dep.engine_at(c), "host command key of %s" % b),
                     (dep.operator, "no host command signature")):
        with pytest.raises(exception.CommandRefused, match=why):
            api.start_incoming(mid)
    assert not dep.agents.get(b, instance).running

    started = dep.engine_at(b).start_incoming(mid)
    inc = dep.agents.get(b, instance)
    assert (started.state, started.running, started.generation) == ("MIGRATING_IN", True, 0)
    assert (inc.state, inc.migration_id, inc.running) == ("MIGRATING_IN", mid, True)
    assert tpmtools.read_guest_state(dep.hosts[b].data_paths(instance),
                                     with_key=False)["nv"] == before["nv"]
    assert dep.operator.get_migration(mid).state == "TRANSFERRED"
    assert dep.engine_at(a).commit(mid).state == "COMMITTED"
    dest = dep.agents.get(b, instance)
    assert (dest.state, dest.generation, dest.running) == ("ACTIVE", 1, True)
    with pytest.raises(exception.CommandRefused, match="migration is COMMITTED"):
        dep.engine_at(b).start_incoming(mid)
    dep.engine_at(b).destroy_vtpcm(instance)
