"""uidprocs.sweep_files: a freed swtpm uid leaves nothing in the shared
temporary directories, whatever other users do there meanwhile (review of
kemcheck, LOW-1: one vanished entry ended the whole sweep)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vtpcm_agent.swtpm import uidprocs

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
