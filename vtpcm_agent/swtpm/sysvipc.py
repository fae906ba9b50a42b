"""The SysV IPC objects (shared memory, semaphores, message queues) of a uid.

Why: a swtpm uid (an exploited swtpm) can create SysV IPC objects; they
outlive every process and belong to the uid, so the next VM given that
uid could attach, read or keep them. They are listed in
``/proc/sysvipc/{shm,sem,msg}`` (the agent's IPC namespace, which its
swtpms share) and removed with ``IPC_RMID`` by id. Only objects whose
owner or creator uid is the one being freed are touched (an owner can
give an object to another uid with ``IPC_SET``; its creator stays).

A shared memory segment still attached by some process (of another uid:
every process of the freed uid is dead by then) is only marked for
removal; it stays listed, and attachable by id (Linux), until its last
detach: it is reported as remaining.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
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


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def remove(obj: IpcObject) -> None:
    """``IPC_RMID`` the object; OSError if the kernel refuses (gone
    meanwhile: EINVAL/EIDRM, which the caller's re-listing settles)."""
    libc = _libc()
    ctl = next(k[2] for k in KINDS if k[0] == obj.kind)
    func = getattr(libc, ctl)
    if obj.kind == "sem":
        rc = func(ctypes.c_int(obj.ident), ctypes.c_int(0), ctypes.c_int(IPC_RMID))
    else:
        rc = func(ctypes.c_int(obj.ident), ctypes.c_int(IPC_RMID), ctypes.c_void_p(None))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(obj))
