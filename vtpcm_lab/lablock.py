"""The two-host lab's lock: one user of the lab's fixed paths at a time.

The lab (daemons, users, dirs, RabbitMQ exchange) lives at fixed paths, so
everyone who runs it takes ``flock /tmp/vtpcm-lab.lock``. A long benchmark
takes it per chunk, so that others get the lab between chunks. When a
caller already runs under ``flock /tmp/vtpcm-lab.lock <command>`` (an
ancestor process holds it), taking it again would wait for ourselves:
``hold`` then goes on without locking.
"""

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vtpcm_lab.exception import LabError

LOCK_PATH = Path("/tmp/vtpcm-lab.lock")  # noqa: S108 - the lab's agreed lock file
_POLL = 0.5


def _ancestors(pid: int) -> set[int]:
    """pid and its ancestors (from /proc/<pid>/stat)."""
    found: set[int] = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            stat = Path("/proc/%d/stat" % pid).read_text()
        except OSError:
            break
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        pid = int(stat.rpartition(")")[2].split()[1])
    return found


def flock_holders(path: Path) -> set[int]:
    """Pids /proc/locks names as holding a FLOCK on ``path``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return set()
    # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF" (hex
    # major/minor); a waiter's line reads "1: -> FLOCK ..." and is skipped.
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    holders: set[int] = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        parts = fields[5].split(":")
        if (len(parts) == 3 and (int(parts[0], 16), int(parts[1], 16), int(parts[2]))
                == want):
            holders.add(int(fields[4]))
    return holders


def held_by_ancestor(path: Path = LOCK_PATH) -> bool:
    """True if this process or one of its ancestors holds the lock."""
    return bool(flock_holders(path) & _ancestors(os.getpid()))


class _Tick(Exception):
    """Raised by the alarm that interrupts a blocking flock() now and then."""


def _raise_tick(_signum: int, _frame: object) -> None:
    raise _Tick()


def _acquire(fd: int, path: Path, timeout: float,
             waiting: Callable[[float], None] | None) -> None:
    """Block in flock() as ``flock(1)`` does: a poller never wins against
    blocked waiters, which the kernel wakes first. An alarm every 30 s (in
    the main thread; elsewhere a 0.5 s poll) reports the wait and ends it
    after ``timeout``."""
    start = time.monotonic()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _raise_tick) if main else None
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                raise LabError(reason="lab lock %s still held by pid(s) %s after %.0f s"
                               % (path, sorted(flock_holders(path)), timeout))
            try:
                if main:
                    signal.setitimer(signal.ITIMER_REAL, min(30.0, left))
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    return
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except (_Tick, BlockingIOError):
                if main and waiting is not None:
                    waiting(time.monotonic() - start)
                if not main:
                    time.sleep(min(_POLL, max(left, 0.0)))
            finally:
                if main:
                    signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        if main:
            signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def hold(timeout: float, path: Path = LOCK_PATH,
         waiting: Callable[[float], None] | None = None) -> Iterator[bool]:
    """Hold the lab lock for the ``with`` block; yields False if an ancestor
    already held it (nothing taken). ``waiting(seconds)`` is called about
    every 30 s while another user holds it. Raises LabError after ``timeout``.
    """
    if held_by_ancestor(path):
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, path, timeout, waiting)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
