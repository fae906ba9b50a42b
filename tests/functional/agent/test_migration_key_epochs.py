"""Rollback on the live path (issue 9 point 6), with REAL swtpm 0.7.1.

QEMU's migration stream carries the blobs swtpm gives under the migration
key, and the destination's incoming swtpm opens any blob sealed under the
key it was started with, whatever its generation. The agent starts every
vTPCM with a fresh migration key (a key epoch), so a stream captured before
the guest's last (re)start is refused by every later incoming swtpm.

Stream capture stands in for QEMU: ``export_state`` reads the blobs through
the same GET_STATEBLOB a migrating QEMU sends; ``import_state`` sets them as
QEMU's incoming side does (SET_STATEBLOB, then INIT). The incoming swtpm runs
with the key the source would seal for its next migration (the key store's).
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional import tpmtools
from tests.functional.agent.conftest import _kill_hard
from tests.refusal import refused
from vtpcm_agent import association, instances
from vtpcm_agent.association import VTPCMState
from vtpcm_agent.keystore import DevKeyFileHostKey, InstanceKeys, KeyStore
from vtpcm_agent.swtpm import ctrl, process
from vtpcm_common import exception

pytestmark = pytest.mark.functional


@pytest.fixture
def manager(short_dir: Path) -> Iterator[instances.InstanceManager]:
    settings = instances.AgentSettings(
        host="epoch-host", state_root=short_dir / "state", run_dir=short_dir / "run",
        create_ek=False)
    settings.state_root.mkdir()
    assoc = association.AssociationList(settings.state_root / "associations.sqlite")
    keys = KeyStore(settings.state_root / "keys", DevKeyFileHostKey(short_dir / "hostkey"))
    made = instances.InstanceManager(settings, assoc, keys)
    try:
        yield made
    finally:
        for record in made.list_vtpcms():
            paths = made.paths(record.instance_uuid, record.vtpcm_id)
            pid = process.find_running(paths) or record.pid
            if pid is not None:
                try:
                    process.stop(pid, paths, timeout=6.0)
                finally:
                    _kill_hard(pid, paths)
        assoc.close()


def _incoming(short_dir: Path, name: str, migration_key: bytes,
              swtpm_factory) -> process.SwtpmPaths:
    """An empty, never initialized swtpm as prepare_incoming starts it."""
    run = short_dir / name
    run.mkdir()
    paths = process.SwtpmPaths(short_dir / ("state-" + name), run / "ctrl", run / "pid",
                               run / "log")
    paths.state_dir.mkdir(mode=0o700)
    swtpm_factory(paths, InstanceKeys.generate().at_rest_key, migration_key)
    return paths


def test_a_stream_of_an_earlier_key_epoch_is_refused_by_a_later_incoming_swtpm(
        manager, short_dir, swtpm_factory):
    instance = str(uuid.uuid4())
    vtpcm_id = manager.create(instance).vtpcm_id
    manager.start(instance)
    _, captured = manager.export_state(instance)  # generation g's stream, epoch 1
    epoch1 = manager.keystore.get(vtpcm_id).migration_key
    manager.stop(instance)
    manager.start(instance)  # the guest's next boot or hard reboot: epoch 2
    epoch2 = manager.keystore.get(vtpcm_id)
    # the incoming swtpm of a later migration gets the key sealed then
    replay = _incoming(short_dir, "in1", epoch2.migration_key, swtpm_factory)
    with refused(exception.StateImportError,
                 "Importing state into vTPCM replayed failed: swtpm refused the state "
                 "(swtpm control channel SET_STATEBLOB failed: swtpm returned 0x00000021 "
                 "TPM_DECRYPT_ERROR); wrong migration key or damaged blob"):
        ctrl.import_state(replay.ctrl_socket, captured, vtpcm_id="replayed",
                          empty_target=True)
    # positive control: the current epoch's stream passes
    _, current = manager.export_state(instance)
    fresh = _incoming(short_dir, "in2", epoch2.migration_key, swtpm_factory)
    ctrl.import_state(fresh.ctrl_socket, current, vtpcm_id="current", empty_target=True)
    assert (fresh.state_dir / instances.PERMANENT_STATE_FILE).exists()
    # booleans only: a failing assert must not print a key
    rotated = not hmac.compare_digest(epoch2.migration_key, epoch1)
    assert rotated
    # and the at-rest key, which opens the state on disk, never changed
    same_at_rest = hmac.compare_digest(manager.keystore.get(vtpcm_id).at_rest_key,
                                       epoch2.at_rest_key)
    assert same_at_rest


def test_a_readopted_swtpm_keeps_the_key_it_runs_with(manager):
    """An agent restart re-adopts a running swtpm: rotating its stored key
    then would make the key store disagree with the running process. The
    record says STOPPED (a crash between the swtpm's start and the record's
    update), so start() passes its early "ACTIVE and running" exit and
    reaches the ``find_running`` branch this test is about."""
    instance = str(uuid.uuid4())
    vtpcm_id = manager.create(instance).vtpcm_id
    pid = manager.start(instance).pid
    before = manager.keystore.get(vtpcm_id).migration_key
    manager.associations.transition(instance, VTPCMState.STOPPED, pid=None)
    assert not manager.is_running(manager.get(instance))  # control: no early exit
    again = manager.start(instance)
    assert again.pid == pid  # re-adopted, not a second swtpm
    kept = hmac.compare_digest(manager.keystore.get(vtpcm_id).migration_key, before)
    assert kept


def test_swtpm_071_accepts_a_plaintext_stream_despite_its_migration_key(
        manager, short_dir, swtpm_factory):
    """Stack fact behind the open point in design.rst: what QEMU sets into
    an incoming swtpm is not required to carry the migration-key layer, so
    a forged plaintext state passes swtpm itself (the agent's own
    import_state refuses it; QEMU's path does not go through the agent).
    If a swtpm upgrade starts refusing it, this test says so."""
    instance = str(uuid.uuid4())
    vtpcm_id = manager.create(instance).vtpcm_id
    state_dir = manager.paths(instance, vtpcm_id).state_dir
    plain = tpmtools.plaintext_blobs(state_dir, manager.keystore.get(vtpcm_id).at_rest_key,
                                     short_dir)
    incoming = _incoming(short_dir, "in3", InstanceKeys.generate().migration_key,
                         swtpm_factory)
    with ctrl.CtrlClient(incoming.ctrl_socket) as client:
        client.set_stateblob(ctrl.BlobType.PERMANENT, plain[0].data, plain[0].flags)
        client.set_stateblob(ctrl.BlobType.VOLATILE, plain[1].data, plain[1].flags)
        client.init(delete_volatile=True)
    assert (incoming.state_dir / instances.PERMANENT_STATE_FILE).exists()
    # control: the agent's own import path refuses the same blobs
    other = _incoming(short_dir, "in4", InstanceKeys.generate().migration_key, swtpm_factory)
    with refused(exception.StateImportError,
                 "Importing state into vTPCM plain failed: Invalid input: permanent "
                 "blob is not encrypted under a migration key"):
        ctrl.import_state(other.ctrl_socket, ctrl.ExportedState(
            permanent=plain[0].data, permanent_flags=plain[0].flags,
            volatile=plain[1].data, volatile_flags=plain[1].flags),
            vtpcm_id="plain", empty_target=True)
