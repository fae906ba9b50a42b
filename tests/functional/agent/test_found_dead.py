"""A crashed swtpm that an operation settles where no watchdog pass looks
(an abort leaves the source's copy STOPPED, a commit shreds it, an abort
discards an incoming one) is handed to ``on_found_dead`` once the settled
state is written, and a hook that fails never fails the operation (review
of c1a656a, LOWs 1 and 2). Real association list and key store; the dead
swtpm is a reaped process whose pid file was left behind, as a SIGKILL
leaves it."""

import subprocess
import threading
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
                     source: str, dest: str) -> tuple[sealing.SealContext, int]:
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
    return ctx, pid


def _told(made: instances.InstanceManager, raising: bool = False) -> list[Any]:
    """What the hook was told, with the record as the hook saw it."""
    told: list[Any] = []

    def hook(dead: instances.FoundDead) -> None:
        record = made.associations.find(dead.instance_uuid)
        told.append((dead.outcome, dead.found_by, dead.pid,
                     None if record is None else (record.state, record.pid)))
        if raising:
            raise RuntimeError("the hook failed")
    made.on_found_dead = hook
    return told


def test_the_abort_reports_a_dead_source_swtpm_once_stopped_is_written(manager):
    ctx, pid = _with_dead_swtpm(manager, VTPCMState.MIGRATING_OUT, "discard-host", "dest")
    told = _told(manager)
    settled = manager.abort_outgoing(ctx)
    assert (settled.state, settled.pid) == (VTPCMState.STOPPED, None)
    assert told == [("stopped", "the abort of migration %s" % ctx.migration_id, pid,
                     (VTPCMState.STOPPED, None))]
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
    ctx, pid = _with_dead_swtpm(manager, VTPCMState.MIGRATING_OUT, "discard-host", "dest")
    told = _told(manager, raising=True)
    settled = manager.abort_outgoing(ctx)
    assert settled.state is VTPCMState.STOPPED and len(told) == 1
    assert ("Could not report the crashed swtpm of instance %s found by the abort of "
            "migration %s (RuntimeError)" % (ctx.instance_uuid, ctx.migration_id)
            in caplog.text)
    assert "the hook failed" not in caplog.text  # the type only


def test_the_commit_reports_the_dead_copy_it_shredded(manager):
    ctx, pid = _with_dead_swtpm(manager, VTPCMState.MIGRATING_OUT, "discard-host", "dest")
    told = _told(manager)
    manager.commit_outgoing(ctx)
    assert told == [("shredded", "the commit of migration %s" % ctx.migration_id, pid,
                     (VTPCMState.DESTROYED, None))]


def test_a_shred_that_fails_half_way_still_reports_the_crash(manager, monkeypatch):
    """Review of 291bf9c, NIT 1: the failed shred took the pid file, so
    the retry finds no crash left to report."""
    ctx, pid = _with_dead_swtpm(manager, VTPCMState.MIGRATING_OUT, "discard-host", "dest")
    told = _told(manager)

    def half_way(assoc: object) -> None:
        manager.paths(ctx.instance_uuid, manager.associations.get(
            ctx.instance_uuid).vtpcm_id).pid_file.unlink()
        raise OSError("the state dir could not be removed")
    monkeypatch.setattr(manager, "_shred", half_way)
    with pytest.raises(OSError, match="could not be removed"):
        manager.commit_outgoing(ctx)
    assert [(t[0], t[2]) for t in told] == [("shred-failed", pid)]


def test_the_operators_rollback_reports_a_dead_source_swtpm(manager):
    """Review round 3, LOW 4: reclaim_outgoing settles like the abort."""
    ctx, pid = _with_dead_swtpm(manager, VTPCMState.MIGRATING_OUT, "discard-host", "dest")
    told = _told(manager)
    settled = manager.reclaim_outgoing(ctx, 2)
    assert (settled.state, settled.pid, settled.generation) == (VTPCMState.STOPPED, None, 2)
    assert told == [("stopped", "the operator's rollback of migration %s" % ctx.migration_id,
                     pid, (VTPCMState.STOPPED, None))]


def test_a_discard_that_fails_still_reports_the_crash_as_such(manager, monkeypatch):
    ctx, pid = _with_dead_swtpm(manager, VTPCMState.MIGRATING_IN, "src", "discard-host")
    told = _told(manager)

    def refused(*args: object) -> None:
        raise OSError("the state dir could not be removed")
    monkeypatch.setattr(manager, "_discard", refused)
    with pytest.raises(OSError, match="could not be removed"):
        manager.abort_incoming(ctx)
    assert [(t[0], t[2]) for t in told] == [("discard-failed", pid)]


def test_the_abort_reports_the_dead_incoming_copy_it_discarded(manager):
    ctx, pid = _with_dead_swtpm(manager, VTPCMState.MIGRATING_IN, "src", "discard-host")
    told = _told(manager)
    manager.abort_incoming(ctx)
    assert told == [("discarded", "the abort of migration %s" % ctx.migration_id, pid, None)]


def test_an_instance_is_busy_to_another_thread_while_an_operation_holds_it(manager):
    """What the watchdog's pass asks before it forgets a reported crash
    (review round 4, LOW 1): another thread's operation holds the lock."""
    instance = str(uuid.uuid4())
    seen: list[bool] = []

    def ask() -> None:
        seen.append(manager.busy(instance))
    with manager._lock_for(instance):
        asker = threading.Thread(target=ask)
        asker.start()
        asker.join(timeout=10)
    asker = threading.Thread(target=ask)  # asked from the watchdog's thread
    asker.start()
    asker.join(timeout=10)
    assert seen == [True, False]
    # and it left the lock free (review round 5, LOW 1: a busy() that kept
    # it would block every later operation on the instance)
    lock = manager._lock_for(instance)
    assert lock.acquire(timeout=5)
    lock.release()
