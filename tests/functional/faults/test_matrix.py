"""The fault-injection matrix (issue 10, point 4): every daemon, swtpm and
the broker, killed at every step of a migration (``matrix.run_cell``), on one
deployment with two tests first: the planted positive controls of the
checker, and issue 10's begin that never returned (point 1).

A begin that never returned success to its caller is aborted once its
engine run's lease lapsed (``[engine] worker_lease_ttl``), not at the
deadline. The first failure: the engine dies between the seal and the
prepare; after its restart the migration stayed PREPARING until
``[migration] timeout`` (3 h), the destination kept a running swtpm, state
and key, and every new migration of the VM was refused."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid

import pytest

from tests.functional import tpmtools
from tests.functional.deploy import frozen, permanent, running_vtpcm, switchover
from tests.functional.faults.cells import CELLS
from tests.functional.faults.deployment import (
    BEGIN_STEP_BOUND,
    WORKER_LEASE_TTL,
    Deployment,
    assert_one_place,
    files_now,
    wait_state,
)
from tests.functional.faults.matrix import run_cell
from tests.functional.faults.relay import BrokerRelay
from tests.functional.harness import wait_for
from vtpcm_common import exception

pytestmark = pytest.mark.functional

def test_checker_finds_a_state_dir_a_key_file_and_a_process_left_behind(
        deployment: Deployment) -> None:
    d = deployment
    files = files_now(d)
    instance, vtpcm_id = running_vtpcm(d, "a")
    assert assert_one_place(d, instance, files) == ("a", vtpcm_id, True)
    b = d.hosts["b"]
    orphan_dir = b.state_root / "vtpcms" / str(uuid.uuid4())
    orphan_dir.mkdir(parents=True)
    with pytest.raises(AssertionError, match=orphan_dir.name):
        assert_one_place(d, instance, files)
    shutil.rmtree(orphan_dir)
    orphan_key = b.state_root / "keys" / (str(uuid.uuid4()) + ".keys")
    orphan_key.parent.mkdir(parents=True, exist_ok=True)
    orphan_key.write_bytes(b"x")
    with pytest.raises(AssertionError, match=orphan_key.name.removesuffix(".keys")):
        assert_one_place(d, instance, files)
    orphan_key.unlink()
    # a process naming the instance, as an orphan swtpm's argv does
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", instance])
    try:
        with pytest.raises(AssertionError, match=str(proc.pid)):
            assert_one_place(d, instance, files)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert assert_one_place(d, instance, files) == ("a", vtpcm_id, True)
    d.at["a"].destroy_vtpcm(instance)


def test_engine_killed_inside_begin_is_aborted_once_its_lease_lapses(
        deployment: Deployment) -> None:
    d = deployment
    a, b = d.hosts["a"], d.hosts["b"]
    files = files_now(d)  # other instances' (earlier tests of the module)
    instance, vtpcm_id = running_vtpcm(d, "a")
    before = tpmtools.read_guest_state(a.paths(instance, vtpcm_id), with_key=True)
    mid = str(uuid.uuid4())
    errors: list[Exception] = []

    def caller() -> None:  # Nova's begin; its caller dies with the engine
        try:
            d.at["a"].begin(mid, instance, a.name, b.name)
        except exception.VTPCMException as err:
            errors.append(err)
    thread = threading.Thread(target=caller, daemon=True)
    assert b.agent.pid is not None
    with frozen(b.agent.pid):  # the prepare waits in B's queue
        thread.start()
        wait_state(d, mid, {"PREPARING"}, 20)  # sealed, not yet prepared
        d.engine.kill9()
    # B's agent now runs the prepare the dead engine sent: the destination
    # holds a swtpm, state and key for a begin nobody will ever finish
    incoming = wait_for("the late prepare on B", lambda: (
        lambda i: i if i.state == "MIGRATING_IN" and i.running else None)(
            d.agents.get(b.name, instance)), 20)
    assert os.path.isdir(b.paths(instance, incoming.vtpcm_id).state_dir)
    thread.join(timeout=30)
    assert errors, "the begin answered although its engine was killed"
    d.restart_engine()
    # once the killed run's lease lapsed (the new run reconciles every
    # second), not after the step bound nor the deadline: waiting less
    # than the step bound shows which rule aborted it
    assert wait_state(d, mid, {"ABORTED"}, WORKER_LEASE_TTL + 10) == "ABORTED"
    assert WORKER_LEASE_TTL + 10 < BEGIN_STEP_BOUND
    info = d.operator.get_migration(mid)
    assert "holds no live lease" in (info.error or ""), info
    assert assert_one_place(d, instance, files)[:2] == ("a", vtpcm_id)
    assert tpmtools.read_guest_state(a.paths(instance, vtpcm_id), with_key=True) == before
    # the next migration of that VM succeeds
    mid2 = str(uuid.uuid4())
    assert d.at["a"].begin(mid2, instance, a.name, b.name).state == "PREPARED"
    switchover(d, instance, "a", "b")
    assert d.at["a"].commit(mid2).state == "COMMITTED"
    label, new_id, _ = assert_one_place(d, instance, files)
    assert label == "b"
    assert permanent(tpmtools.read_guest_state(b.paths(instance, new_id), with_key=True)) \
        == permanent(before)
    d.at["b"].destroy_vtpcm(instance)


def test_the_relay_really_cuts() -> None:
    """Positive control: a cut relay refuses connections, a restored one relays."""
    relay = BrokerRelay(("127.0.0.1", 5672)).start()
    try:
        relay.cut()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as conn:
            assert conn.recv(1) == b""  # closed at once
        relay.restore()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as conn:
            conn.sendall(b"AMQP\x00\x00\x09\x01")
            assert conn.recv(8)  # the broker's Connection.Start
    finally:
        relay.stop()


@pytest.mark.parametrize(("part", "step", "mode"), CELLS,
                         ids=["%s-%s-%s" % c for c in CELLS])
def test_fault(deployment: Deployment, part: str, step: str, mode: str) -> None:
    run_cell(deployment, part, step, mode)
