"""What a freed swtpm uid leaves for its next holder (issue 9, leftovers of
the uid review): entries inside root-owned sticky directories of the
shared temporary directories (``/tmp/.X11-unix``-like), SysV IPC objects,
POSIX message queues, and what only a live process holds (an abstract
Unix socket). Real uids (``setpriv``), real files, real IPC objects, a
real mqueue file system (in a private mount namespace); everything made
here is removed in ``finally``. Runs as root, as the agent does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.refusal import refused
from vtpcm_agent.swtpm import sysvipc, uidprocs
from vtpcm_common import exception

pytestmark = pytest.mark.functional

UID = 1900000230  # reserved for these tests: outside systemd's and subuid ranges
OTHER = UID + 1
LOCAL = UID + 2  # a local user, not a swtpm
CLIENT_PYTHON = "/usr/bin/python3"


def as_uid(uid: int, *argv: str) -> str:
    """Run ``argv`` as ``uid`` (no groups), its output."""
    return subprocess.run(["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid,
                           "--clear-groups", *argv], check=True, capture_output=True,
                          text=True, timeout=20).stdout


def ipcmk(uid: int, *args: str) -> int:
    """A SysV IPC object made by ``uid``: its id."""
    return int(as_uid(uid, "ipcmk", *args).split()[-1])


def rm_ipc(obj: sysvipc.IpcObject) -> None:
    """Remove an IPC object as root (clean-up of the tests only)."""
    subprocess.run(["ipcrm", {"shm": "-m", "sem": "-s", "msg": "-q"}[obj.kind], str(obj.ident)],
                   capture_output=True, timeout=20)


@pytest.fixture(autouse=True)
def _nothing_of_the_test_uids_left() -> Iterator[None]:
    yield
    for uid in (UID, OTHER, LOCAL):
        uidprocs.kill_all(uid, timeout=5.0)
        for obj in sysvipc.objects_of(uid):
            rm_ipc(obj)


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

    removed = uidprocs.sweep((UID,), (top,), ipc_root=Path("/nonexistent"))

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
                     "uid %d remain (the uid is kept): could not remove leftover(s) of "
                     "swtpm uid %d (1: %s (not looked into: more than %d levels or %d shared "
                     "directories))" % (UID, UID, UID, chain, uidprocs.MAX_DEPTH,
                                       uidprocs.MAX_SHARED_DIRS)):
            uidprocs.sweep((UID,), (top,), ipc_root=Path("/nonexistent"))
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
                 "%d remain (the uid is kept): could not remove leftover(s) of swtpm uid "
                 "%d (1: %s ([Errno 1] Operation not permitted: 'stuck'))"
                 % (UID, UID, UID, x11 / "stuck")):
        uidprocs.sweep((UID,), (top,))
    assert not (x11 / "a").exists() and not (top / "b").exists()
    assert shm not in [o.ident for o in sysvipc.objects_of(UID)]  # went on to IPC
    subprocess.run(["chattr", "-i", str(x11 / "stuck")], check=True, timeout=20)
    assert uidprocs.sweep((UID,), (top,)) == [str(x11 / "stuck")]


def test_sysv_ipc_objects_of_the_uid_are_removed_and_only_those() -> None:
    mine = {("shm", ipcmk(UID, "-M", "4096")), ("sem", ipcmk(UID, "-S", "1")),
            ("msg", ipcmk(UID, "-Q"))}
    others = {("shm", ipcmk(OTHER, "-M", "4096")), ("msg", ipcmk(OTHER, "-Q"))}
    listed = {(o.kind, o.ident) for o in sysvipc.objects_of(UID)}
    assert listed == mine  # control: made, and owned/created by the uid
    removed = uidprocs.sweep((UID,), ())
    assert len(removed) == 3 and all(r.startswith("SysV ") for r in removed)
    assert sysvipc.objects_of(UID) == []
    assert {(o.kind, o.ident) for o in sysvipc.objects_of(OTHER)} == others


def test_a_segment_still_attached_keeps_the_uid_until_it_is_detached(
        caplog: pytest.LogCaptureFixture) -> None:
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
        for _again in range(2):  # a later sweep (the periodic one) finds it again
            with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: leftovers of "
                         "swtpm uid %d remain (the uid is kept): SysV IPC object(s) of the uid "
                         "still there (1: SysV shared memory id %d (owner uid %d, creator uid "
                         "%d, attached by 1 process(es)))" % (UID, UID, shm, UID, UID)):
                uidprocs.sweep((UID,), ())
        # "Removed" is logged only for what went, not each time it is marked
        assert "Removed SysV" not in caplog.text
    finally:
        assert libc.shmdt(ctypes.c_void_p(addr)) == 0
    assert uidprocs.sweep((UID,), ()) == []  # gone with its last detach
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
        with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: processes of swtpm "
                     "uid %d are alive (1: %d) holding abstract sockets (1: @%s (pid %d)); not "
                     "sweeping or freeing the uid" % (UID, UID, holder.pid, name, holder.pid)):
            uidprocs.sweep((UID,), (top,))
        assert (top / "left").exists()  # nothing swept while it lives

        assert uidprocs.kill_all(UID, timeout=5.0) == 1
        assert holder.wait(timeout=10) == -9
        assert uidprocs.sweep((UID,), (top,)) == [str(top / "left")]
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


def _plant_setuid_and_hold(path: Path, flag: str, uid: int = UID) -> subprocess.Popen[str]:
    """``uid`` (an exploited swtpm: open, write, fchmod) leaves a setuid
    copy of ``id`` at ``path``; LOCAL (a local user) opens it with ``flag``
    and, told to go, exec's the fd: prints the euid's ``id -u`` or
    ``refused ERRNO``."""
    as_uid(uid, CLIENT_PYTHON, "-c",
           "import os,sys\nd=open('/usr/bin/id','rb').read()\n"
           "fd=os.open(sys.argv[1],os.O_WRONLY|os.O_CREAT,0o755);os.write(fd,d);"
           "os.fchmod(fd,0o4755);os.close(fd)", str(path))
    assert path.stat().st_mode & 0o7777 == 0o4755  # control: planted setuid
    return subprocess.Popen(
        ["setpriv", "--reuid=%d" % LOCAL, "--regid=%d" % LOCAL, "--clear-groups",
         CLIENT_PYTHON, "-c", "import os,sys\nfd=os.open(sys.argv[1],os.%s)\n"
         "print('held',flush=True)\nsys.stdin.readline()\n"
         "try:\n    os.execv('/proc/self/fd/%%d'%%fd,['id','-u'])\n"
         "except OSError as e:\n    print('refused', e.errno)" % flag, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_setuid_file_of_the_uid_held_open_by_another_user_is_defused(top: Path) -> None:
    """Review of the sweep, HIGH 1 (p1): the uid (an exploited swtpm: open,
    write, fchmod) leaves a setuid copy of ``id``; a local user opens it;
    the sweep unlinks the name, but the user's fd outlives it, and exec'ing
    it through /proc/self/fd ran with the uid as euid. The sweep now clears
    the setuid and exec bits through an O_NOFOLLOW fd before the unlink."""
    holder = _plant_setuid_and_hold(top / "x", "O_RDONLY")
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert uidprocs.sweep((UID,), (top,), ipc_root=Path("/nonexistent")) == [str(top / "x")]
        out, _ = holder.communicate("go\n", timeout=20)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=10)
    assert str(UID) not in out, "the swept file still ran as the uid: %s" % out
    assert out.strip() == "refused 13"  # EACCES: no exec bit left


def test_a_setuid_file_held_open_after_its_unlink_is_defused_before_the_uid_is_freed(
        top: Path) -> None:
    """Review round 4 of the sweep, LOW 1: a setuid file of the uid outside
    the swept directories (its state dir, removed by the destroy before the
    sweep) held open by a local user, with no process of the uid left:
    ``kill_all`` has nothing to kill and does not defuse, the sweep found
    nothing, the uid was freed, and the holder then exec'd the fd as the
    uid. The sweep now defuses what any process holds open first."""
    state = Path(tempfile.mkdtemp(prefix="vtpcm-state-", dir="/var/tmp"))  # noqa: S108
    os.chown(state, UID, UID)
    os.chmod(state, 0o755)  # the uid owns it: it may open it to all  # noqa: S103
    holder: subprocess.Popen[str] | None = None
    try:
        holder = _plant_setuid_and_hold(state / "x", "O_PATH")
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        (state / "x").unlink()  # the state dir's removal, before the sweep
        assert uidprocs.kill_all(UID, timeout=5.0) == 0  # nothing of the uid runs
        assert uidprocs.sweep((UID,), (top,), ipc_root=Path("/nonexistent")) == []
        out, _ = holder.communicate("go\n", timeout=20)
    finally:
        if holder is not None:
            if holder.poll() is None:
                holder.kill()
            holder.wait(timeout=10)
        for entry in state.iterdir():
            entry.unlink()
        state.rmdir()
    assert str(UID) not in out, "the freed uid ran again through the held fd: %s" % out
    assert out.strip() == "refused 13"  # EACCES: no exec bit left


def test_one_held_fd_scan_defuses_the_files_of_both_uids(top: Path, held_fd_scans) -> None:
    """A VM's swtpm uid and QEMU uid are swept together with one scan of
    every process's fds (final read: the destroy scanned twice, once per
    uid): a setuid file of each, unlinked and held open by a local user,
    is defused by that one scan."""
    states: list[Path] = []
    holders: list[subprocess.Popen[str]] = []
    outs: list[str] = []
    try:
        for uid in (UID, OTHER):
            state = Path(tempfile.mkdtemp(prefix="vtpcm-state-", dir="/var/tmp"))  # noqa: S108
            states.append(state)
            os.chown(state, uid, uid)
            os.chmod(state, 0o755)  # noqa: S103
            holders.append(_plant_setuid_and_hold(state / "x", "O_PATH", uid))
            assert holders[-1].stdout is not None
            assert holders[-1].stdout.readline() == "held\n"
            (state / "x").unlink()  # only the held-fd scan can reach it now
        assert uidprocs.sweep((UID, OTHER), (top,), ipc_root=Path("/nonexistent")) == []
        assert held_fd_scans == [frozenset({UID, OTHER})]
        for holder in holders:
            outs.append(holder.communicate("go\n", timeout=20)[0])
    finally:
        for holder in holders:
            if holder.poll() is None:
                holder.kill()
            holder.wait(timeout=10)
        for state in states:
            for entry in state.iterdir():
                entry.unlink()
            state.rmdir()
    assert [out.strip() for out in outs] == ["refused 13", "refused 13"], outs

def _gift(kind: str, to: int) -> subprocess.Popen[str]:
    """LOCAL (a local user, not a swtpm) makes an object, gives it to ``to``
    with IPC_SET (its creator stays LOCAL) and, for shm, keeps it attached."""
    code = textwrap.dedent("""
        import ctypes, ctypes.util, sys
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.shmat.restype = ctypes.c_void_p
        kind, to = sys.argv[1], int(sys.argv[2])
        make = {"shm": lambda: libc.shmget(0, 4096, 0o1666), "msg": lambda: libc.msgget(0, 0o1600)}
        ctl = {"shm": libc.shmctl, "msg": libc.msgctl}[kind]
        ident = make[kind]()
        buf = ctypes.create_string_buffer(512)
        assert ctl(ident, 2, buf) == 0
        ctypes.c_uint.from_buffer(buf, 4).value = to
        assert ctl(ident, 1, buf) == 0, ctypes.get_errno()
        if kind == "shm":
            assert libc.shmat(ident, None, 0) not in (None, ctypes.c_void_p(-1).value)
        print(ident, flush=True)
        sys.stdin.readline()
        """)
    return subprocess.Popen(["setpriv", "--reuid=%d" % LOCAL, "--regid=%d" % LOCAL,
                             "--clear-groups", CLIENT_PYTHON, "-c", code, kind, str(to)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_segment_a_local_user_gave_to_the_uid_is_given_back_not_waited_for() -> None:
    """Review of the sweep, MEDIUM 2 (p3): any local user gave a segment to
    the uid and kept it attached; the sweep listed it as the uid's and
    failed for as long as the user liked. Now only objects the uid CREATED
    are its leftovers; one it was given goes back to its creator."""
    gift = _gift("shm", UID)
    try:
        assert gift.stdout is not None
        shm = int(gift.stdout.readline())
        listed = [o for o in sysvipc.objects_of(UID) if o.ident == shm]
        assert [(o.owner, o.creator) for o in listed] == [(UID, LOCAL)]  # control: given
        assert uidprocs.sweep((UID,), ()) == []
        assert sysvipc.objects_of(UID) == []
        back = [o for o in sysvipc.objects_of(LOCAL) if o.ident == shm]
        assert [(o.kind, o.owner, o.creator, o.attached) for o in back] == [
            ("shm", LOCAL, LOCAL, 1)]  # the user's again, untouched otherwise
    finally:
        gift.communicate("x\n", timeout=20)


def test_a_stale_id_never_removes_another_uids_object() -> None:
    """Review of the sweep, LOW 4 (p4): ids are reused; the sweep's
    IPC_RMID by an id it listed as the uid's removed whatever object had
    the id by then. Now the call runs as the uid (a forked child, no
    capabilities): the kernel refuses another uid's object."""
    queue = ipcmk(OTHER, "-Q")
    stale = sysvipc.IpcObject("msg", queue, UID, UID, 0)  # listed as the uid's, id reused
    with pytest.raises(OSError) as err:
        sysvipc.remove_as(stale, UID)
    assert err.value.errno == errno.EPERM
    assert [o.ident for o in sysvipc.objects_of(OTHER)] == [queue]  # still OTHER's
    given = sysvipc.IpcObject("msg", queue, UID, LOCAL, 0)  # a gift, id reused meanwhile
    with pytest.raises(OSError):
        sysvipc.give_back(given)
    assert [(o.owner, o.creator) for o in sysvipc.objects_of(OTHER)] == [(OTHER, OTHER)]


def test_what_the_sweep_logs_and_raises_is_bounded(top: Path) -> None:
    """Review of the sweep, LOW 5: every leftover was named in one log line
    or error, unbounded. Now a count and the first ten."""
    names = ["f%02d" % i for i in range(25)]
    as_uid(UID, "touch", *(str(top / n) for n in names))
    subprocess.run(["chattr", "+i", *(str(top / n) for n in names)], check=True, timeout=20)
    with pytest.raises(exception.SwtpmError) as err:
        uidprocs.sweep((UID,), (top,), ipc_root=Path("/nonexistent"))
    message = err.value.message
    assert "could not remove leftover(s) of swtpm uid %d (25: " % UID in message
    assert message.count("Operation not permitted") == 10
    assert message.endswith(" and 15 more)")


def test_another_uid_racing_inside_a_directory_the_uid_left_open_to_all(top: Path) -> None:
    """Review of the sweep, LOW 6 (p2): the uid leaves directories mode
    0777; another swtpm uid keeps creating files in them, so the sweep's
    rmdir lost the race (ENOTEMPTY) again and again. The sweep now closes
    each such directory to all but root before it empties it: one sweep
    suffices, round after round."""
    count = 30
    racer = subprocess.Popen(
        ["setpriv", "--reuid=%d" % OTHER, "--regid=%d" % OTHER, "--clear-groups",
         CLIENT_PYTHON, "-c", "import os, sys\nd = sys.argv[1]\ni = 0\nprint('up', flush=True)\n"
         "while True:\n    i += 1\n    for k in range(%d):\n        try:\n"
         "            os.close(os.open('%%s/u%%d/f%%d' %% (d, k, i), os.O_CREAT | os.O_WRONLY))\n"
         "        except OSError:\n            pass\n" % count, str(top)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert racer.stdout is not None and racer.stdout.readline() == "up\n"
        for _round in range(3):
            as_uid(UID, CLIENT_PYTHON, "-c", "import os, sys\nfor i in range(%d):\n"
                   "    p = sys.argv[1] + '/u%%d' %% i; os.mkdir(p); os.chmod(p, 0o777)" % count,
                   str(top))
            deadline = time.monotonic() + 10
            while len(os.listdir(top / ("u%d" % (count - 1)))) < 20:  # the racer is in
                assert time.monotonic() < deadline, "the racer wrote nothing"
                time.sleep(0.01)
            removed = uidprocs.sweep((UID,), (top,), ipc_root=Path("/nonexistent"))
            assert len(removed) == count
            assert not any((top / ("u%d" % k)).exists() for k in range(count))
    finally:
        racer.kill()
        racer.wait(timeout=10)


def test_kill_all_kills_by_the_uid_itself(monkeypatch):
    """Review round 3 of the sweep, LOW 5: kill_all's first shot is
    kill(-1, SIGKILL) sent as the uid, one pass that a process forking its
    children cannot outrun. Shown with the pid-by-pid kill disabled: a
    process of the uid and the children it keeps forking all die."""
    uid = UID + 3  # its own: the fork loop must not meet the other tests
    proc = subprocess.Popen(
        [CLIENT_PYTHON, "-c", textwrap.dedent("""
            import os, time
            print("up", flush=True)
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                time.sleep(0.01)
            """)],
        user=uid, group=uid, extra_groups=[], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        deadline = time.monotonic() + 10
        while len(uidprocs.pids_of(uid)) < 3:  # control: the uid forks away
            assert time.monotonic() < deadline
            time.sleep(0.02)
        monkeypatch.setattr(uidprocs, "_sigkill", lambda pid, uid_: None)
        assert uidprocs.kill_all(uid, timeout=3.0) >= 3
        assert uidprocs.pids_of(uid) == []
        assert proc.wait(10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        monkeypatch.undo()
        uidprocs.kill_all(uid, timeout=5.0)
