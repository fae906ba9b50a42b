"""A launcher that does not finish in time is given up on within a bound,
also when a process it forked still holds its stderr (the agent's RPC
worker waited for that process's end with an unbounded communicate())."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from vtpcm_agent.swtpm import process, provision
from vtpcm_common import exception


def test_a_launcher_timeout_does_not_wait_for_a_child_holding_stderr(tmp_path: Path) -> None:
    holder = tmp_path / "holder.pid"
    paths = process.SwtpmPaths(tmp_path / "state", tmp_path / "ctrl", tmp_path / "swtpm.pid",
                               tmp_path / "swtpm.log", None)
    # the "launcher" forks a child that keeps stderr for 60 s, then hangs
    cmd = ["sh", "-c", 'sleep 60 & echo $! > "$0"; sleep 60', str(holder)]
    started = time.monotonic()
    try:
        with pytest.raises(exception.SwtpmError) as err:
            process._launch(cmd, (), paths, time.monotonic() + 1.0)
        assert "did not become ready in time" in str(err.value)
        assert time.monotonic() - started < 30  # not the child's 60 s
    finally:
        if holder.exists():
            try:
                os.kill(int(holder.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


# a swtpm stand-in's daemon: its own session (as swtpm's --daemon), its pid
# told at once, its pid file written only after the launcher's deadline
_LATE_DAEMON = """
import os, sys, time
os.setsid()
holder, pid_file = sys.argv[-2], sys.argv[-1]
with open(holder, "w") as fh:
    fh.write(str(os.getpid()))
time.sleep(2.5)
with open(pid_file, "w") as fh:
    fh.write(str(os.getpid()))
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid, encoding="ascii") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_a_daemon_that_writes_its_pid_file_late_is_killed_with_its_launcher(
        tmp_path: Path) -> None:
    """The daemon is found by what it runs, not by its pid file: killed by
    the pid file alone, it went on running on the state dir unseen (its pid
    file and socket removed under it), and a retry met its lock."""
    state = tmp_path / "state"
    state.mkdir()
    holder = tmp_path / "holder.pid"
    paths = process.SwtpmPaths(state, tmp_path / "ctrl", tmp_path / "swtpm.pid",
                               tmp_path / "swtpm.log", None)
    # this interpreter (a pyenv shim re-execs python3 under its own argv[0])
    daemon_argv = ('exec -a swtpm "$5" -c "$0" socket --tpmstate "dir=$1,mode=0600" '
                   '--ctrl "type=unixio,path=$2,mode=0660" --pid "file=$3" "$4" "$3" & '
                   'sleep 60')
    cmd = ["bash", "-c", daemon_argv, _LATE_DAEMON, str(state), str(paths.ctrl_socket),
           str(paths.pid_file), str(holder), sys.executable]
    try:
        with pytest.raises(exception.SwtpmError) as err:
            process._launch(cmd, (), paths, time.monotonic() + 1.0)
        assert "did not become ready in time" in str(err.value)
        deadline = time.monotonic() + 10
        while not holder.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon = int(holder.read_text())
        while _alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(daemon), "the launcher's daemon still runs"
        time.sleep(3.0)  # past the moment it would have written its pid file
        assert not paths.pid_file.exists()
    finally:
        if holder.exists():
            try:
                os.kill(int(holder.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_a_failing_cleanup_step_skips_no_other_and_the_timeout_is_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    state.mkdir()
    paths = process.SwtpmPaths(state, tmp_path / "ctrl", tmp_path / "swtpm.pid",
                               tmp_path / "swtpm.log", None)
    paths.pid_file.write_text("12345")  # a runtime file the cleanup must remove
    sweeps: list[int] = []

    def failing_sweep(_paths: process.SwtpmPaths) -> None:
        sweeps.append(1)
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(process, "_kill_ours", failing_sweep)
    with pytest.raises(exception.SwtpmError) as err:
        process._launch(["sleep", "30"], (), paths, time.monotonic() + 0.5)
    assert "did not become ready in time" in str(err.value)
    assert len(sweeps) == 2  # both sweeps tried
    assert not paths.pid_file.exists()


def test_a_swtpm_setup_timeout_does_not_wait_for_a_child_that_left_its_session(
        tmp_path: Path) -> None:
    holder = tmp_path / "holder.pid"
    # its child leaves the session (killpg misses it) and keeps the output pipe
    cmd = ["sh", "-c", 'setsid sleep 60 & echo $! > "$0"; sleep 60', str(holder)]
    fd = os.open(os.devnull, os.O_RDONLY)
    started = time.monotonic()
    try:
        with pytest.raises(exception.SwtpmError) as err:
            provision._run_setup(cmd, fd, b"k" * 32, "vtpcm-x", 1.0)
        assert "swtpm_setup timed out" in str(err.value)
        assert time.monotonic() - started < 30  # not the child's 60 s
    finally:
        os.close(fd)
        if holder.exists():
            try:
                os.kill(int(holder.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
