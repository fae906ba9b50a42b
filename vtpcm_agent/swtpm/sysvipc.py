"""The SysV IPC objects (shared memory, semaphores, message queues) of a uid.

Why: a swtpm uid (an exploited swtpm) can create SysV IPC objects; they
outlive every process and belong to the uid, so the next VM given that
uid could attach, read or keep them. They are listed in
``/proc/sysvipc/{shm,sem,msg}`` (the agent's IPC namespace, which its
swtpms share). Only objects whose owner or creator uid is the one being
freed are touched: the uid's leftovers are those it CREATED, removed with
``IPC_RMID``; an object another uid created and gave to it (an owner may
set any owner uid with ``IPC_SET``; the creator stays) is given back to its
creator, never waited for (any local user could else keep every vTPCM
from being destroyed, review of the sweep, MEDIUM 2).

Ids are reused: between the listing and the call the id may name another
uid's object (review of the sweep, LOW 4). So each call runs in a forked
child that took the object's uid (``setresuid``, no groups, no
capabilities left): the kernel itself refuses an object that uid neither
owns nor created (EPERM).

A shared memory segment still attached by some process (of another uid:
every process of the freed uid is dead by then) is only marked for
removal; it stays listed, and attachable by id (Linux), until its last
detach: it is reported as remaining.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import os
import signal
import time
from pathlib import Path

SYSVIPC = Path("/proc/sysvipc")
IPC_RMID = 0
# (file in /proc/sysvipc, its id column, the ctl function, shown as)
KINDS = (("shm", "shmid", "shmctl", "shared memory"),
         ("sem", "semid", "semctl", "semaphore set"),
         ("msg", "msqid", "msgctl", "message queue"))


@dataclasses.dataclass(frozen=True)
class IpcObject:
    kind: str  # shm, sem, msg
    ident: int
    owner: int
    creator: int
    attached: int  # shm only: processes attached (0 for the others)

    def __str__(self) -> str:
        shown = next(k[3] for k in KINDS if k[0] == self.kind)
        text = "SysV %s id %d (owner uid %d, creator uid %d" % (
            shown, self.ident, self.owner, self.creator)
        if self.attached:
            text += ", attached by %d process(es)" % self.attached
        return text + ")"


def objects_of(uid: int, root: Path = SYSVIPC) -> list[IpcObject]:
    """The IPC objects whose owner or creator is ``uid`` (a kind whose file
    is missing, no SysV IPC in this kernel: none of it)."""
    found = []
    for kind, id_column, _ctl, _shown in KINDS:
        try:
            lines = (root / kind).read_text(encoding="ascii", errors="replace").splitlines()
        except FileNotFoundError:
            continue
        if not lines:
            continue
        columns = lines[0].split()
        at = {name: columns.index(name) for name in (id_column, "uid", "cuid")}
        nattch = columns.index("nattch") if "nattch" in columns else None
        for line in lines[1:]:
            fields = line.split()
            if len(fields) < len(columns):
                continue
            owner, creator = int(fields[at["uid"]]), int(fields[at["cuid"]])
            if uid not in (owner, creator):
                continue
            found.append(IpcObject(kind, int(fields[at[id_column]]), owner, creator,
                                   int(fields[nattch]) if nattch is not None else 0))
    return found


_LIBC: ctypes.CDLL | None = None
IPC_SET, IPC_STAT = 1, 2
_PERM_UID, _PERM_CUID = 4, 12  # offsets in struct ipc_perm (glibc, Linux)
_CHILD_TIMEOUT = 10.0


def _libc() -> ctypes.CDLL:
    global _LIBC  # noqa: PLW0603 - loaded once, before any fork
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _LIBC


def _ctl(kind: str, ident: int, cmd: int, buf: ctypes.Array[ctypes.c_char] | None) -> int:
    """``shmctl``/``semctl``/``msgctl``: 0, else the errno."""
    func = getattr(_libc(), next(k[2] for k in KINDS if k[0] == kind))
    arg = ctypes.cast(buf, ctypes.c_void_p) if buf is not None else ctypes.c_void_p(None)
    if kind == "sem":
        rc = func(ctypes.c_int(ident), ctypes.c_int(0), ctypes.c_int(cmd), arg)
    else:
        rc = func(ctypes.c_int(ident), ctypes.c_int(cmd), arg)
    return 0 if rc != -1 else (ctypes.get_errno() or errno.EIO)


def _ctl_as(uid: int, kind: str, ident: int, cmd: int,
            buf: ctypes.Array[ctypes.c_char] | None) -> None:
    """The ctl call made by a child that is ``uid`` and nothing else (no
    groups, no capabilities: ``setresuid`` away from 0 drops them all), so
    the kernel checks the object's owner and creator itself. OSError with
    the kernel's errno if refused."""
    _libc()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its exit status is the result
        code = errno.EIO
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            code = _ctl(kind, ident, cmd, buf)
        finally:
            os._exit(code)
    deadline = time.monotonic() + _CHILD_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise OSError(errno.ETIMEDOUT, "IPC call as uid %d timed out" % uid)
        time.sleep(0.005)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        code = code if code > 0 else errno.EIO
        raise OSError(code, os.strerror(code))


def remove_as(obj: IpcObject, uid: int) -> None:
    """``IPC_RMID`` the object as ``uid`` (one of the uid's: the kernel
    refuses an object at that id that ``uid`` neither owns nor created).
    OSError if refused: EPERM (the id names another's object now),
    EINVAL/EIDRM (gone meanwhile)."""
    _ctl_as(uid, obj.kind, obj.ident, IPC_RMID, None)


def give_back(obj: IpcObject) -> None:
    """Set the owner of ``obj`` (created by another uid, given to the uid
    being freed) back to its creator, as the creator: the kernel refuses
    unless the object now at that id is the creator's own or owned by it.
    The rest of its ``IPC_SET`` fields are what ``IPC_STAT`` shows (root
    may read any); an object that changed meanwhile is left (EAGAIN)."""
    buf = ctypes.create_string_buffer(512)
    code = _ctl(obj.kind, obj.ident, IPC_STAT, buf)
    if code:
        raise OSError(code, os.strerror(code))
    owner = ctypes.c_uint.from_buffer(buf, _PERM_UID)
    creator = ctypes.c_uint.from_buffer(buf, _PERM_CUID).value
    if (owner.value, creator) != (obj.owner, obj.creator):
        raise OSError(errno.EAGAIN, "changed meanwhile")
    owner.value = creator
    _ctl_as(creator, obj.kind, obj.ident, IPC_SET, buf)
