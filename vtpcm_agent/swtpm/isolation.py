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
import stat
from pathlib import Path

from vtpcm_agent.swtpm import fstree, process
from vtpcm_common import exception

OWN_DIR_MODE = 0o711  # QEMU traverses to its socket; nobody lists it


def hand_over(paths: process.SwtpmPaths, run_as: process.RunAs, public_ctrl: Path,
              public_data: Path | None, ctrl_target: Path | None = None) -> None:
    """Give ``run_as`` its socket dir, state dir and log file; link the
    public paths (the control path to ``ctrl_target``, the proxy's socket,
    if given, else to swtpm's own)."""
    for path in (paths.state_dir, paths.log_file, paths.ctrl_socket):
        _check_reachable(path, run_as, paths.state_dir.name)
    own = paths.ctrl_socket.parent
    if own.is_symlink():
        raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                   reason="socket dir %s is a symlink" % own)
    own.mkdir(mode=OWN_DIR_MODE, exist_ok=True)
    fd = os.open(own, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchown(fd, run_as.uid, run_as.gid)
        os.fchmod(fd, OWN_DIR_MODE)
    finally:
        os.close(fd)
    _chown_tree(paths.state_dir, run_as)
    try:
        fd = os.open(paths.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        raise exception.SwtpmError(
            vtpcm_id=paths.state_dir.name,
            reason="log file %s is not a regular file of its own (%s)"
            % (paths.log_file, exc.strerror)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise exception.SwtpmError(
                vtpcm_id=paths.state_dir.name,
                reason="log file %s is not a regular file of its own (%s)"
                % (paths.log_file, "not a regular file"))
        os.fchown(fd, run_as.uid, run_as.gid)
    finally:
        os.close(fd)
    link(public_ctrl, paths.ctrl_socket if ctrl_target is None else ctrl_target)
    if public_data is not None and paths.data_socket is not None:
        link(public_data, paths.data_socket)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# O_NONBLOCK: a FIFO swapped in after the lstat must not block the agent
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK


def _chown_tree(top: Path, run_as: process.RunAs) -> None:
    """Give the tree under ``top`` to ``run_as`` through directory fds.

    Why fds: the uid owns this tree, and a process of it (killed before, but
    this must hold on its own) could swap a directory for a symlink to the
    agent's own files between a path lookup and a chown. Every directory is
    opened O_NOFOLLOW relative to its parent's fd and every regular file
    O_NOFOLLOW, checked to be the inode that was looked at, and chowned
    through its fd; anything else is chowned as itself, never followed."""
    try:
        fd = os.open(top, _DIR_FLAGS)
    except OSError as exc:
        raise exception.SwtpmError(vtpcm_id=top.name,
                                   reason="state dir %s: %s" % (top, exc.strerror)) from None
    try:
        _chown_dir(fd, str(top), run_as, top.name)
    finally:
        os.close(fd)


def _chown_dir(dfd: int, where: str, run_as: process.RunAs, vtpcm_id: str) -> None:
    """Walk iteratively (fstree): a deep chain an earlier swtpm of the uid
    built must not make every later hand-over fail with RecursionError."""

    def leaf(parent: int, name: str, st: os.stat_result, shown: str) -> None:
        if stat.S_ISREG(st.st_mode):
            fd = _open_same(name, parent, _FILE_FLAGS, st, shown, vtpcm_id)
            try:
                links = os.fstat(fd).st_nlink
                if links > 1:
                    # a hard link planted by an earlier swtpm of this uid
                    # would hand it the linked file (fs.protected_hardlinks
                    # stops its making one to a file it does not own; this
                    # stops the rest)
                    raise exception.SwtpmError(
                        vtpcm_id=vtpcm_id,
                        reason="%s has %d hard links; not handing it over" % (shown, links))
                os.fchown(fd, run_as.uid, run_as.gid)
            finally:
                os.close(fd)
        else:  # symlink, socket, FIFO: the entry itself, relative to the pinned dir
            os.chown(name, run_as.uid, run_as.gid, dir_fd=parent, follow_symlinks=False)

    fstree.walk(dfd, where, leaf, lambda fd, _shown: os.fchown(fd, run_as.uid, run_as.gid),
                lambda _parent, _name: None, "handing it over")


def _open_same(name: str, dfd: int, flags: int, seen: os.stat_result, shown: str,
               vtpcm_id: str) -> int:
    """Open ``name`` under ``dfd`` and insist it is the inode ``seen``."""
    try:
        fd = os.open(name, flags, dir_fd=dfd)
    except OSError as exc:
        raise exception.SwtpmError(vtpcm_id=vtpcm_id,
                                   reason="%s changed while handing it over (%s)"
                                   % (shown, exc.strerror)) from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        raise exception.SwtpmError(vtpcm_id=vtpcm_id,
                                   reason="%s changed while handing it over" % shown)
    return fd


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
    if own.is_symlink():
        own.unlink()
    else:
        fstree.remove(own)
