"""Two real vtpcm-agent daemons over the local RabbitMQ, each with its own
swtpm host-TPM stand-in: lifecycle, state collector, sealed key hand-over,
re-adoption after kill -9, and bad input."""

import dataclasses
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from tests import leakscan
from tests.functional import tpmtools
from tests.functional.harness import (
    ClusterHost,
    agent_cluster,
    client_conf,
    short_dir,
    wait_for,
)
from vtpcm_agent import sealing
from vtpcm_agent.instances import context_from
from vtpcm_agent.swtpm import ctrl, process
from vtpcm_common import exception
from vtpcm_common.api.agent import messages as m
from vtpcm_common.api.agent.rpcapi import AgentAPI

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def cluster():
    work = short_dir("vtrpc")
    exchange = "vtpcm-test-" + uuid.uuid4().hex[:8]
    api = AgentAPI(client_conf(exchange), timeout=30)
    try:
        with agent_cluster(work, "h", exchange, api) as hosts:
            a, b = (ClusterHost(*h) for h in hosts)
            yield api, a, b
    finally:
        api.transport.cleanup()


def _new(api: AgentAPI, host: ClusterHost) -> m.VTPCMInfo:
    instance = str(uuid.uuid4())
    info = api.create(host.name, instance)
    assert info.state == "STOPPED" and not info.running and info.generation == 0
    return api.start(host.name, instance)


def _hand_over(api, src: ClusterHost, dst: ClusterHost, instance: str,
               generation: int) -> m.MigrationContext:
    """Seal src's migration key for dst's TPM and prepare dst (the protocol's step 3)."""
    ctx = m.MigrationContext(str(uuid.uuid4()), instance, generation, src.name, dst.name)
    kem = api.get_identity(dst.name, os.urandom(32)).kem_public
    sealed = api.seal_migration_key(src.name, ctx, kem)
    assert api.get(src.name, instance).state == "MIGRATING_OUT"
    incoming = api.prepare_incoming(dst.name, ctx, sealed.envelope)
    assert incoming.state == "MIGRATING_IN" and incoming.running
    return ctx


def _wait_crashed(api: AgentAPI, host: ClusterHost, instance: str,
                  timeout: float = 10.0) -> None:
    """The agent reports the vTPCM's swtpm as crashed, and its watchdog
    logged it (one pass: the report comes with the AUDIT line)."""
    wait_for("crash report of " + instance, lambda: instance in api.health(host.name).crashed
             and "AUDIT swtpm of instance %s" % instance in host.agent.log_text(), timeout)


def _kill_swtpm(api: AgentAPI, host: ClusterHost, instance: str) -> int:
    pid = api.get(host.name, instance).pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    return pid


def test_export_import_between_agents_keeps_guest_state(cluster):
    api, a, b = cluster
    info = _new(api, a)
    assert info.state == "ACTIVE" and info.running
    pa = a.paths(info.instance_uuid, info.vtpcm_id)
    tpmtools.write_guest_state(pa, b"guest secret NV data 0123456789", os.urandom(32),
                               make_key=True)
    before = tpmtools.read_guest_state(pa, with_key=True)

    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    blobs = api.export_state(a.name, info.instance_uuid)
    assert blobs.generation == 0 and len(blobs.permanent) > 1000
    assert "permanent=" not in repr(blobs)
    imported = api.import_state(b.name, blobs)
    pb = b.paths(info.instance_uuid, imported.vtpcm_id)
    assert tpmtools.read_guest_state(pb, with_key=True) == before

    # Every migration step may be retried (lost replies, engine restarts).
    kem = api.get_identity(b.name, os.urandom(32)).kem_public
    resealed = api.seal_migration_key(a.name, ctx, kem)
    again = api.prepare_incoming(b.name, ctx, resealed.envelope)
    assert again.vtpcm_id == imported.vtpcm_id and again.pid == imported.pid
    for _ in range(2):
        api.commit_incoming(b.name, ctx)
        api.commit_outgoing(a.name, ctx)
    after_b = api.get(b.name, info.instance_uuid)
    assert (after_b.state, after_b.generation) == ("ACTIVE", 1)
    gone = api.get(a.name, info.instance_uuid)
    assert gone.state == "DESTROYED" and not gone.running
    assert not pa.state_dir.exists()
    assert not (a.state_root / "keys" / (info.vtpcm_id + ".keys")).exists()
    # the old generation cannot come back on the source
    with pytest.raises(exception.InvalidTransition):
        api.start(a.name, info.instance_uuid)
    # A valid envelope (the real migration key, sealed to the source's own
    # certified KEM key with a matching context) for the old generation 0:
    # it opens, and only the tombstone's generation refuses it.
    back = m.MigrationContext(str(uuid.uuid4()), info.instance_uuid, 0, b.name, a.name)
    envelope = sealing.seal(api.get_identity(a.name, os.urandom(32)).kem_public,
                            b.keys(imported.vtpcm_id).migration_key, context_from(back))
    with pytest.raises(exception.GenerationMismatch) as err:
        api.prepare_incoming(a.name, back, envelope)
    assert "generation 0 refused, authoritative generation is > 0" in str(err.value)
    assert api.get(a.name, info.instance_uuid).state == "DESTROYED"
    assert not pa.state_dir.exists()


def test_state_digest_answers_both_sides_over_rpc(cluster):
    """API 1.12, signed both ways: the source's current permanent state and
    the destination's first write after prepare_incoming (here the agent's
    own import_state) give one digest per nonce; before the import the
    destination cannot tell."""
    api, a, b = cluster
    info = _new(api, a)
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    nonce = os.urandom(32)
    early = api.state_digest(b.name, ctx, "destination", nonce)
    assert (early.side, early.digest, early.reason) == (
        "destination", None, "no write of the permanent state seen yet")
    api.import_state(b.name, api.export_state(a.name, info.instance_uuid))
    source = api.state_digest(a.name, ctx, "source", nonce)
    dest = api.state_digest(b.name, ctx, "destination", nonce)
    assert (source.reason, dest.reason) == ("", "")
    assert source.digest is not None and source.digest == dest.digest
    assert api.state_digest(a.name, ctx, "source", os.urandom(32)).digest != source.digest
    with pytest.raises(exception.MigrationError) as err:
        api.state_digest(a.name, ctx, "destination", nonce)
    assert "asked as the destination side" in str(err.value)
    api.abort_incoming(b.name, ctx)
    api.abort_outgoing(a.name, ctx)


def test_import_with_other_migration_key_fails_and_changes_nothing(cluster):
    """Blobs of vTPCM X set into the incoming vTPCM prepared for Y (Y's
    migration key): swtpm refuses them, X is unchanged, Y's incoming stays
    usable and takes Y's own state afterwards."""
    api, a, b = cluster
    x, y = _new(api, a), _new(api, a)
    px, py = (a.paths(v.instance_uuid, v.vtpcm_id) for v in (x, y))
    tpmtools.write_guest_state(px, b"state of x", os.urandom(32), make_key=False)
    tpmtools.write_guest_state(py, b"state of y", os.urandom(32), make_key=False)
    x_before, y_before = (tpmtools.read_guest_state(p, False) for p in (px, py))
    ctx = _hand_over(api, a, b, y.instance_uuid, 0)
    blobs_x = api.export_state(a.name, x.instance_uuid)
    forged = dataclasses.replace(blobs_x, instance_uuid=y.instance_uuid,
                                 migration_id=ctx.migration_id)
    with pytest.raises(exception.StateImportError) as err:
        api.import_state(b.name, forged)
    assert "wrong migration key" in str(err.value)
    incoming = api.get(b.name, y.instance_uuid)
    assert incoming.state == "MIGRATING_IN" and incoming.running
    assert tpmtools.read_guest_state(px, False) == x_before
    api.import_state(b.name, api.export_state(a.name, y.instance_uuid))
    assert tpmtools.read_guest_state(b.paths(y.instance_uuid, incoming.vtpcm_id),
                                     False) == y_before


def test_import_only_once_and_only_into_its_migration(cluster):
    """No rollback through import_state: not into a live vTPCM, not for
    another migration, not a second time."""
    api, a, b = cluster
    src = _new(api, a)
    ctx = _hand_over(api, a, b, src.instance_uuid, 0)
    blobs = api.export_state(a.name, src.instance_uuid)
    with pytest.raises(exception.InvalidTransition):
        api.import_state(a.name, blobs)  # the live source itself
    with pytest.raises(exception.MigrationError):
        api.import_state(b.name, dataclasses.replace(blobs, migration_id=str(uuid.uuid4())))
    api.import_state(b.name, blobs)
    with pytest.raises(exception.StateImportError) as err:
        api.import_state(b.name, blobs)  # replayed
    assert "already holds state" in str(err.value)
    api.commit_incoming(b.name, ctx)
    with pytest.raises(exception.InvalidTransition):
        api.import_state(b.name, blobs)  # now live


def test_no_plaintext_state_on_disk_or_in_logs(cluster, tmp_path):
    """After a hand-over to B (B's own fresh at-rest key), nothing either
    agent owns (state and key files, agent and swtpm logs, run dirs) nor the
    exported blobs holds a key of the vTPCM or a secret window of its
    permanent or volatile plaintext state, in any encoding."""
    api, a, b = cluster
    info = _new(api, a)
    pa = a.paths(info.instance_uuid, info.vtpcm_id)
    tpmtools.write_guest_state(pa, os.urandom(48), os.urandom(32), make_key=True)
    api.stop(a.name, info.instance_uuid)  # state, volatile included, on disk
    keys = a.keys(info.vtpcm_id)
    found = tpmtools.secrets_of_state(pa.state_dir, keys.at_rest_key, short_dir("vtpl"))
    assert len(found) > 100
    api.start(a.name, info.instance_uuid)
    earlier = keys.migration_key
    keys = a.keys(info.vtpcm_id)  # the start began a new migration key epoch
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    blobs = api.export_state(a.name, info.instance_uuid)
    incoming = api.import_state(b.name, blobs)
    fresh = b.keys(incoming.vtpcm_id)
    assert fresh.migration_key == keys.migration_key and fresh.at_rest_key != keys.at_rest_key
    secrets = [("source at-rest key", keys.at_rest_key), ("migration key", keys.migration_key),
               ("destination's fresh at-rest key", fresh.at_rest_key),
               ("the previous epoch's migration key", earlier)]
    scanned = [*tpmtools.files(a.state_root, a.run_dir, b.state_root, b.run_dir),
               a.agent.log_file, b.agent.log_file]
    assert sum(p.name.endswith(".keys") for p in scanned) >= 2
    assert any(p.parent.name == "logs" and p.suffix == ".log" for p in scanned)  # swtpm
    haystack = leakscan.SEP.join([*(p.read_bytes() for p in scanned if p.is_file()),
                                  blobs.permanent, blobs.volatile])
    leakscan.assert_finds(secrets, found, haystack)
    assert leakscan.hits(secrets, haystack) == []
    assert leakscan.window_hits(found, haystack) == 0
    api.commit_incoming(b.name, ctx)
    api.commit_outgoing(a.name, ctx)


def test_a_source_swtpm_dead_at_the_abort_is_reported_once(cluster):
    """Found by the e2e lab cell under CI load: the source's swtpm killed
    during the copy, Nova's rollback aborted before the watchdog's next
    pass (2 s), the abort left the vTPCM STOPPED and no pass takes that for
    a crash: the operator's audit never heard of it. The abort reports it,
    once: the next migration of the still broken guest (its record keeps
    no dead pid) is no second crash to a pass."""
    api, a, b = cluster
    info = _new(api, a)
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    api.abort_incoming(b.name, ctx)
    pid = _kill_swtpm(api, a, info.instance_uuid)
    paths = a.paths(info.instance_uuid, info.vtpcm_id)
    # SIGKILL delivered (a zombie is dead to the agent); no pass yet, mostly
    wait_for("the swtpm dead", lambda: not process.is_alive(pid, paths), 10, interval=0.01)
    api.abort_outgoing(a.name, ctx)
    after = api.get(a.name, info.instance_uuid)
    assert (after.state, after.running) == ("STOPPED", False)
    line = "AUDIT swtpm of instance %s" % info.instance_uuid
    wait_for("the crash in the agent log", lambda: line in a.agent.log_text(), 10)
    again = _hand_over(api, a, b, info.instance_uuid, 0)  # a cold migration, say
    time.sleep(2.5)  # one more watchdog pass: it adds nothing
    assert api.health(a.name).crashed == ()
    api.abort_incoming(b.name, again)
    api.abort_outgoing(a.name, again)
    said = [x for x in a.agent.log_text().splitlines() if line in x]
    assert len(said) == 1, said
    assert "died (pid %d)" % pid in said[0] and "nova reboot --hard" in said[0]
    back = api.start(a.name, info.instance_uuid)  # the guest's hard reboot
    assert back.running and back.state == "ACTIVE"


def test_agent_kill9_and_sigterm_keep_swtpm_and_readopt(cluster):
    api, a, _ = cluster
    info = _new(api, a)
    swtpm_pid = info.pid
    a.agent.kill9()
    os.kill(swtpm_pid, 0)  # still alive
    a.agent.start()
    a.agent.wait_ready(api)
    again = api.get(a.name, info.instance_uuid)
    assert again.running and again.pid == swtpm_pid
    assert api.start(a.name, info.instance_uuid).pid == swtpm_pid  # no double start
    a.agent.stop()  # SIGTERM
    os.kill(swtpm_pid, 0)
    a.agent.start()
    a.agent.wait_ready(api)
    health = api.health(a.name)
    assert health.crashed == ()
    assert api.get(a.name, info.instance_uuid).pid == swtpm_pid
    # a crashed swtpm is detected and reported by the agent's watchdog; the
    # guest's hard reboot (start) brings it back
    os.kill(swtpm_pid, signal.SIGKILL)
    _wait_crashed(api, a, info.instance_uuid)
    back = api.start(a.name, info.instance_uuid)
    assert back.running and back.state == "ACTIVE" and back.pid != swtpm_pid
    assert api.health(a.name).crashed == ()


def _raw(api: AgentAPI, host: str, method: str, payload):
    cctxt = api.client.prepare(server=host, version="1.0")
    return cctxt.call({}, method, payload=payload)


def test_bad_input_is_refused_clearly_and_changes_nothing(cluster):
    api, a, b = cluster
    info = _new(api, a)
    with pytest.raises(exception.NotFound) as err:
        api.get(a.name, str(uuid.uuid4()))
    assert "not found" in str(err.value)
    with pytest.raises(exception.AlreadyExists):
        api.create(a.name, info.instance_uuid)
    # Truncated and tampered blobs reach the destination's blob check (an
    # incoming vTPCM prepared for this migration) and are refused there.
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    blobs = api.export_state(a.name, info.instance_uuid)
    for bad, reason in (
            (dataclasses.replace(blobs, permanent=blobs.permanent[:100]),
             "bytes but has 100"),
            (dataclasses.replace(blobs, permanent=blobs.permanent[:-40] + bytes(
                b ^ 0x5A for b in blobs.permanent[-40:])), "TPM_DECRYPT_ERROR")):
        with pytest.raises(exception.StateImportError) as err:
            api.import_state(b.name, bad)
        assert reason in str(err.value), str(err.value)
        incoming = api.get(b.name, info.instance_uuid)
        assert incoming.state == "MIGRATING_IN" and incoming.running
    api.abort_incoming(b.name, ctx)
    api.abort_outgoing(a.name, ctx)
    after = api.get(a.name, info.instance_uuid)
    assert after.state == "ACTIVE" and after.pid == info.pid and after.running
    for method, payload, field in (
            ("get", {"instance_uuid": "../../etc/passwd"}, "instance_uuid"),
            ("get", {"instance_uuid": 42}, "instance_uuid"),
            ("get", {}, "instance_uuid"),
            ("create", {"instance_uuid": info.instance_uuid, "extra": 1}, "extra"),
            ("import_state", {**blobs.to_wire(), "permanent": "A" * 400000}, "permanent"),
            ("import_state", {**blobs.to_wire(), "generation": "zero"}, "generation"),
            ("quote", {"nonce": "AAAA", "pcrs": [0]}, "nonce"),
            ("quote", {"nonce": "A" * 44, "pcrs": [99]}, "pcrs")):
        with pytest.raises(exception.InvalidPayload) as err:
            _raw(api, a.name, method, payload)
        assert err.value.kwargs["field"] == field, (method, err.value)
    assert api.get(a.name, info.instance_uuid).pid == info.pid
    log = a.agent.log_text()
    assert "Refused import_state" in log
    assert blobs.to_wire()["permanent"][:64] not in log


def test_abort_of_a_seal_that_never_came_leaves_an_arrived_vtpcm_live(cluster):
    """Found under load (tests/functional/engine/test_load.py): a vTPCM that
    arrived by migration X keeps X's id while ACTIVE; the abort of a later
    migration Y whose seal never reached the agent (the engine died first)
    was refused ("ACTIVE in migration X, expected MIGRATING_OUT"), and Y
    stayed RESTORING for good. Now it succeeds, changes nothing, and a late
    seal of Y is refused."""
    api, a, b = cluster
    info = _new(api, a)
    arrived = _hand_over(api, a, b, info.instance_uuid, 0)
    api.import_state(b.name, api.export_state(a.name, info.instance_uuid))
    api.commit_incoming(b.name, arrived)
    api.commit_outgoing(a.name, arrived)
    here = api.get(b.name, info.instance_uuid)
    assert (here.state, here.generation, here.migration_id) == (
        "ACTIVE", 1, arrived.migration_id)
    never_sealed = m.MigrationContext(str(uuid.uuid4()), info.instance_uuid, 1, b.name,
                                      a.name)
    for _ in range(2):  # idempotent
        api.abort_outgoing(b.name, never_sealed)
    after = api.get(b.name, info.instance_uuid)
    assert (after.state, after.generation, after.migration_id, after.pid) == (
        "ACTIVE", 1, arrived.migration_id, here.pid)
    kem = api.get_identity(a.name, os.urandom(32)).kem_public
    with pytest.raises(exception.MigrationError,
                       match="this migration was aborted; a new migration needs a new id"):
        api.seal_migration_key(b.name, never_sealed, kem)
    assert api.get(b.name, info.instance_uuid).state == "ACTIVE"
    # positive control: a migration of the vTPCM with a new id still seals
    _hand_over(api, b, a, info.instance_uuid, 1)


def test_abort_steps_restore_the_source_and_may_be_retried(cluster):
    api, a, b = cluster
    info = _new(api, a)
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    incoming = api.get(b.name, info.instance_uuid)
    for _ in range(2):
        api.abort_incoming(b.name, ctx)
        api.abort_outgoing(a.name, ctx)
    with pytest.raises(exception.NotFound):
        api.get(b.name, info.instance_uuid)
    assert not (b.state_root / "keys" / (incoming.vtpcm_id + ".keys")).exists()
    assert not (b.state_root / "vtpcms" / incoming.vtpcm_id).exists()
    source = api.get(a.name, info.instance_uuid)
    assert (source.state, source.generation, source.migration_id, source.pid) == \
        ("ACTIVE", 0, None, info.pid)
    # a commit for the aborted migration is refused on both sides
    with pytest.raises(exception.MigrationError) as err:
        api.commit_outgoing(a.name, ctx)
    assert "is ACTIVE in migration None, expected MIGRATING_OUT" in str(err.value)
    with pytest.raises(exception.NotFound):
        api.commit_incoming(b.name, ctx)
    assert api.get(a.name, info.instance_uuid).state == "ACTIVE"
    # and the same generation can migrate again afterwards
    _hand_over(api, a, b, info.instance_uuid, 0)


def test_a_timeout_abort_keeps_an_incoming_vtpcm_that_received_state(cluster):
    """The engine's deadline abort (only_if_unused) must not destroy a vTPCM
    the guest may already use, and says so with its own error class, which
    the engine turns into the protocol's DestinationInUse."""
    api, a, b = cluster
    info = _new(api, a)
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    api.abort_incoming(b.name, dataclasses.replace(ctx, migration_id=str(uuid.uuid4())),
                       True)  # another migration's abort: nothing to do here
    api.import_state(b.name, api.export_state(a.name, info.instance_uuid))
    incoming = api.get(b.name, info.instance_uuid)
    with pytest.raises(exception.DestinationInUse) as err:
        api.abort_incoming(b.name, ctx, True)
    assert "already received its state" in str(err.value)
    kept = api.get(b.name, info.instance_uuid)
    assert (kept.state, kept.vtpcm_id, kept.running) == \
        ("MIGRATING_IN", incoming.vtpcm_id, True)
    # the commit still goes through; the source's copy is shredded
    api.commit_incoming(b.name, ctx)
    api.commit_outgoing(a.name, ctx)
    assert api.get(b.name, info.instance_uuid).state == "ACTIVE"
    assert api.get(a.name, info.instance_uuid).state == "DESTROYED"


# --- a swtpm that dies (issue 10, point 2) --------------------------------------------

ZERO_PCR = bytes(32)


def _guest_state_after_restart(paths, initialized: bool) -> dict[str, bytes]:
    """What the guest finds once QEMU is started again: INIT + TPM2_Startup
    (a hard reboot), unless swtpm already did both (startup-clear)."""
    if not initialized:
        tpmtools.power_on(paths)
    return tpmtools.read_guest_state(paths, with_key=True)


def test_a_dead_swtpm_of_a_running_vm_is_reported_and_back_at_its_hard_reboot(cluster):
    """kill -9 of a running vTPCM's swtpm: reported within seconds, NOT
    restarted (QEMU never reconnects; a restarted swtpm would serve whoever
    opens its socket); the guest's hard reboot (start) brings it back at the
    same socket, under the same keys, from the permanent state file: NV
    index and persistent key kept, PCR16 reset (volatile lost)."""
    api, a, _ = cluster
    info = _new(api, a)
    paths = a.paths(info.instance_uuid, info.vtpcm_id)
    tpmtools.write_guest_state(paths, b"kept across a swtpm crash", os.urandom(32),
                               make_key=True)
    before = tpmtools.read_guest_state(paths, with_key=True)
    assert before["pcr16"] != ZERO_PCR
    _kill_swtpm(api, a, info.instance_uuid)
    killed = time.monotonic()
    _wait_crashed(api, a, info.instance_uuid)
    assert time.monotonic() - killed < 6.0  # 2 s watchdog interval
    time.sleep(2.5)  # one more watchdog pass: still down, reported once
    assert not api.get(a.name, info.instance_uuid).running
    assert process.find_running(paths) is None
    assert not process.socket_in_use(paths.ctrl_socket)
    log = a.agent.log_text()
    assert log.count("AUDIT swtpm of instance %s" % info.instance_uuid) == 1
    assert "nova reboot --hard" in log
    back = api.start(a.name, info.instance_uuid)  # the guest's hard reboot
    assert (back.state, back.vtpcm_id, back.generation, back.ctrl_socket, back.running) == \
        ("ACTIVE", info.vtpcm_id, info.generation, info.ctrl_socket, True)
    after = _guest_state_after_restart(paths, initialized=True)  # startup-clear in the lab
    assert after["pcr16"] == ZERO_PCR
    assert {k: v for k, v in after.items() if k != "pcr16"} == \
        {k: v for k, v in before.items() if k != "pcr16"}
    assert api.health(a.name).crashed == ()
    api.destroy(a.name, info.instance_uuid)


def test_a_dead_incoming_swtpm_after_the_switchover_still_commits(cluster):
    """The issue's first case: the destination swtpm dies after it received
    the state, before commit. commit_incoming brings it back (or the watchdog
    did) and commits; the guest's permanent state is there on B."""
    api, a, b = cluster
    info = _new(api, a)
    pa = a.paths(info.instance_uuid, info.vtpcm_id)
    tpmtools.write_guest_state(pa, b"survives the destination crash", os.urandom(32),
                               make_key=True)
    before = tpmtools.read_guest_state(pa, with_key=True)
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    api.import_state(b.name, api.export_state(a.name, info.instance_uuid))
    incoming = api.get(b.name, info.instance_uuid)
    _kill_swtpm(api, b, info.instance_uuid)
    api.commit_incoming(b.name, ctx)  # at once: not waiting for the watchdog
    committed = api.get(b.name, info.instance_uuid)
    assert (committed.state, committed.generation, committed.running) == ("ACTIVE", 1, True)
    assert committed.pid != incoming.pid and committed.vtpcm_id == incoming.vtpcm_id
    api.commit_outgoing(a.name, ctx)
    assert api.get(a.name, info.instance_uuid).state == "DESTROYED"
    after = _guest_state_after_restart(b.paths(info.instance_uuid, incoming.vtpcm_id),
                                       initialized=False)
    assert {k: v for k, v in after.items() if k != "pcr16"} == \
        {k: v for k, v in before.items() if k != "pcr16"}
    api.destroy(b.name, info.instance_uuid)


def test_a_dead_outgoing_swtpm_is_not_restarted_and_an_abort_gets_it_back(cluster):
    """The source's swtpm dies mid-migration, before the switchover: it stays
    down (reported), abort_outgoing needs no running swtpm (the vTPCM is
    the source's again, STOPPED), and the VM's hard reboot (start) brings
    it back."""
    api, a, b = cluster
    info = _new(api, a)
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    _kill_swtpm(api, a, info.instance_uuid)
    _wait_crashed(api, a, info.instance_uuid)
    api.abort_incoming(b.name, ctx)
    api.abort_outgoing(a.name, ctx)
    restored = api.get(a.name, info.instance_uuid)  # the source's again, not running
    assert (restored.state, restored.generation, restored.running) == ("STOPPED", 0, False)
    assert api.start(a.name, info.instance_uuid).running
    api.destroy(a.name, info.instance_uuid)


def test_an_old_source_swtpm_after_the_switchover_stays_down(cluster):
    """Review finding (issue 10): the watchdog brought back the source's
    generation-g swtpm after the switchover, unattached, with reset PCRs any
    process able to open its 0660 socket could extend. It stays down; the
    commit shreds it."""
    api, a, b = cluster
    info = _new(api, a)
    pa = a.paths(info.instance_uuid, info.vtpcm_id)
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    api.import_state(b.name, api.export_state(a.name, info.instance_uuid))
    api.commit_incoming(b.name, ctx)  # the switchover: B is the authority
    _kill_swtpm(api, a, info.instance_uuid)
    _wait_crashed(api, a, info.instance_uuid)
    time.sleep(2.5)  # one more watchdog pass
    old = api.get(a.name, info.instance_uuid)
    assert (old.state, old.running) == ("MIGRATING_OUT", False)
    assert process.find_running(pa) is None and not process.socket_in_use(pa.ctrl_socket)
    assert "shredded at the commit" in a.agent.log_text()
    with pytest.raises(exception.InvalidTransition):  # and nobody starts it
        api.start(a.name, info.instance_uuid)
    api.commit_outgoing(a.name, ctx)
    assert api.get(a.name, info.instance_uuid).state == "DESTROYED"
    api.destroy(b.name, info.instance_uuid)


def test_a_vtpcm_whose_state_file_is_gone_is_never_started_empty(cluster):
    """Never a fresh TPM in place of the tenant's: without its permanent
    state file the vTPCM stays down, reported as crashed, and its start
    (the guest's hard reboot) is refused."""
    api, a, _ = cluster
    info = _new(api, a)
    paths = a.paths(info.instance_uuid, info.vtpcm_id)
    (paths.state_dir / "tpm2-00.permall").unlink()
    _kill_swtpm(api, a, info.instance_uuid)
    _wait_crashed(api, a, info.instance_uuid)
    with pytest.raises(exception.SwtpmError, match="permanent state file is missing"):
        api.start(a.name, info.instance_uuid)
    assert not api.get(a.name, info.instance_uuid).running
    assert process.find_running(paths) is None
    assert not (paths.state_dir / "tpm2-00.permall").exists()
    api.destroy(a.name, info.instance_uuid)


def test_a_foreign_process_on_the_socket_is_left_alone(cluster):
    """The swtpm dies while something else took its socket path (here while
    the agent was paused): the agent does not unlink that socket to start a
    second swtpm there; the vTPCM stays down until the socket is free."""
    api, a, _ = cluster
    info = _new(api, a)
    os.kill(a.agent.pid, signal.SIGSTOP)
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.kill(info.pid, signal.SIGKILL)  # not through the paused agent
        ctrl = Path(info.ctrl_socket)
        wait_for("dead swtpm", lambda: not process.is_alive(info.pid, a.paths(
            info.instance_uuid, info.vtpcm_id)), 5)
        ctrl.unlink()
        foreign.bind(str(ctrl))
        foreign.listen(4)
    finally:
        os.kill(a.agent.pid, signal.SIGCONT)
    try:
        wait_for("crash report", lambda: info.instance_uuid in api.health(a.name).crashed, 10)
        with pytest.raises(exception.SwtpmError,
                           match=r"another process \(pid %d, uid %d\) serves its control "
                                 r"socket" % (os.getpid(), os.getuid())):
            api.start(a.name, info.instance_uuid)
        assert not api.get(a.name, info.instance_uuid).running
        assert ctrl.exists()
    finally:
        foreign.close()
        ctrl.unlink(missing_ok=True)
    back = api.start(a.name, info.instance_uuid)  # once it is gone
    assert back.state == "ACTIVE" and back.running
    api.destroy(a.name, info.instance_uuid)


def test_a_swtpm_that_qemu_shut_down_is_not_a_crash(cluster):
    """QEMU sends CMD_SHUTDOWN when its guest stops (or its outgoing
    migration completed): swtpm exits cleanly, nothing is lost, and the
    watchdog leaves it for the VM's next start instead of reporting a crash."""
    api, a, _ = cluster
    info = _new(api, a)
    with ctrl.CtrlClient(info.ctrl_socket) as client:
        client.shutdown()
    wait_for("clean exit", lambda: not api.get(a.name, info.instance_uuid).running, 5)
    time.sleep(3)  # at least one watchdog pass
    assert not api.get(a.name, info.instance_uuid).running
    assert "AUDIT swtpm of instance %s" % info.instance_uuid not in a.agent.log_text()
    again = api.start(a.name, info.instance_uuid)  # the VM's next start
    assert again.running and again.pid != info.pid
    api.destroy(a.name, info.instance_uuid)


def test_reclaim_outgoing_brings_the_source_back_only_under_a_new_generation(cluster):
    """Review fix3: past the commit point, with the destination dead, the
    source's intact copy is live again only at a generation above the
    destination's (never generation + 1); retried, it is done once, and
    the migration's steps are refused on it afterwards."""
    api, a, b = cluster
    info = _new(api, a)
    ctx = _hand_over(api, a, b, info.instance_uuid, 0)
    with pytest.raises(exception.GenerationMismatch):
        api.reclaim_outgoing(a.name, ctx, 1)  # the destination's generation
    assert api.get(a.name, info.instance_uuid).state == "MIGRATING_OUT"
    for _ in range(2):
        api.reclaim_outgoing(a.name, ctx, 2)
    back = api.get(a.name, info.instance_uuid)
    assert (back.state, back.generation, back.migration_id, back.pid) == \
        ("ACTIVE", 2, None, info.pid)
    with pytest.raises(exception.MigrationError):
        api.commit_outgoing(a.name, ctx)
    with pytest.raises(exception.MigrationError, match="is ACTIVE in migration None"):
        api.reclaim_outgoing(a.name, ctx, 3)  # a later reclaim of the old context
    api.abort_incoming(b.name, ctx)
    api.destroy(a.name, info.instance_uuid)
