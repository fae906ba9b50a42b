"""A crashed swtpm that an operation settles where no watchdog pass looks
(an abort leaves the source's copy STOPPED, a commit shreds it, an abort
discards an incoming one) is handed to ``on_found_dead`` once the settled
state is written, and a hook that fails never fails the operation (review
of c1a656a, LOWs 1 and 2). Real association list and key store; the dead
swtpm is a reaped process whose pid file was left behind, as a SIGKILL
leaves it."""

import subprocess
import uuid
from typing import Any

import pytest

from vtpcm_agent import instances, sealing
from vtpcm_agent.association import VTPCMState
from vtpcm_agent.keystore import InstanceKeys

pytestmark = pytest.mark.functional


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])  # noqa: S607 - a process that is gone
    proc.wait(timeout=10)
    return proc.pid


def _with_dead_swtpm(made: instances.InstanceManager, state: VTPCMState,
                     source: str, dest: str) -> sealing.SealContext:
    """A vTPCM in migration ``state`` whose swtpm died and left its pid file."""
    instance, vtpcm_id = str(uuid.uuid4()), str(uuid.uuid4())
    ctx = sealing.SealContext(str(uuid.uuid4()), instance, 0, source, dest)
    paths = made.paths(instance, vtpcm_id)
    initial = VTPCMState.MIGRATING_IN if state is VTPCMState.MIGRATING_IN \
        else VTPCMState.CREATING
    made.associations.add(instance_uuid=instance, vtpcm_id=vtpcm_id, state=initial,
                          generation=0, state_dir=str(paths.state_dir),
                          ctrl_socket=str(made.public_ctrl_socket(instance)),
                          migration_id=ctx.migration_id if initial is state else None)
    made.keystore.put(vtpcm_id, InstanceKeys.generate())
    paths.state_dir.mkdir(parents=True)
    pid = _dead_pid()
    if state is VTPCMState.MIGRATING_OUT:
        made.associations.transition(instance, VTPCMState.STOPPED)
        made.associations.transition(instance, state, migration_id=ctx.migration_id)
    made.associations.set_pid(instance, pid)
    paths.pid_file.parent.mkdir(parents=True, exist_ok=True)
    paths.pid_file.write_text(str(pid))
    assert made.crashed() == [instance]  # the planted crash is one to the watchdog
    return ctx


def _told(made: instances.InstanceManager, raising: bool = False) -> list[Any]:
    """What the hook was told, with the record as the hook saw it."""
    told: list[Any] = []

    def hook(dead: instances.FoundDead) -> None:
        record = made.associations.find(dead.instance_uuid)
        told.append((dead.settled, dead.found_by, dead.pid,
                     None if record is None else (record.state, record.pid)))
        if raising:
            raise RuntimeError("the hook failed")
    made.on_found_dead = hook
    return told


def test_the_abort_reports_a_dead_source_swtpm_once_stopped_is_written(manager):
    ctx = _with_dead_swtpm(manager, VTPCMState.MIGRATING_OUT, "discard-host", "dest")
    told = _told(manager)
    settled = manager.abort_outgoing(ctx)
    assert (settled.state, settled.pid) == (VTPCMState.STOPPED, None)
    assert told == [("stopped", "the abort of migration %s" % ctx.migration_id,
                     told[0][2], (VTPCMState.STOPPED, None))]
    assert manager.crashed() == []
    # no pid left on the STOPPED record: a later migration of the still
    # broken guest is no second crash to the watchdog, nor to the next abort
    again = sealing.SealContext(str(uuid.uuid4()), ctx.instance_uuid, 0, "discard-host",
                                "dest")
    manager.associations.transition(ctx.instance_uuid, VTPCMState.MIGRATING_OUT,
                                    migration_id=again.migration_id)
    assert manager.crashed() == []
    manager.abort_outgoing(again)
    assert len(told) == 1


def test_a_failing_hook_fails_no_abort(manager, caplog):
    ctx = _with_dead_swtpm(manager, VTPCMState.MIGRATING_OUT, "discard-host", "dest")
    told = _told(manager, raising=True)
    settled = manager.abort_outgoing(ctx)
    assert settled.state is VTPCMState.STOPPED and len(told) == 1
    assert ("Could not report the crashed swtpm of instance %s found by the abort of "
            "migration %s (RuntimeError)" % (ctx.instance_uuid, ctx.migration_id)
            in caplog.text)
    assert "the hook failed" not in caplog.text  # the type only


def test_the_commit_reports_the_dead_copy_it_shredded(manager):
    ctx = _with_dead_swtpm(manager, VTPCMState.MIGRATING_OUT, "discard-host", "dest")
    told = _told(manager)
    manager.commit_outgoing(ctx)
    assert [(t[0], t[1], t[3]) for t in told] == [
        ("shredded", "the commit of migration %s" % ctx.migration_id,
         (VTPCMState.DESTROYED, None))]


def test_the_abort_reports_the_dead_incoming_copy_it_discarded(manager):
    ctx = _with_dead_swtpm(manager, VTPCMState.MIGRATING_IN, "src", "discard-host")
    told = _told(manager)
    manager.abort_incoming(ctx)
    assert [(t[0], t[1], t[3]) for t in told] == [
        ("discarded", "the abort of migration %s" % ctx.migration_id, None)]
