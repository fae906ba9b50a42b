"""Durable writes of small secret files (wrapped keys, signing keys)."""

import os
import secrets
from pathlib import Path

from vtpcm_common import spans


@spans.timed("fsync:dir")
def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@spans.timed("fsync:write_atomic")
def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, replace: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all, with ``mode``, fsynced.

    The data goes to a fresh temporary file next to ``path`` first. Without
    ``replace`` the final step is ``link``, which raises FileExistsError if
    ``path`` exists, so nothing is overwritten by accident (and of two
    concurrent creators exactly one wins)."""
    tmp = path.with_name(".%s.%s.tmp" % (path.name, secrets.token_hex(6)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
