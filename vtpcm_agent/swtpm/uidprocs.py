"""Every process of a swtpm uid, found and stopped by uid, not by pid file.

Why: a swtpm that a guest exploited runs the guest's code as the VM's uid.
It can unlink its socket, rewrite its pid file or re-exec itself under
another name, so "the swtpm we started" is not all the uid runs. Before a
uid's files are handed over again and before the uid is freed for another
VM, every process whose real, effective, saved or filesystem uid is that
uid is killed (by the uid itself, ``kill(-1, SIGKILL)``, then SIGKILL
through a pidfd, so a reused pid is never hit), and
the uid's leftovers are removed (``sweep``): its entries in the shared
temporary directories and the root-owned sticky directories below them,
and its SysV IPC objects. The uid is freed only once nothing of it is
left.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

from oslo_log import log as logging

from vtpcm_agent.swtpm import fstree, sysvipc
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


# kill(1) of procps-ng: ``kill -KILL -1`` is kill(-1, SIGKILL)
KILL_BINARY = "/bin/kill"


def _kill_as(uid: int, deadline: float) -> None:
    """SIGKILL every process of ``uid`` at once, sent by a process of the
    uid itself: ``kill(-1, SIGKILL)`` reaches each process whose real or
    saved uid is the uid, in one pass the kernel makes safe against fork
    (a child forked meanwhile is hit too), so a process of the uid cannot
    outrun it by forking (review round 3 of the sweep, LOW 5). The sender
    is ``kill(1)`` exec'ed with no groups and an empty environment, and
    is never signalled by its own kill. Best effort: the pid-by-pid kill
    in ``kill_all`` follows and decides (a process of only the
    effective or filesystem uid is not reached here)."""
    try:
        subprocess.run([KILL_BINARY, "-KILL", "-1"], user=uid, group=uid,
                       extra_groups=[], env={}, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                       timeout=max(0.1, min(1.0, deadline - time.monotonic())))
    except (OSError, subprocess.SubprocessError) as exc:
        LOG.debug("kill(-1) as swtpm uid %(uid)d failed: %(err)s", {"uid": uid, "err": exc})


def kill_all(uid: int, timeout: float = 5.0, own_dirs: tuple[Path, ...] = ()) -> int:
    """SIGKILL every process of ``uid`` until none is left; how many were hit.

    Repeated: a process of the uid can fork between the scan and the kill.
    If any is still there after the first round, the uid's setuid/setgid
    files are defused (``defuse``: in the temporary directories, in
    ``own_dirs`` and wherever a process holds one open), once, so that
    another user holding one cannot keep re-creating processes of the uid
    by exec'ing it (review round 2 of the sweep, MEDIUM 1). Not before:
    that scan looks at every fd of every process, which any local user can
    make slow, and a uid with nothing left to kill (the common case, start
    and migration included) must not pay for it (review round 3 of the
    sweep, MEDIUM 3). Raises SwtpmError if any is still there at
    ``timeout``."""
    deadline = time.monotonic() + timeout
    hit: set[int] = set()
    defused = False
    while True:
        live = pids_of(uid)
        if not live:
            break
        if hit and not defused:  # a second round: something re-creates them
            defuse((uid,), TEMP_DIRS + own_dirs, deadline)
            defused = True
            live = pids_of(uid)
            if not live:
                break
        hit.update(live)
        _kill_as(uid, deadline)
        for pid in live:
            _sigkill(pid, uid)
        if time.monotonic() >= deadline:
            raise exception.SwtpmError(
                vtpcm_id="uid %d" % uid,
                reason="processes of swtpm uid %d survive SIGKILL (%s)" % (uid, some(live)))
        time.sleep(_POLL)
    if hit:
        LOG.warning("Killed process(es) of swtpm uid %(uid)d (%(pids)s)",
                    {"uid": uid, "pids": some(sorted(hit))})
    return len(hit)


def defuse(uids: tuple[int, ...], dirs: tuple[Path, ...], deadline: float | None = None) -> int:
    """Clear the setuid, setgid and exec bits of the regular files of each
    of ``uids`` that a process holds open (any process: ``/proc/*/fd``, one
    scan for all of them) and of those under ``dirs`` (the uid's own
    directories and root's shared sticky ones entered, bounded as the sweep
    is, for each uid); how many were changed.

    Why: an fd to a setuid file of the uid, held by another user, lets that
    user start processes of the uid (``execv('/proc/self/fd/N')``) faster
    than ``kill_all`` kills them. Once the bits are gone such an exec runs
    as its caller. Best effort: what cannot be looked at is skipped (the
    destroy does not depend on it, ``InstanceManager._kill``), and so is
    what the held-fd scan has not reached by ``deadline``."""
    held = _defuse_held(frozenset(uids), deadline)
    total = 0
    for uid in uids:
        changed = held[uid]
        budget = [MAX_SHARED_DIRS]
        for top in dirs:
            try:
                dfd = os.open(top, fstree.DIR_FLAGS)
            except OSError:
                continue
            try:
                changed += _defuse_tree(dfd, uid, budget)
            finally:
                os.close(dfd)
        if changed:
            LOG.warning("Cleared setuid/setgid/exec bits of %(n)d file(s) of swtpm uid "
                        "%(uid)d", {"n": changed, "uid": uid})
        total += changed
    return total


# file systems whose getattr can block (a hung hard NFS mount) or reach a
# user's daemon (FUSE): an fd on one is never stat'ed by the held-fd scan
_REMOTE_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "fuse",
                        "fuseblk", "glusterfs", "lustre", "afs", "ocfs2", "gfs2", "sshfs",
                        "virtiofs", "davfs"})


def _mount_skipped(pid: str, mnt_id: str, mounts: dict[str, bool]) -> bool:
    """An fd on mount ``mnt_id`` cannot matter (nosuid or noexec: nothing on
    it runs as its owner) or must not be stat'ed (network or FUSE file
    system); decided from ``/proc/PID/mountinfo`` alone, no getattr.
    ``mounts`` caches the answers (mount ids are unique system-wide)."""
    if mnt_id not in mounts:
        try:
            with open(PROC / pid / "mountinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    head, _sep, tail = line.partition(" - ")
                    fields, extra = head.split(), tail.split()
                    if len(fields) < 6 or not extra:
                        continue
                    options = set(fields[5].split(","))
                    fstype = extra[0]
                    mounts[fields[0]] = ("nosuid" in options or "noexec" in options
                                         or fstype in _REMOTE_FS
                                         or fstype.startswith("fuse."))
        except OSError:
            return True
        mounts.setdefault(mnt_id, True)  # not shown to us: not looked at
    return mounts[mnt_id]


def _mnt_id(fdinfo_dir: int, fd: str) -> str | None:
    """The mount id of fd ``fd`` from its ``fdinfo`` (raw reads: this runs
    for every held fd)."""
    try:
        info = os.open(fd, os.O_RDONLY | os.O_CLOEXEC, dir_fd=fdinfo_dir)
    except OSError:
        return None
    try:
        raw = os.read(info, 256)
    except OSError:
        return None
    finally:
        os.close(info)
    at = raw.find(b"\nmnt_id:")
    if at < 0:
        return None
    value = raw[at + 8:raw.find(b"\n", at + 8)].strip()
    return value.decode("ascii") if value.isdigit() else None


def _defuse_held(uids: frozenset[int], deadline: float | None = None) -> Counter[int]:
    """The setuid/setgid files of ``uids`` that any process holds open,
    defused (how many, by uid) through an ``O_PATH`` fd (opening them for
    real could block on a FIFO or act on a device) checked to be the inode
    looked at.

    Only fds that can matter are stat'ed: sockets, pipes and anonymous
    inodes are told by their link, and an fd on a nosuid or noexec mount
    or on a network or FUSE file system is skipped by its mount id
    (``fdinfo``) before any stat, so no getattr reaches a hung NFS server
    or a user's FUSE daemon (review round 3 of the sweep, MEDIUM 3). Stops
    at ``deadline``. What it costs is the walk of every fd, the same for
    any number of uids: one scan serves a VM's swtpm and QEMU uids."""
    changed: Counter[int] = Counter()
    mounts: dict[str, bool] = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        fd_dir = PROC / entry.name / "fd"
        try:
            fds = os.listdir(fd_dir)
            fdinfo = os.open(PROC / entry.name / "fdinfo",
                             os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            changed += _defuse_fds(uids, entry.name, fd_dir, fdinfo, fds, mounts, deadline)
        finally:
            os.close(fdinfo)
        if deadline is not None and time.monotonic() >= deadline:
            LOG.warning("Held-fd scan for swtpm uid(s) %(uids)s stopped at its deadline",
                        {"uids": ", ".join(str(u) for u in sorted(uids))})
            break
    return changed


def _defuse_fds(uids: frozenset[int], pid: str, fd_dir: Path, fdinfo: int, fds: list[str],
                mounts: dict[str, bool], deadline: float | None) -> Counter[int]:
    """``_defuse_held`` for the fds ``fds`` of process ``pid``."""
    changed: Counter[int] = Counter()
    base = "%s/" % fd_dir
    for fd in fds:
        if deadline is not None and time.monotonic() >= deadline:
            return changed
        where = base + fd
        try:
            if not os.readlink(where).startswith("/"):
                continue  # socket:[], pipe:[], anon_inode:...
            mnt_id = _mnt_id(fdinfo, fd)
            if mnt_id is None or _mount_skipped(pid, mnt_id, mounts):
                continue
            st = os.stat(where)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid not in uids
                    or not st.st_mode & (stat.S_ISUID | stat.S_ISGID)):
                continue
            held = os.open(where, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            now = os.fstat(held)
            if fstree.ident(now) == fstree.ident(st) and now.st_uid == st.st_uid \
                    and stat.S_ISREG(now.st_mode):
                os.chmod("/proc/self/fd/%d" % held,
                         stat.S_IMODE(now.st_mode) & ~fstree.UNSAFE_BITS)
                changed[st.st_uid] += 1
        except OSError:
            pass
        finally:
            os.close(held)
    return changed


def _defuse_tree(top_fd: int, uid: int, budget: list[int]) -> int:
    top_dev = os.fstat(top_fd).st_dev
    changed = 0
    pending: list[tuple[int, int]] = [(os.dup(top_fd), 0)]
    try:
        while pending:
            dfd, depth = pending.pop()
            try:
                for name in os.listdir(dfd):
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            if st.st_uid == uid and st.st_mode & fstree.UNSAFE_BITS:
                                fstree.defuse(dfd, name, st, uid)
                                changed += 1
                        elif ((st.st_uid == uid and stat.S_ISDIR(st.st_mode)
                               and st.st_dev == top_dev) or _shared_dir(st, top_dev)) \
                                and depth < MAX_DEPTH and budget[0] > 0:
                            budget[0] -= 1
                            pending.append((fstree.open_dir(name, dfd, fstree.ident(st), name,
                                                            "defusing it", str(uid)),
                                            depth + 1))
                    except (OSError, exception.VTPCMException):
                        continue
            except OSError:
                pass
            finally:
                os.close(dfd)
    finally:
        for dfd, _depth in pending:
            os.close(dfd)
    return changed


SHOWN = 10  # how many names a log line or an error gives (the count says the rest)


def some(items: list[str] | list[int]) -> str:
    """A count and the first ``SHOWN`` of ``items``, for logs and errors:
    never unbounded, whatever the uid left."""
    head = ", ".join(str(i) for i in items[:SHOWN])
    more = len(items) - SHOWN
    return "%d: %s%s" % (len(items), head, (" and %d more" % more) if more > 0 else "")


Pin = tuple[int, int]  # (pid, start time in clock ticks since boot)


def _stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (``/proc/PID/stat`` fields 3 and 22) of
    ``pid``, read at once; None if gone."""
    try:
        with open(PROC / str(pid) / "stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if len(fields) <= 19 or not fields[19].isdigit():
        return None
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None if gone."""
    found = _stat(pid)
    return None if found is None else found[1]


def pin(pid: int) -> Pin | None:
    """The identity of the process ``pid`` now: its pid and start time
    (None: gone). A reused pid has another start time."""
    started = start_time(pid)
    return None if started is None else (pid, started)


def gone(pinned: Pin) -> bool:
    """The process ``pinned`` is dead or a zombie. Decided on the pinned
    identity alone: a process that took its pid since (another start time)
    does not make it alive, and nothing it writes (a pid file, a socket,
    its argv) is looked at (review round 3 of the sweep, MEDIUM 1)."""
    pid, started = pinned
    found = _stat(pid)
    return found is None or found[1] != started or found[0] in ("Z", "X")


def _zombie(pid: int) -> bool:
    """A zombie holds no resources; its parent (not us) reaps it."""
    try:
        with open(PROC / str(pid) / "stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return not fields or fields[0] in ("Z", "X")


# how deep below a top directory, and how many directories in all, the
# sweep descends into root-owned world-writable sticky directories (such as
# /tmp/.X11-unix): only root makes those, so the bounds hold against
# nothing the uid or another user controls; past them the sweep reports
# what it did not look at instead of freeing the uid
MAX_DEPTH = 8
MAX_SHARED_DIRS = 1000


def _shared_dir(st: os.stat_result, top_dev: int) -> bool:
    """A directory every user may add entries to but only their owners (and
    root) may remove or rename: root's, mode o+w and sticky, on the top's
    file system (mounts are not crossed)."""
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and st.st_dev == top_dev
            and st.st_mode & (stat.S_ISVTX | stat.S_IWOTH) == stat.S_ISVTX | stat.S_IWOTH)


def sweep_files(uid: int, dirs: tuple[Path, ...] = TEMP_DIRS) -> list[str]:
    """Remove the entries ``uid`` owns in each of ``dirs`` and in the
    root-owned world-writable sticky directories below them (such as
    ``/tmp/.X11-unix``), at most ``MAX_DEPTH`` deep.

    Only entries owned by ``uid`` (never followed: a symlink is removed as a
    link, a directory tree of the uid is removed through directory fds);
    sticky directories are entered by ``openat(O_NOFOLLOW)`` checked to be
    the inode looked at, never on another file system. In a sticky
    directory only root and an entry's owner can remove or rename it, so
    an entry of the uid cannot be swapped for another user's between the
    look and the unlink. Run after ``kill_all``: nothing of the uid can add
    files meanwhile. Other users' entries come and go meanwhile (a busy
    ``/tmp``): one that vanished is skipped, and a failure on one entry
    never stops the sweep of the others or of the next directories; the
    failures are raised together at the end (``OSError``, naming each
    entry), after everything else was swept."""
    removed: list[str] = []
    failed: list[str] = []
    budget = [MAX_SHARED_DIRS]
    for top in dirs:
        try:
            dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError, OSError):
            continue
        try:
            _sweep_tree(dfd, top, uid, removed, failed, budget)
        finally:
            os.close(dfd)
    if removed:
        LOG.warning("Removed leftover(s) of swtpm uid %(uid)d (%(what)s)",
                    {"uid": uid, "what": some(removed)})
    if failed:
        raise OSError("could not remove leftover(s) of swtpm uid %d (%s)"
                      % (uid, some(failed)))
    return removed


def _sweep_tree(top_fd: int, top: Path, uid: int, removed: list[str], failed: list[str],
                budget: list[int]) -> None:
    """The sweep of one top directory: its entries of ``uid``, then those of
    the shared directories below it (each opened relative to its parent's
    pinned fd; one fd per pending directory, at most ``MAX_SHARED_DIRS``)."""
    top_dev = os.fstat(top_fd).st_dev
    pending: list[tuple[int, Path, int]] = [(os.dup(top_fd), top, 0)]
    try:
        while pending:
            dfd, where, depth = pending.pop()
            try:
                names = os.listdir(dfd)
            except OSError as exc:
                failed.append("%s (not listed: %s)" % (where, exc.strerror))
                os.close(dfd)
                continue
            try:
                for name in names:
                    shown = where / name
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        if st.st_uid == uid:
                            fstree.remove_at(dfd, name, str(shown), defuse_uid=uid)
                            removed.append(str(shown))
                        elif _shared_dir(st, top_dev):
                            if depth + 1 > MAX_DEPTH or budget[0] <= 0:
                                failed.append("%s (not looked into: more than %d levels or "
                                              "%d shared directories)"
                                              % (shown, MAX_DEPTH, MAX_SHARED_DIRS))
                                continue
                            budget[0] -= 1
                            sub = fstree.open_dir(name, dfd, fstree.ident(st), str(shown),
                                                  "sweeping it", str(uid))
                            pending.append((sub, shown, depth + 1))
                    except FileNotFoundError:
                        continue  # gone meanwhile (another user's, or already removed)
                    except (OSError, exception.VTPCMException) as exc:
                        failed.append("%s (%s)" % (shown, getattr(exc, "message", None)
                                                   or exc))
            finally:
                os.close(dfd)
    finally:
        for dfd, _where, _depth in pending:
            os.close(dfd)


# bound of the held-fd scan before a uid is freed (any local user can make it slow)
SWEEP_DEFUSE_TIMEOUT = 10.0


def sweep(uids: tuple[int, ...], dirs: tuple[Path, ...] = TEMP_DIRS,
          ipc_root: Path = sysvipc.SYSVIPC) -> list[str]:
    """Everything of each of ``uids`` (a VM's swtpm uid and QEMU uid) that
    outlives its processes, removed before the uid is freed: its entries in
    ``dirs`` (``sweep_files``) and its SysV IPC objects, after its setuid
    files anyone holds open are defused (``defuse``: one held-fd scan for
    all the uids, bounded by ``SWEEP_DEFUSE_TIMEOUT``). What is removed is
    returned.

    Refuses a uid (SwtpmError, nothing of it removed) while a process of
    the uid lives: what a live process holds (abstract Unix sockets, which
    the file system does not show, pipes, its own files) goes only with it,
    and it could make new leftovers meanwhile; the error names the pids and
    their abstract sockets. A failure on one entry or one uid never stops
    the rest; if anything of a uid remains at the end the SwtpmError names
    each thing (paths, IPC ids, no contents): the caller keeps the uid.
    Raised after every uid was swept: the first uid's (in ``uids``) that
    failed."""
    removed, failed = _sweep_all(uids, dirs, ipc_root)
    _raise_first(uids, failed)
    return removed


def kill_and_sweep(uids: tuple[int, ...], timeout: float) -> list[str]:
    """``kill_all`` (each bounded by ``timeout``), then ``sweep``, of each of
    ``uids`` (a VM's swtpm uid and QEMU uid, before they are freed): a uid
    with processes that survive is not swept, the others are, with one
    held-fd scan for all. Every uid is tried; then the first one's failure
    (in ``uids``: the swtpm uid's before the QEMU uid's) is raised."""
    failed: dict[int, exception.SwtpmError] = {}
    for uid in uids:
        try:
            kill_all(uid, timeout=timeout)
        except exception.SwtpmError as exc:
            failed[uid] = exc
    removed, left = _sweep_all(tuple(uid for uid in uids if uid not in failed),
                               TEMP_DIRS, sysvipc.SYSVIPC)
    failed.update(left)
    _raise_first(uids, failed)
    return removed


def _raise_first(uids: tuple[int, ...], failed: dict[int, exception.SwtpmError]) -> None:
    for uid in uids:
        if uid in failed:
            raise failed[uid]


def _sweep_all(uids: tuple[int, ...], dirs: tuple[Path, ...], ipc_root: Path,
               ) -> tuple[list[str], dict[int, exception.SwtpmError]]:
    """``sweep`` of ``uids``: what it removed, and each uid's failure."""
    failed: dict[int, exception.SwtpmError] = {}
    clear: list[int] = []
    for uid in uids:
        live = pids_of(uid)
        if not live:
            clear.append(uid)
            continue
        held = abstract_sockets(live)
        failed[uid] = exception.SwtpmError(
            vtpcm_id="uid %d" % uid,
            reason="processes of swtpm uid %d are alive (%s)%s; not sweeping or freeing the uid"
            % (uid, some(live), (" holding abstract sockets (%s)" % some(held)) if held else ""))
    # a file of the uid another user holds open (unlinked by the state
    # dir's removal, or anywhere else) must not run as the uid once it is
    # freed: kill_all defuses only when processes survive its first round
    # (review round 4 of the sweep, LOW 1)
    if clear:
        defuse(tuple(clear), dirs, time.monotonic() + SWEEP_DEFUSE_TIMEOUT)
    removed: list[str] = []
    for uid in clear:
        try:
            removed += _sweep_defused(uid, dirs, ipc_root)
        except exception.SwtpmError as exc:
            failed[uid] = exc
    return removed, failed


def _sweep_defused(uid: int, dirs: tuple[Path, ...], ipc_root: Path) -> list[str]:
    """``sweep`` of one uid with no process left, once defused."""
    remains: list[str] = []
    try:
        removed = sweep_files(uid, dirs)
    except OSError as exc:
        remains.append(str(exc))
        removed = []
    rmid: list[sysvipc.IpcObject] = []
    given: list[str] = []
    refused: list[str] = []
    refused_ids: set[tuple[str, int]] = set()
    for obj in sysvipc.objects_of(uid, ipc_root):
        try:
            if obj.creator == uid:  # the uid's own: its leftover
                sysvipc.remove_as(obj, uid)
                rmid.append(obj)
            else:  # another uid's, given to it: given back, never waited for
                sysvipc.give_back(obj)
                given.append(str(obj))
        except OSError as exc:
            # gone, changed, or the id names another's object now (EPERM:
            # the kernel refused the uid): the listing below decides
            if exc.errno not in (errno.EINVAL, errno.EIDRM, errno.EPERM, errno.EAGAIN):
                refused.append("%s (%s)" % (obj, exc.strerror))
                refused_ids.add((obj.kind, obj.ident))
    # a segment still attached is only marked for removal: it remains
    still = [obj for obj in sysvipc.objects_of(uid, ipc_root)
             if (obj.kind, obj.ident) not in refused_ids]
    there = {(obj.kind, obj.ident) for obj in still}
    ipc_removed = [str(obj) for obj in rmid if (obj.kind, obj.ident) not in there]
    if ipc_removed:  # only what went: a marked segment is retried each sweep
        LOG.warning("Removed SysV IPC object(s) of swtpm uid %(uid)d (%(what)s)",
                    {"uid": uid, "what": some(ipc_removed)})
    if given:
        LOG.warning("Gave SysV IPC object(s) another uid had given to swtpm uid %(uid)d back "
                    "to their creators (%(what)s)", {"uid": uid, "what": some(given)})
    left = refused + [str(obj) for obj in still]
    if left:
        remains.append("SysV IPC object(s) of the uid still there (%s)" % some(left))
    if remains:
        raise exception.SwtpmError(
            vtpcm_id="uid %d" % uid,
            reason="leftovers of swtpm uid %d remain (the uid is kept): %s"
            % (uid, "; ".join(remains)))
    return removed + ipc_removed


def abstract_sockets(pids: list[int]) -> list[str]:
    """The abstract Unix socket names (``@name``) the processes ``pids``
    hold, as ``/proc/net/unix`` shows them (the agent's network namespace);
    for messages only."""
    inodes: dict[str, list[int]] = {}
    for pid in pids:
        try:
            fds = os.listdir(PROC / str(pid) / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(PROC / str(pid) / "fd" / fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.setdefault(target[8:-1], []).append(pid)
    found = []
    try:
        with open(PROC / "net" / "unix", encoding="utf-8", errors="replace") as fh:
            next(fh, None)
            for line in fh:
                fields = line.split()
                if len(fields) >= 8 and fields[7].startswith("@") and fields[6] in inodes:
                    found.append("%s (pid %s)" % (fields[7], ",".join(
                        str(p) for p in sorted(set(inodes[fields[6]])))))
    except OSError:
        return found
    return sorted(set(found))
