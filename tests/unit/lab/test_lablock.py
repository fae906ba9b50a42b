"""The lab lock taken per benchmark chunk: waits for another user, names
its pid when it gives up, and does not wait for itself when an ancestor
(``flock /tmp/vtpcm-lab.lock <command>``) already holds it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vtpcm_lab import lablock
from vtpcm_lab.exception import LabError

ROOT = Path(__file__).resolve().parents[3]


def _holder(lock: Path) -> subprocess.Popen[bytes]:
    """Another user of the lab: a process holding ``lock`` for up to 60 s
    (one process, so that killing it by pid releases the lock)."""
    code = ("import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)])
    deadline = time.monotonic() + 10
    while proc.pid not in lablock.flock_holders(lock):
        assert time.monotonic() < deadline, "flock(1) did not take the lock"
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_free_lock_is_taken_for_the_block_and_released(tmp_path: Path) -> None:
    lock = tmp_path / "lab.lock"
    with lablock.hold(5.0, lock) as took:
        assert took is True
        assert lablock.flock_holders(lock) == {os.getpid()}
    assert lablock.flock_holders(lock) == set()


def test_lock_of_another_user_is_waited_for_then_refused_naming_its_pid(
        tmp_path: Path) -> None:
    lock = tmp_path / "lab.lock"
    other = _holder(lock)
    try:
        waited: list[float] = []
        start = time.monotonic()
        with pytest.raises(LabError) as err, lablock.hold(1.0, lock, waiting=waited.append):
            pytest.fail("the block ran while another process held the lock")
        assert time.monotonic() - start >= 1.0
        assert waited and waited[-1] >= 1.0  # the wait was reported
        assert "still held by pid(s) [%d] after 1 s" % other.pid in str(err.value)
    finally:
        _stop(other)
    # positive control: the same call takes it once the other user is gone
    with lablock.hold(5.0, lock) as took:
        assert took is True


def test_lock_held_by_an_ancestor_is_not_taken_again(tmp_path: Path) -> None:
    lock = tmp_path / "lab.lock"
    code = ("import sys; from pathlib import Path; from vtpcm_lab import lablock\n"
            "with lablock.hold(2.0, Path(sys.argv[1])) as took: print(took)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    under = subprocess.run(["flock", str(lock), sys.executable, "-c", code, str(lock)],
                           capture_output=True, text=True, timeout=60, env=env, check=True)
    assert under.stdout.strip() == "False"
    # without the ancestor's hold the child takes the lock itself
    alone = subprocess.run([sys.executable, "-c", code, str(lock)], capture_output=True,
                           text=True, timeout=60, env=env, check=True)
    assert alone.stdout.strip() == "True"
