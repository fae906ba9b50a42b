"""uidprocs.sweep_files: a freed swtpm uid leaves nothing in the shared
temporary directories, whatever other users do there meanwhile (review of
kemcheck, LOW-1: one vanished entry ended the whole sweep)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.refusal import refused
from vtpcm_agent.swtpm import uidprocs
from vtpcm_common import exception

MY_UID = os.getuid()


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "tmp", tmp_path / "lock"
    for top in (first, second):
        top.mkdir()
        for name in ("a", "b", "c"):
            (top / name).write_text("x")
    return first, second


def test_an_entry_vanishing_meanwhile_does_not_stop_the_sweep(tmp_path, monkeypatch):
    first, second = _tree(tmp_path)
    real_stat = os.stat

    def racing_stat(name, *args, **kwargs):
        if name == "a" and kwargs.get("dir_fd") is not None:
            raise FileNotFoundError(2, "No such file or directory", name)
        return real_stat(name, *args, **kwargs)

    monkeypatch.setattr(uidprocs.os, "stat", racing_stat)
    removed = uidprocs.sweep_files(MY_UID, (first, second))
    assert sorted(removed) == sorted(str(p) for p in (
        first / "b", first / "c", second / "b", second / "c"))
    assert sorted(os.listdir(first)) == ["a"] and sorted(os.listdir(second)) == ["a"]


def test_a_failing_entry_is_reported_after_the_rest_was_swept(tmp_path, monkeypatch):
    first, second = _tree(tmp_path)
    real_remove = uidprocs.fstree.remove_at

    def failing_remove(dfd, name, shown, defuse_uid=None):
        if shown == str(first / "a"):
            raise PermissionError(13, "Permission denied", shown)
        return real_remove(dfd, name, shown, defuse_uid=defuse_uid)

    monkeypatch.setattr(uidprocs.fstree, "remove_at", failing_remove)
    with pytest.raises(OSError,
                       match=r"could not remove leftover\(s\) of swtpm uid \d+ \(1: .*tmp/a"):
        uidprocs.sweep_files(MY_UID, (first, second))
    assert os.listdir(first) == ["a"] and os.listdir(second) == []


def test_a_pinned_process_is_gone_once_its_pid_is_reused():
    """Review round 3 of the sweep, MEDIUM 1: ``gone`` decides on the pinned
    identity (pid and start time), so a process that took the dead swtpm's
    pid does not count as the swtpm alive."""
    me = uidprocs.pin(os.getpid())
    assert me is not None and me[0] == os.getpid()
    assert not uidprocs.gone(me)
    assert uidprocs.gone((os.getpid(), me[1] + 1))  # the same pid, started another time
    assert uidprocs.pin(2 ** 22 + 1) is None  # above pid_max: no such process


U, Q = 1900000100, 1900001100  # a VM's swtpm uid and QEMU uid (nothing real is touched)


def _kill_and_sweep_seen(monkeypatch, kill_fails=(), alive=(), sweep_fails=()):
    """``kill_and_sweep`` on (U, Q) with its steps stubbed: which uids each
    held-fd scan covered (and its deadline), which uids were swept."""
    scans: list[tuple[tuple[int, ...], float | None]] = []
    swept: list[int] = []

    def kill_all(uid, timeout=5.0, own_dirs=()):
        if uid in kill_fails:
            raise exception.SwtpmError(vtpcm_id="uid %d" % uid, reason="kill %d" % uid)
        return 0

    def sweep_one(uid, dirs, ipc_root):
        swept.append(uid)
        if uid in sweep_fails:
            raise exception.SwtpmError(vtpcm_id="uid %d" % uid, reason="left %d" % uid)
        return []

    monkeypatch.setattr(uidprocs, "kill_all", kill_all)
    monkeypatch.setattr(uidprocs, "pids_of", lambda uid: [4242] if uid in alive else [])
    monkeypatch.setattr(uidprocs, "abstract_sockets", lambda pids: [])
    monkeypatch.setattr(uidprocs, "defuse",
                        lambda uids, dirs, deadline=None: scans.append((uids, deadline)) or 0)
    monkeypatch.setattr(uidprocs, "_sweep_defused", sweep_one)
    return scans, swept


def test_one_held_fd_scan_serves_both_uids_of_a_vm(monkeypatch):
    """The held-fd scan walks every fd of every process; the swtpm uid and
    the QEMU uid of a VM share one walk, under the one deadline a walk had
    (final read: destroy ran it twice, up to twice the bound)."""
    scans, swept = _kill_and_sweep_seen(monkeypatch)
    before = time.monotonic()
    assert uidprocs.kill_and_sweep((U, Q), timeout=5.0) == []
    assert [uids for uids, _ in scans] == [(U, Q)]
    deadline = scans[0][1]
    assert deadline is not None
    assert before + uidprocs.SWEEP_DEFUSE_TIMEOUT <= deadline \
        <= time.monotonic() + uidprocs.SWEEP_DEFUSE_TIMEOUT
    assert swept == [U, Q]


def test_a_uid_whose_processes_survive_is_not_swept_the_other_is(monkeypatch):
    scans, swept = _kill_and_sweep_seen(monkeypatch, kill_fails=(U,))
    with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: kill %d" % (U, U)):
        uidprocs.kill_and_sweep((U, Q), timeout=5.0)
    assert [uids for uids, _ in scans] == [(Q,)]
    assert swept == [Q]


def test_the_swtpm_uids_failure_is_raised_first_as_before(monkeypatch):
    """Each uid killed then swept in turn raised the first failure met: the
    swtpm uid's before the QEMU uid's, whichever step failed."""
    _scans, swept = _kill_and_sweep_seen(monkeypatch, kill_fails=(Q,), sweep_fails=(U,))
    with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: left %d" % (U, U)):
        uidprocs.kill_and_sweep((U, Q), timeout=5.0)
    assert swept == [U]
    _scans, swept = _kill_and_sweep_seen(monkeypatch, sweep_fails=(Q,))
    with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: left %d" % (Q, Q)):
        uidprocs.kill_and_sweep((U, Q), timeout=5.0)
    assert swept == [U, Q]


def test_the_sweep_refuses_a_live_uid_and_still_sweeps_the_other(monkeypatch):
    scans, swept = _kill_and_sweep_seen(monkeypatch, alive=(Q,))
    with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: processes of swtpm "
                 "uid %d are alive (1: 4242); not sweeping or freeing the uid" % (Q, Q)):
        uidprocs.sweep((U, Q), ())
    assert [uids for uids, _ in scans] == [(U,)]
    assert swept == [U]
