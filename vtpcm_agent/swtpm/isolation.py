"""Files of a swtpm that runs as an unprivileged uid of its own.

Why: a guest feeds its swtpm, and a libtpms exploit then runs as swtpm's
user. With a uid per VM, that user owns its VM's state dir, log file and
socket directory and nothing else. The agent (root) hands them over before
every start (state made by ``swtpm_setup`` as root, or by a release that ran
swtpm as root, included) and links the public socket path QEMU is given,
which lives in the agent's own run dir, into that directory: an
unprivileged swtpm cannot bind there, and a directory every swtpm uid could
write would let one VM's swtpm squat another VM's socket name.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from vtpcm_agent.swtpm import process
from vtpcm_common import exception

OWN_DIR_MODE = 0o711  # QEMU traverses to its socket; nobody lists it


def hand_over(paths: process.SwtpmPaths, run_as: process.RunAs, public_ctrl: Path,
              public_data: Path | None) -> None:
    """Give ``run_as`` its socket dir, state dir and log file; link the public paths."""
    for path in (paths.state_dir, paths.log_file, paths.ctrl_socket):
        _check_reachable(path, run_as, paths.state_dir.name)
    own = paths.ctrl_socket.parent
    if own.is_symlink():
        raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                   reason="socket dir %s is a symlink" % own)
    own.mkdir(mode=OWN_DIR_MODE, exist_ok=True)
    os.chown(own, run_as.uid, run_as.gid)
    os.chmod(own, OWN_DIR_MODE)
    for root, dirs, files in os.walk(paths.state_dir):  # never follows links
        for name in (root, *(os.path.join(root, n) for n in dirs + files)):
            st = os.lstat(name)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                # a hard link planted by an earlier swtpm of this uid would
                # hand it the linked file (fs.protected_hardlinks stops its
                # making one to a file it does not own; this stops the rest)
                raise exception.SwtpmError(
                    vtpcm_id=paths.state_dir.name,
                    reason="%s has %d hard links; not handing it over" % (name, st.st_nlink))
            os.lchown(name, run_as.uid, run_as.gid)
    fd = os.open(paths.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                 0o600)
    try:
        os.fchown(fd, run_as.uid, run_as.gid)
    finally:
        os.close(fd)
    link(public_ctrl, paths.ctrl_socket)
    if public_data is not None and paths.data_socket is not None:
        link(public_data, paths.data_socket)


def _check_reachable(path: Path, run_as: process.RunAs, vtpcm_id: str) -> None:
    """Every directory above ``path`` lets ``run_as`` through: else swtpm
    exits 1 without a word (it cannot open its log either)."""
    for parent in reversed(path.parents):  # from / down
        if not parent.exists():  # its own socket dir, made below
            continue
        st = parent.stat()
        through = (st.st_mode & stat.S_IXOTH
                   or (st.st_uid == run_as.uid and st.st_mode & stat.S_IXUSR)
                   or (st.st_gid == run_as.gid and st.st_mode & stat.S_IXGRP))
        if not through:
            raise exception.SwtpmError(
                vtpcm_id=vtpcm_id,
                reason="swtpm uid %d cannot reach %s: directory %s is mode %04o (it "
                       "needs o+x)" % (run_as.uid, path, parent, stat.S_IMODE(st.st_mode)))


def link(public: Path, target: Path) -> None:
    """Point ``public`` at ``target`` (atomically), unless a process serves
    a socket there (a swtpm started before its uid was configured)."""
    if public.is_symlink():
        if Path(os.readlink(public)) == target:
            return
    elif public.exists() and process.socket_in_use(public):
        raise exception.SwtpmError(
            vtpcm_id=target.parent.name,
            reason="another process serves %s; not linking it to %s" % (public, target))
    tmp = public.with_name(public.name + ".link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, public)


def remove(own: Path, public: tuple[Path, ...]) -> None:
    """Remove the public links and the socket dir of a vTPCM that is gone."""
    for path in public:
        if path.is_symlink():
            path.unlink()
    if own.exists() and not own.is_symlink():
        shutil.rmtree(own)
