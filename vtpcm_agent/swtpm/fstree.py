"""Walk and remove a directory tree a swtpm uid made, without recursion.

Why: an exploited swtpm can build a chain of thousands of directories
(mkdirat is in its seccomp list). A recursive walk (``shutil.rmtree``, one
Python frame and one open fd per level) then raises RecursionError or
EMFILE, and the destroy that runs it never frees the uid. This walk keeps
one directory fd open at a time and a list of names per level in memory:
it goes down by ``openat(O_NOFOLLOW)`` and back up by ``..``, checked to
be the inode it came from. It is run after every process of the uid is
dead, or (the state dir's removal, ``remove(seize=True)``) each directory
is taken from the uid before it is listed, so nothing renames the tree
meanwhile; the check refuses if something did. Symlinks are never
followed, and a directory on another file system is refused, not entered.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path

from vtpcm_common import exception

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW

#: (directory fd, entry name, its lstat, its path for messages)
Leaf = Callable[[int, str, os.stat_result, str], None]


@dataclasses.dataclass
class _Level:
    ident: tuple[int, int]
    name: str
    shown: str
    pending: list[str] | None = None


def ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def open_dir(name: str, dfd: int, seen: tuple[int, int], shown: str, doing: str,
             top: str) -> int:
    """Open directory ``name`` under ``dfd`` and insist it is the inode ``seen``
    (``top``: the walk's top directory's name, a vTPCM id, for errors)."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    except OSError as exc:
        raise exception.SwtpmError(vtpcm_id=top,
                                   reason="%s changed while %s (%s)"
                                   % (shown, doing, exc.strerror)) from None
    if ident(os.fstat(fd)) != seen:
        os.close(fd)
        raise exception.SwtpmError(vtpcm_id=top,
                                   reason="%s changed while %s" % (shown, doing))
    return fd


def walk(top_fd: int, shown: str, leaf: Leaf, leave: Callable[[int, str], None],
         left: Callable[[int, str], None], doing: str,
         enter: Callable[[int], None] | None = None) -> None:
    """Post-order walk of the tree under the open directory ``top_fd``.

    ``leaf`` gets each non-directory; ``leave(dir_fd, path)`` each
    directory (``top_fd``'s too) once its entries are done, and
    ``left(parent_fd, name)`` each directory below the top once the walk is
    back in its parent. ``enter(dir_fd)`` gets each directory (the top's
    too) before it is listed: top-down, through the walk's pinned fd.
    ``top_fd`` stays open and the caller's. ``doing`` names the walk in
    errors."""
    top_dev = os.fstat(top_fd).st_dev
    top = Path(shown).name
    fd = os.dup(top_fd)
    levels = [_Level(ident(os.fstat(fd)), "", shown)]
    try:
        while True:
            level = levels[-1]
            if level.pending is None:
                level.pending = []
                if enter is not None:
                    enter(fd)
                for name in os.listdir(fd):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        level.pending.append(name)
                    else:
                        leaf(fd, name, st, os.path.join(level.shown, name))
            if level.pending:
                name = level.pending.pop()
                where = os.path.join(level.shown, name)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    leaf(fd, name, st, where)
                    continue
                if st.st_dev != top_dev:
                    raise exception.SwtpmError(
                        vtpcm_id=top,
                        reason="%s is on another file system; not %s" % (where, doing))
                sub = open_dir(name, fd, ident(st), where, doing, top)
                os.close(fd)
                fd = sub
                levels.append(_Level(ident(st), name, where))
                continue
            leave(fd, level.shown)
            levels.pop()
            if not levels:
                return
            up = open_dir("..", fd, levels[-1].ident, levels[-1].shown, doing, top)
            os.close(fd)
            fd = up
            left(fd, level.name)
    finally:
        os.close(fd)


# the bits that make a file run as (or be executable by) anyone
UNSAFE_BITS = stat.S_ISUID | stat.S_ISGID | 0o111


def defuse(dfd: int, name: str, st: os.stat_result, uid: int) -> None:
    """Before the sweep unlinks regular file ``name`` of ``uid``: clear its
    setuid, setgid and exec bits through an ``O_NOFOLLOW`` fd checked to be
    the inode ``st``. An fd some other user holds to it outlives the
    unlink; exec'ing it later through ``/proc/self/fd`` would run as the
    uid (review of the sweep, HIGH 1). Only the uid's own regular files:
    never another owner's inode (a hard link of it), never a FIFO or
    device (``O_NONBLOCK``: neither waits on a lease nor a writer)."""
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or not st.st_mode & UNSAFE_BITS:
        return
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                 | os.O_CLOEXEC, dir_fd=dfd)
    try:
        now = os.fstat(fd)
        if ident(now) != ident(st) or now.st_uid != uid or not stat.S_ISREG(now.st_mode):
            return  # swapped meanwhile: not the file looked at
        os.fchmod(fd, stat.S_IMODE(now.st_mode) & ~UNSAFE_BITS)
    finally:
        os.close(fd)


def seize(dfd: int) -> None:
    """Directory ``dfd`` made the agent's (root's) and 0700: from now on no other uid can
    add, remove or rename entries in it (fchown on the pinned fd: not a
    path the uid could swap)."""
    me = os.geteuid()
    if os.fstat(dfd).st_uid != me:
        os.fchown(dfd, me, os.getegid())
    os.fchmod(dfd, 0o700)


def remove_at(dfd: int, name: str, shown: str, defuse_uid: int | None = None,
              take: bool = False) -> None:
    """Remove entry ``name`` under ``dfd``: a link as a link, a directory
    with everything in it (with ``defuse_uid``: each regular file of that
    uid made neither setuid, setgid nor executable first, ``defuse``; with
    ``take``: each directory made root's and 0700 before it is listed,
    top-down, so that a process of the uid still running cannot refill
    what is being emptied, review round 3 of the sweep, MEDIUM 2)."""
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        if defuse_uid is not None:
            defuse(dfd, name, st, defuse_uid)
        os.unlink(name, dir_fd=dfd)
        return

    def leaf(d: int, n: str, st_leaf: os.stat_result, _w: str) -> None:
        if defuse_uid is not None:
            defuse(d, n, st_leaf, defuse_uid)
        os.unlink(n, dir_fd=d)

    sub = open_dir(name, dfd, ident(st), shown, "removing it", Path(shown).name)
    try:
        if defuse_uid is not None and st.st_uid == defuse_uid:
            # another uid may keep adding entries to a directory the uid left
            # open to all (0777), so that it never empties; from here on
            # only root may (review of the sweep, LOW 6)
            os.fchmod(sub, 0o700)
        walk(sub, shown, leaf, lambda _d, _w: None, lambda d, n: os.rmdir(n, dir_fd=d),
             "removing it", enter=seize if take else None)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dfd)


def remove(path: Path, seize: bool = False) -> None:
    """Remove ``path`` and everything under it (absent: nothing to do); a
    symlink at ``path`` itself is removed as a link. ``seize``: each
    directory is made root's and 0700 before it is emptied (``remove_at``;
    the agent runs as root where swtpm uids are used)."""
    try:
        parent = os.open(path.parent, DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        try:
            os.stat(path.name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        remove_at(parent, path.name, str(path), take=seize)
    finally:
        os.close(parent)
