"""``daemons.kill_pidfiles``: a leftover pid file stops the process it was
written for, never a process that took its pid later (the test groups of
``tools/run-tests.sh`` run at once: a stale file of a crashed run could
name another group's swtpm or daemon)."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpcm_lab import daemons


def _started(argv: list[str]) -> subprocess.Popen[bytes]:
    """A child, once its command line shows in /proc: right after exec it
    reads empty for a moment (the kernel closes the exec's CLOEXEC pipe, on
    which Popen waits, before it sets the new arguments up)."""
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 10
    while not Path("/proc/%d/cmdline" % proc.pid).read_bytes():
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail("pid %d shows no command line after 10 s" % proc.pid)
        time.sleep(0.01)
    return proc


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A child whose command line names one of our programs, as a daemon's does."""
    proc = _started([sys.executable, "-c", "import time; time.sleep(60)",
                     "vtpcm-agent-stand-in"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _still_running(proc: subprocess.Popen[bytes]) -> None:
    """``proc`` was not killed: a SIGKILL sent would have ended it within
    the second (right after the kill it may not have exited yet)."""
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


def _pidfile(directory: Path, pid: int, written: float | None = None) -> Path:
    path = directory / "daemon.pid"
    path.write_text(str(pid))
    if written is not None:
        os.utime(path, (written, written))
    return path


def test_a_pid_file_written_after_its_process_started_stops_it(tmp_path, sleeper):
    path = _pidfile(tmp_path, sleeper.pid)
    daemons.kill_pidfiles(tmp_path)
    assert sleeper.wait(timeout=10) == -9
    assert not path.exists()


def test_a_pid_file_older_than_the_process_with_that_pid_leaves_it_running(
        tmp_path, sleeper):
    # written (by a crashed earlier run) long before this process took the pid
    path = _pidfile(tmp_path, sleeper.pid, written=time.time() - 120)
    daemons.kill_pidfiles(tmp_path)
    _still_running(sleeper)
    assert not path.exists()  # stale: removed, never looked at again


def test_a_process_that_runs_none_of_our_programs_is_left_alone(tmp_path):
    proc = _started(["sleep", "60"])
    try:
        path = _pidfile(tmp_path, proc.pid)
        daemons.kill_pidfiles(tmp_path)
        _still_running(proc)
        assert not path.exists()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_an_unprivileged_swtpms_pid_file_in_its_own_dir_counts(tmp_path, sleeper):
    vm_dir = tmp_path / "vm" / "0b7c"
    vm_dir.mkdir(parents=True)
    path = _pidfile(vm_dir, sleeper.pid)
    daemons.kill_pidfiles(tmp_path)
    assert sleeper.wait(timeout=10) == -9
    assert not path.exists()
