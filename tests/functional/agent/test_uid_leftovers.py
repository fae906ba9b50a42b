"""What a freed swtpm uid leaves for its next holder (issue 9, leftovers of
the uid review): entries inside root-owned sticky directories of the
shared temporary directories (``/tmp/.X11-unix``-like), SysV IPC objects,
POSIX message queues, and what only a live process holds (an abstract
Unix socket). Real uids (``setpriv``), real files, real IPC objects, a
real mqueue file system (in a private mount namespace); everything made
here is removed in ``finally``. Runs as root, as the agent does.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.refusal import refused
from vtpcm_agent.swtpm import sysvipc, uidprocs
from vtpcm_common import exception

pytestmark = pytest.mark.functional

UID = 1900000230  # reserved for these tests: outside systemd's and subuid ranges
OTHER = UID + 1
CLIENT_PYTHON = "/usr/bin/python3"


def as_uid(uid: int, *argv: str) -> str:
    """Run ``argv`` as ``uid`` (no groups), its output."""
    return subprocess.run(["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid,
                           "--clear-groups", *argv], check=True, capture_output=True,
                          text=True, timeout=20).stdout


def ipcmk(uid: int, *args: str) -> int:
    """A SysV IPC object made by ``uid``: its id."""
    return int(as_uid(uid, "ipcmk", *args).split()[-1])


@pytest.fixture(autouse=True)
def _nothing_of_the_test_uids_left() -> Iterator[None]:
    yield
    for uid in (UID, OTHER):
        uidprocs.kill_all(uid, timeout=5.0)
        for obj in sysvipc.objects_of(uid):
            with contextlib.suppress(OSError):
                sysvipc.remove(obj)


@pytest.fixture
def top() -> Iterator[Path]:
    """A root-owned 1777 directory standing for /tmp (on /tmp's file system)."""
    path = Path(tempfile.mkdtemp(prefix="vtpcm-sweep-", dir="/tmp"))  # noqa: S108
    os.chmod(path, 0o1777)  # noqa: S103
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True, timeout=20)
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, timeout=20)


def shared(path: Path) -> Path:
    path.mkdir()
    os.chmod(path, 0o1777)  # noqa: S103  what root's /tmp/.X11-unix, /tmp/.ICE-unix are
    return path


def test_entries_in_root_owned_sticky_subdirectories_are_swept(top: Path) -> None:
    """The uid's socket in ``.X11-unix``-like directories (and deeper ones)
    outlived it before: only the top level of /tmp was swept."""
    x11 = shared(top / ".X11-unix")
    deeper = shared(x11 / "deeper")
    private = top / "rootonly"
    private.mkdir(mode=0o755)  # not shared: never entered
    secret = top / "root-secret"
    secret.write_text("root's")
    as_uid(UID, CLIENT_PYTHON, "-c", textwrap.dedent("""
        import os, socket, sys
        x11, deeper, secret = sys.argv[1:4]
        s = socket.socket(socket.AF_UNIX); s.bind(x11 + "/X7")
        open(deeper + "/left", "w").write("for the next holder")
        os.makedirs(deeper + "/tree/a/b")
        os.symlink(secret, x11 + "/link-to-root")
        """), str(x11), str(deeper), str(secret))
    as_uid(OTHER, "touch", str(x11 / "others"))
    (private / "planted").write_text("x")
    os.chown(private / "planted", UID, UID)  # a root dir the uid could not write: stays
    mine = [x11 / "X7", deeper / "left", deeper / "tree", x11 / "link-to-root"]
    assert all(p.lstat().st_uid == UID for p in mine)  # control: they are the uid's

    removed = uidprocs.sweep(UID, (top,), ipc_root=Path("/nonexistent"))

    assert sorted(removed) == sorted(str(p) for p in mine)
    assert not any(os.path.lexists(p) for p in mine)
    assert secret.read_text() == "root's"  # the link was removed, not followed
    assert (x11 / "others").exists() and (private / "planted").exists()
    assert x11.is_dir() and deeper.is_dir()  # root's directories stay


def test_the_sweep_neither_crosses_mounts_nor_follows_links_nor_goes_unbounded(
        top: Path) -> None:
    elsewhere = shared(top / "mounted")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,size=1m", "vtpcm-test",
                    str(elsewhere)], check=True, timeout=20)
    try:
        outside = Path(tempfile.mkdtemp(prefix="vtpcm-out-", dir="/tmp"))  # noqa: S108
        os.chmod(outside, 0o1777)  # noqa: S103
        os.symlink(outside, top / "link-to-shared")  # root's link to a shared dir
        chain = top
        for _ in range(uidprocs.MAX_DEPTH + 1):
            chain = shared(chain / "d")
        as_uid(UID, "touch", str(elsewhere / "on-tmpfs"), str(outside / "via-link"),
               str(chain / "too-deep"), str(chain.parent / "deep-enough"))

        with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: leftovers of swtpm "
                     "uid %d remain (the uid is kept): could not remove 1 leftover(s) of "
                     "swtpm uid %d: %s (not looked into: more than %d levels or %d shared "
                     "directories)" % (UID, UID, UID, chain, uidprocs.MAX_DEPTH,
                                       uidprocs.MAX_SHARED_DIRS)):
            uidprocs.sweep(UID, (top,), ipc_root=Path("/nonexistent"))
        assert not (chain.parent / "deep-enough").exists()  # swept up to the bound
        assert (chain / "too-deep").exists()  # and named beyond it
        assert (elsewhere / "on-tmpfs").exists()  # another file system: not entered
        assert (outside / "via-link").exists()  # a link: not followed
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True, timeout=20)
        subprocess.run(["rm", "-rf", "--one-file-system", str(outside)], check=True,
                       timeout=20)


def test_an_entry_that_cannot_be_removed_is_named_and_the_rest_still_goes(
        top: Path) -> None:
    x11 = shared(top / ".X11-unix")
    as_uid(UID, "touch", str(x11 / "stuck"), str(x11 / "a"), str(top / "b"))
    shm = ipcmk(UID, "-M", "4096")
    subprocess.run(["chattr", "+i", str(x11 / "stuck")], check=True, timeout=20)
    with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: leftovers of swtpm uid "
                 "%d remain (the uid is kept): could not remove 1 leftover(s) of swtpm uid "
                 "%d: %s ([Errno 1] Operation not permitted: 'stuck')"
                 % (UID, UID, UID, x11 / "stuck")):
        uidprocs.sweep(UID, (top,))
    assert not (x11 / "a").exists() and not (top / "b").exists()
    assert shm not in [o.ident for o in sysvipc.objects_of(UID)]  # went on to IPC
    subprocess.run(["chattr", "-i", str(x11 / "stuck")], check=True, timeout=20)
    assert uidprocs.sweep(UID, (top,)) == [str(x11 / "stuck")]


def test_sysv_ipc_objects_of_the_uid_are_removed_and_only_those() -> None:
    mine = {("shm", ipcmk(UID, "-M", "4096")), ("sem", ipcmk(UID, "-S", "1")),
            ("msg", ipcmk(UID, "-Q"))}
    others = {("shm", ipcmk(OTHER, "-M", "4096")), ("msg", ipcmk(OTHER, "-Q"))}
    listed = {(o.kind, o.ident) for o in sysvipc.objects_of(UID)}
    assert listed == mine  # control: made, and owned/created by the uid
    removed = uidprocs.sweep(UID, ())
    assert len(removed) == 3 and all(r.startswith("SysV ") for r in removed)
    assert sysvipc.objects_of(UID) == []
    assert {(o.kind, o.ident) for o in sysvipc.objects_of(OTHER)} == others


def test_a_segment_still_attached_keeps_the_uid_until_it_is_detached() -> None:
    """IPC_RMID only marks an attached segment; Linux lets its owner attach
    it again by id meanwhile, so it remains the uid's."""
    shm = ipcmk(UID, "-M", "4096", "-p", "0666")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    libc.shmdt.argtypes = (ctypes.c_void_p,)
    addr = libc.shmat(shm, None, 0)  # another process (root here) holds it
    assert addr not in (None, ctypes.c_void_p(-1).value)
    try:
        with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: leftovers of swtpm "
                     "uid %d remain (the uid is kept): SysV shared memory id %d (owner uid "
                     "%d, creator uid %d, attached by 1 process(es)) still there"
                     % (UID, UID, shm, UID, UID)):
            uidprocs.sweep(UID, ())
    finally:
        assert libc.shmdt(ctypes.c_void_p(addr)) == 0
    assert uidprocs.sweep(UID, ()) == []  # gone with its last detach
    assert sysvipc.objects_of(UID) == []


def test_a_live_process_holding_an_abstract_socket_blocks_the_sweep(top: Path) -> None:
    """An abstract socket is in no file system: it lives exactly as long as
    a process holds it. The sweep refuses while any process of the uid
    lives (naming it and its abstract socket), and goes on once it is
    killed; the name is free then."""
    name = "vtpcm-test-%d-%d" % (os.getpid(), UID)
    holder = subprocess.Popen(
        ["setpriv", "--reuid=%d" % UID, "--regid=%d" % UID, "--clear-groups", CLIENT_PYTHON,
         "-c", "import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\n"
         "s.bind('\\0' + sys.argv[1]); s.listen(1)\nprint('up', flush=True)\ntime.sleep(60)",
         name], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        as_uid(UID, "touch", str(top / "left"))
        probe = socket.socket(socket.AF_UNIX)
        with pytest.raises(OSError, match="Address already in use"):  # control: held
            probe.bind("\0" + name)
        pids = uidprocs.pids_of(UID)
        assert pids == [holder.pid]
        with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: processes [%d] of "
                     "swtpm uid %d are alive (holding abstract sockets @%s (pid %d)); not "
                     "sweeping or freeing the uid" % (UID, holder.pid, UID, name, holder.pid)):
            uidprocs.sweep(UID, (top,))
        assert (top / "left").exists()  # nothing swept while it lives

        assert uidprocs.kill_all(UID, timeout=5.0) == 1
        assert holder.wait(timeout=10) == -9
        assert uidprocs.sweep(UID, (top,)) == [str(top / "left")]
        probe.bind("\0" + name)  # the abstract name died with its process
        probe.close()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=10)


_MQUEUE = """
import os, subprocess, sys
from pathlib import Path
from vtpcm_agent.swtpm import uidprocs
uid, where = int(sys.argv[1]), Path(sys.argv[2])
subprocess.run(["mount", "-t", "mqueue", "vtpcm-test", str(where)], check=True, timeout=20)
queue = where / ("vtpcm-test-%d" % os.getpid())
try:
    subprocess.run(["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups",
                    sys.executable, "-c", "open(%r, 'w').close()" % str(queue)],
                   check=True, timeout=20)
    print("made", queue.stat().st_uid == uid, flush=True)
    print("swept", uidprocs.sweep_files(uid, (where,)) == [str(queue)], flush=True)
    print("gone", not queue.exists(), flush=True)
finally:
    if queue.exists():
        queue.unlink()
"""


def test_a_posix_message_queue_of_the_uid_is_removed() -> None:
    """The /dev/mqueue half of the sweep, run on a real mqueue file system
    (mounted in a private mount namespace: this host has none mounted)."""
    with tempfile.TemporaryDirectory(prefix="vtpcm-mq-") as where:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _MQUEUE,
             str(UID), where], capture_output=True, text=True, timeout=30,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["made True", "swept True", "gone True"], done.stdout
