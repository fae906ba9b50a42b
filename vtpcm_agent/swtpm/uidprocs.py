"""Every process of a swtpm uid, found and stopped by uid, not by pid file.

Why: a swtpm that a guest exploited runs the guest's code as the VM's uid.
It can unlink its socket, rewrite its pid file or re-exec itself under
another name, so "the swtpm we started" is not all the uid runs. Before a
uid's files are handed over again and before the uid is freed for another
VM, every process whose real, effective, saved or filesystem uid is that
uid is killed (SIGKILL through a pidfd, so a reused pid is never hit), and
the uid's leftovers in the shared temporary directories are removed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from oslo_log import log as logging

from vtpcm_agent.swtpm import fstree
from vtpcm_common import exception

LOG = logging.getLogger(__name__)

PROC = Path("/proc")
# world-writable directories a swtpm uid could leave files in for a later
# holder of the same uid (the agent's private /tmp under its unit included):
# lock files in /run/lock, POSIX message queues in /dev/mqueue (unlinking
# the entry there is mq_unlink) as well
TEMP_DIRS = (Path("/tmp"), Path("/dev/shm"), Path("/var/tmp"),  # noqa: S108
             Path("/run/lock"), Path("/dev/mqueue"))
_POLL = 0.02


def uids_of(pid: int) -> tuple[int, ...] | None:
    """Real, effective, saved and filesystem uid of ``pid`` (None: gone)."""
    try:
        with open(PROC / str(pid) / "status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return tuple(int(v) for v in line.split()[1:5])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def pids_of(uid: int) -> list[int]:
    """Pids of every live process with ``uid`` as any of its four uids
    (zombies hold nothing and are their parent's to reap: left out)."""
    if uid <= 0:
        raise exception.InvalidInput(reason="uid %d is not a swtpm uid" % uid)
    found = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        uids = uids_of(int(entry.name))
        if uids is not None and uid in uids and not _zombie(int(entry.name)):
            found.append(int(entry.name))
    return found


def _sigkill(pid: int, uid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        uids = uids_of(pid)  # checked after pinning the pid: not a reused one
        if uids is not None and uid in uids:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def kill_all(uid: int, timeout: float = 5.0) -> int:
    """SIGKILL every process of ``uid`` until none is left; how many were hit.

    Repeated: a process of the uid can fork between the scan and the kill.
    Raises SwtpmError if any is still there at ``timeout``."""
    deadline = time.monotonic() + timeout
    hit: set[int] = set()
    while True:
        live = pids_of(uid)
        if not live:
            break
        hit.update(live)
        for pid in live:
            _sigkill(pid, uid)
        if time.monotonic() >= deadline:
            raise exception.SwtpmError(
                vtpcm_id="uid %d" % uid,
                reason="processes %s of swtpm uid %d survive SIGKILL" % (live, uid))
        time.sleep(_POLL)
    if hit:
        LOG.warning("Killed %(n)d process(es) of swtpm uid %(uid)d: %(pids)s",
                    {"n": len(hit), "uid": uid, "pids": sorted(hit)})
    return len(hit)


def _zombie(pid: int) -> bool:
    """A zombie holds no resources; its parent (not us) reaps it."""
    try:
        with open(PROC / str(pid) / "stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return not fields or fields[0] in ("Z", "X")


def sweep_files(uid: int, dirs: tuple[Path, ...] = TEMP_DIRS) -> list[str]:
    """Remove the entries ``uid`` owns at the top of each of ``dirs``.

    Only entries owned by ``uid`` (never followed: a symlink is removed as a
    link, a directory tree of the uid is removed through directory fds).
    Run after ``kill_all``: nothing of the uid can add files meanwhile.
    Other users' entries come and go meanwhile (a busy ``/tmp``): one that
    vanished is skipped, and a failure on one entry never stops the sweep of
    the others or of the next directories; the failures are raised together
    at the end (``OSError``), after everything else was swept."""
    removed = []
    failed: list[str] = []
    for top in dirs:
        try:
            dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError, OSError):
            continue
        try:
            for name in os.listdir(dfd):
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if st.st_uid != uid:
                        continue
                    fstree.remove_at(dfd, name, str(top / name))
                except FileNotFoundError:
                    continue  # gone meanwhile (another user's, or already removed)
                except (OSError, exception.VTPCMException) as exc:
                    failed.append("%s (%s)" % (top / name, exc))
                    continue
                removed.append(str(top / name))
        finally:
            os.close(dfd)
    if removed:
        LOG.warning("Removed %(n)d leftover(s) of swtpm uid %(uid)d: %(what)s",
                    {"n": len(removed), "uid": uid, "what": removed})
    if failed:
        raise OSError("could not remove %d leftover(s) of swtpm uid %d: %s"
                      % (len(failed), uid, "; ".join(failed)))
    return removed
