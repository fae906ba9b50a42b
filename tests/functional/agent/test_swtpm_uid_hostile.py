"""An exploited swtpm against the agent (review of issue 9 points 5/6).

The hostile reviewer's proofs (/tmp/rev-iso-proofs p1, p2, p5), inverted:
a process of a VM's swtpm uid (the code a libtpms exploit runs) hides from
the agent, races its hand-over, or plants its pid file; the agent must kill
it before the uid serves another VM, never chown its own files to the uid,
and neither block nor exhaust memory on a planted pid file. Real swtpm
0.7.1, real uids (started with no groups, like the swtpm). Every process
started here is stopped by pid, and every process of the test's uids is
killed in the finalizer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
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

from tests.functional.agent.conftest import _kill_hard
from tests.functional.agent.test_swtpm_isolation import CLIENT_PYTHON, _manager, _running, status_of
from tests.refusal import refused
from vtpcm_agent import instances
from vtpcm_agent.swtpm import ctrl, isolation, process, uidprocs
from vtpcm_common import exception

pytestmark = pytest.mark.functional

FIRST_UID = 1900000210  # reserved for these tests: outside systemd's and subuid ranges
UIDS = (FIRST_UID, FIRST_UID + 9)


@pytest.fixture
def base(short_dir: Path) -> Path:
    os.chmod(short_dir, 0o711)  # noqa: S103
    return short_dir


@pytest.fixture
def hostile(base: Path) -> Iterator[instances.InstanceManager]:
    manager = _manager(base, UIDS)
    try:
        yield manager
    finally:
        for assoc in manager.list_vtpcms():
            paths = manager.paths(assoc.instance_uuid, assoc.vtpcm_id)
            pid = process.find_running(paths) or assoc.pid
            if pid is not None:
                try:
                    process.stop(pid, paths, timeout=6.0)
                finally:
                    _kill_hard(pid, paths)
        for uid in range(UIDS[0], UIDS[1] + 1):
            uidprocs.kill_all(uid, timeout=5.0)
        manager.associations.close()


def as_uid(uid: int, code: str) -> subprocess.Popen[str]:
    """A process of ``uid`` (no groups) running ``code``: the exploit."""
    return subprocess.Popen([CLIENT_PYTHON, "-c", textwrap.dedent(code)], user=uid, group=uid,
                            extra_groups=[], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _stop_child(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def _gone(pid: int) -> bool:
    return uidprocs.uids_of(pid) is None or uidprocs._zombie(pid)


def test_a_swtpm_that_hid_is_killed_before_its_uid_serves_another_vm(hostile):
    """p1: the swtpm unlinks its socket (the agent then thinks it is not
    running), a helper of its uid lingers and it leaves a file in /dev/shm."""
    a, pid_a = _running(hostile)
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    own = hostile.settings.run_dir / instances.OWN_DIRS / a
    hide = as_uid(uid, "import os; os.unlink(%r)" % str(own / "tpm.ctrl"))
    assert hide.communicate(timeout=20)[0] == ""
    linger = as_uid(uid, "import time; print('up', flush=True); time.sleep(120)")
    shm = Path("/dev/shm") / ("vtpcm-test-%s" % a)
    try:
        assert linger.stdout is not None and linger.stdout.readline() == "up\n"
        planted = as_uid(uid, "open(%r, 'w').write('left for the next holder')" % str(shm))
        assert planted.communicate(timeout=20)[0] == ""
        # positive control: the plant worked, the agent's liveness check is fooled
        paths = hostile.paths(a, hostile.get(a).vtpcm_id)
        assert not process.is_alive(pid_a, paths)
        assert status_of(pid_a)["Uid"].split() == [str(uid)] * 4
        assert shm.stat().st_uid == uid

        hostile.destroy(a)

        assert _gone(pid_a), "the hidden swtpm survived destroy()"
        assert linger.wait(timeout=10) == -9
        assert not shm.exists()
        assert uidprocs.pids_of(uid) == []
        b, pid_b = _running(hostile)
        assert hostile.associations.uid_of(b) != uid  # and a freed uid is given out last
        assert status_of(pid_b)["Uid"].split()[0] != str(uid)
    finally:
        _stop_child(linger)
        shm.unlink(missing_ok=True)


def test_a_uid_is_kept_while_a_process_of_it_survives(hostile, monkeypatch):
    """Its swtpm is gone: the shred goes on, the uid is kept aside (review
    round 2 of the sweep, MEDIUM 1); a start still refuses."""
    a, pid = _running(hostile)
    b, _ = _running(hostile)
    hostile.stop(b)
    uid = hostile.associations.uid_of(a)
    uid_b = hostile.associations.uid_of(b)
    vtpcm = hostile.get(a).vtpcm_id
    real = uidprocs.kill_all

    def unkillable(uid: int, timeout: float = 5.0, own_dirs: tuple[Path, ...] = ()) -> int:
        real(uid, timeout, own_dirs)
        raise exception.SwtpmError(vtpcm_id="uid %d" % uid,
                                   reason="processes [4242] of swtpm uid %d survive SIGKILL"
                                   % uid)

    monkeypatch.setattr(uidprocs, "kill_all", unkillable)
    assert hostile.destroy(a).state.value == "DESTROYED"
    assert _gone(pid)
    assert not hostile.keystore.exists(vtpcm)
    assert not hostile.paths(a, vtpcm).state_dir.exists()
    assert hostile.associations.uid_of(a) is None
    assert (a, uid) in hostile.associations.kept_uids()  # never given out again
    with refused(exception.SwtpmError, "swtpm error for vTPCM uid %d: processes [4242] of "
                 "swtpm uid %d survive SIGKILL" % (uid_b, uid_b)):
        hostile.start(b)


def test_a_lingering_process_of_the_uid_is_killed_before_a_start(hostile):
    """HIGH 2's precondition: nothing of the uid runs while its files are
    handed over again."""
    a, _ = _running(hostile)
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    hostile.stop(a)
    linger = as_uid(uid, "import time; print('up', flush=True); time.sleep(120)")
    try:
        assert linger.stdout is not None and linger.stdout.readline() == "up\n"
        assert hostile.start(a).pid is not None
        assert linger.wait(timeout=10) == -9
    finally:
        _stop_child(linger)


_RACE = """
import ctypes, os, sys, time
state, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
d, alt = os.path.join(state, "d"), os.path.join(state, "e")
os.mkdir(d)
for n in ("associations.sqlite", "keys"):
    open(os.path.join(d, n), "w").close()
os.symlink(target, alt)
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE, SYS_renameat2 = -100, 2, 316
print("RACING", flush=True)
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    libc.syscall(SYS_renameat2, AT_FDCWD, d.encode(), AT_FDCWD, alt.encode(), RENAME_EXCHANGE)
    n += 1
print(n, flush=True)
"""


def test_hand_over_never_follows_a_directory_swapped_for_a_symlink(hostile):
    """p2: the uid flips state_dir/d between a directory and a symlink to
    the agent's state root while hand_over walks the tree (called directly,
    without the kill before it, so the walk itself is what is tested)."""
    a, _ = _running(hostile)
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    hostile.stop(a)
    root = hostile.settings.state_root
    paths = hostile.paths(a, hostile.get(a).vtpcm_id)
    targets = [root / "associations.sqlite", root / "keys",
               root / "keys" / (hostile.get(a).vtpcm_id + ".keys")]
    assert {os.lstat(p).st_uid for p in targets} == {0}
    racer = subprocess.Popen([CLIENT_PYTHON, "-c", _RACE, str(paths.state_dir), str(root),
                              "8"], user=uid, group=uid, extra_groups=[],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_as = process.RunAs(uid=uid, gid=uid)
    public = hostile.public_ctrl_socket(a)
    calls = refusals = 0
    try:
        assert racer.stdout is not None and racer.stdout.readline() == "RACING\n"
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline and racer.poll() is None:
            calls += 1
            try:
                isolation.hand_over(paths, run_as, public, public.with_suffix(""))
            except exception.SwtpmError as exc:
                assert "changed while handing it over" in exc.message, exc.message
                refusals += 1
            if any(os.lstat(p).st_uid == uid for p in targets):
                break
        swaps = int(racer.communicate(timeout=20)[0].strip())
    finally:
        _stop_child(racer)
    owners = {str(p): os.lstat(p).st_uid for p in targets}
    assert owners == {str(p): 0 for p in targets}, (owners, calls, refusals)
    # positive control: the race ran, and hand_over did give the uid its own files
    assert swaps > 1000 and calls > 10
    assert os.lstat(paths.state_dir / instances.PERMANENT_STATE_FILE).st_uid == uid


def test_a_symlink_in_the_state_dir_is_given_over_as_itself(hostile):
    """lchown, not chown: the link changes owner, its target does not."""
    a, _ = _running(hostile)
    uid = hostile.associations.uid_of(a)
    hostile.stop(a)
    state_dir = hostile.paths(a, hostile.get(a).vtpcm_id).state_dir
    outside = state_dir.parent.parent / "root-only"
    outside.write_bytes(b"agent's")
    os.symlink(outside, state_dir / "planted")
    assert hostile.start(a).pid is not None
    assert os.lstat(state_dir / "planted").st_uid == uid  # control: the walk reached it
    assert os.stat(outside).st_uid == 0


def test_a_symlinked_socket_dir_is_refused(hostile):
    a, _ = _running(hostile)
    hostile.stop(a)
    own = hostile.settings.run_dir / instances.OWN_DIRS / a
    os.rename(own, own.with_name(a + ".moved"))
    os.symlink(own.with_name(a + ".moved"), own)
    with refused(exception.SwtpmError, "swtpm error for vTPCM %s: socket dir %s is a symlink"
                 % (hostile.get(a).vtpcm_id, own)):
        hostile.start(a)
    assert hostile.get(a).state.value == "STOPPED"


_FIND = """
import resource, sys, time
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (600 << 20, 600 << 20))
from vtpcm_agent.swtpm import process
paths = process.SwtpmPaths(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]),
                           Path(sys.argv[4]))
t = time.monotonic()
print(process.find_running(paths), "%.2f" % (time.monotonic() - t))
"""


@pytest.mark.parametrize("plant", ["/dev/zero", "fifo", "root file"])
def test_a_planted_pid_file_neither_blocks_nor_exhausts_the_agent(hostile, plant):
    """p5: the uid points its pid file at /dev/zero or makes it a FIFO, or
    (a file it cannot make) a root-owned file names its pid. The agent
    (here a child capped at 600 MiB and 20 s) reads none of them."""
    a, pid = _running(hostile)
    paths = hostile.paths(a, hostile.get(a).vtpcm_id)
    args = [sys.executable, "-c", _FIND, str(paths.state_dir), str(paths.ctrl_socket),
            str(paths.pid_file), str(paths.log_file)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    # positive control: the real pid file names the running swtpm
    done = subprocess.run(args, capture_output=True, text=True, timeout=20, env=env,
                          check=False)
    assert done.stdout.split()[0] == str(pid), done.stderr
    paths.pid_file.unlink()
    try:
        if plant == "fifo":
            os.mkfifo(paths.pid_file)
        elif plant == "root file":
            paths.pid_file.write_text("%d\n" % pid)
        else:
            os.symlink(plant, paths.pid_file)
        if plant != "root file":
            os.lchown(paths.pid_file, *(hostile.associations.uid_of(a),) * 2)
        done = subprocess.run(args, capture_output=True, text=True, timeout=20, env=env,
                              check=False)
    finally:  # the finalizer (this process, uncapped) must not read it
        paths.pid_file.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-400:]
    found, took = done.stdout.split()
    assert found == "None" and float(took) < 2.0


def test_root_talks_only_to_a_socket_served_by_the_vms_uid(hostile):
    """p7: VM a's uid points its control socket at VM b's. Whatever root
    reaches through a's path must be served by a's uid (SO_PEERCRED), else
    it would export b's state, or INIT b's TPM, as a's."""
    (a, _), (b, _) = _running(hostile), _running(hostile)
    uid_a, uid_b = hostile.associations.uid_of(a), hostile.associations.uid_of(b)
    assert uid_a is not None and uid_b is not None
    pa, pb = (hostile.paths(i, hostile.get(i).vtpcm_id) for i in (a, b))
    assert process.owner(pa) == uid_a
    # control: a's own socket, checked, answers
    assert ctrl.export_state(pa.ctrl_socket, timeout=5, peer_uid=uid_a).permanent
    flip = as_uid(uid_a, "import os; os.rename(%r, %r); os.symlink(%r, %r)" % (
        str(pa.ctrl_socket), str(pa.ctrl_socket) + ".real", str(pb.ctrl_socket),
        str(pa.ctrl_socket)))
    assert flip.communicate(timeout=20)[0] == ""
    # control: unchecked, root reaches b's swtpm through a's path
    assert ctrl.export_state(pa.ctrl_socket, timeout=5).permanent
    pid_b = hostile.get(b).pid
    with refused(exception.CtrlChannelError,
                 "swtpm control channel GET_CONFIG failed: control socket %s is served by "
                 "uid %d (pid %d), not the swtpm's uid %d"
                 % (pa.ctrl_socket, uid_b, pid_b, uid_a)):
        ctrl.export_state(pa.ctrl_socket, timeout=5, peer_uid=uid_a)


# --- one test per guard the review's mutants showed untested (p3) -----------

@pytest.mark.parametrize(("uid", "gid"), [(0, 5), (5, 0), (-1, 5)])
def test_swtpm_never_runs_as_root(uid, gid):
    with refused(exception.InvalidInput, "Invalid input: swtpm must not run as uid or gid 0"):
        process.RunAs(uid=uid, gid=gid)
    assert process.RunAs(uid=5, gid=5).uid == 5  # control


@pytest.mark.parametrize(("uid", "gid"), [(4294967295, 5), (5, 4294967295), (65535, 5)])
def test_swtpm_never_runs_as_uid_minus_one(uid, gid):
    """(uid_t)-1 is "unchanged" to setresuid: the swtpm would stay root
    (review round 2 of isofix, MEDIUM 4, proof q3)."""
    with refused(exception.InvalidInput, "Invalid input: swtpm must not run as uid or gid "
                 "4294967295 or 65535 ((uid_t)-1)"):
        process.RunAs(uid=uid, gid=gid)
    assert process.RunAs(uid=4294967294, gid=65534).uid == 4294967294  # control


_TAIL = """
import resource, sys, time
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (600 << 20, 600 << 20))
from vtpcm_agent.swtpm import process
log = Path(sys.argv[1])
paths = process.SwtpmPaths(log.parent, log.parent / "c", log.parent / "p", log)
t = time.monotonic()
print(repr(process._log_tail(paths)), "%.2f" % (time.monotonic() - t))
"""


@pytest.mark.parametrize("plant", ["sparse", "/dev/zero", "fifo"])
def test_a_huge_or_endless_log_is_read_only_at_its_tail(short_dir, plant):
    """q4: the uid's log, truncated to 64 GiB sparse (or a symlink to
    /dev/zero, or a FIFO), must not be read whole on a start's error path.
    The agent here is a child capped at 600 MiB and 20 s."""
    log = short_dir / "swtpm.log"
    args = [sys.executable, "-c", _TAIL, str(log)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    log.write_bytes(b"x" * 5000 + b" the last words")
    done = subprocess.run(args, capture_output=True, text=True, timeout=20, env=env,
                          check=False)
    assert done.stdout.startswith("'" + "x" * 585 + " the last words'"), done.stderr  # control
    log.unlink()
    if plant == "sparse":
        with open(log, "wb") as f:
            f.truncate(64 << 30)
            f.seek((64 << 30) - 10)
            f.write(b"tail words")
    elif plant == "fifo":
        os.mkfifo(log)
    else:
        os.symlink(plant, log)
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=20, env=env,
                              check=False)
    finally:
        log.unlink()
    assert done.returncode == 0, done.stderr[-400:]
    text, took = done.stdout.rsplit(" ", 1)
    assert float(took) < 2.0
    assert text == {"sparse": "'" + "\\x00" * 590 + "tail words'",
                    "fifo": "'(swtpm log is not a regular file)'",
                    "/dev/zero": "'(swtpm log unreadable: Too many levels of symbolic links)'"
                    }[plant]


def test_a_log_file_swapped_for_a_symlink_is_refused(hostile):
    a, _ = _running(hostile)
    hostile.stop(a)
    paths = hostile.paths(a, hostile.get(a).vtpcm_id)
    outside = paths.log_file.parent.parent / "root-only"
    outside.write_bytes(b"agent's")
    paths.log_file.unlink()
    os.symlink(outside, paths.log_file)
    with refused(exception.SwtpmError, "swtpm error for vTPCM %s: log file %s is not a "
                 "regular file of its own (Too many levels of symbolic links)"
                 % (paths.state_dir.name, paths.log_file)):
        hostile.start(a)
    assert os.stat(outside).st_uid == 0
    paths.log_file.unlink()
    assert hostile.start(a).pid is not None  # control: a plain log file is fine


def test_give_sockets_refuses_a_symlink_in_a_sockets_place(hostile):
    a, _ = _running(hostile)
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    paths = hostile.paths(a, hostile.get(a).vtpcm_id)
    process._give_sockets(paths, uid, uid)  # control: the real sockets pass
    outside = paths.state_dir.parent.parent / "root-only"
    outside.write_bytes(b"agent's")
    assert paths.data_socket is not None
    os.rename(paths.data_socket, str(paths.data_socket) + ".real")
    os.symlink(outside, paths.data_socket)
    with refused(exception.SwtpmError, "swtpm error for vTPCM %s: %s is not a socket"
                 % (paths.state_dir.name, paths.data_socket)):
        process._give_sockets(paths, uid, uid)
    assert os.stat(outside).st_uid == 0 and os.lstat(paths.data_socket).st_uid == 0


def test_remove_leaves_what_a_symlinked_socket_dir_points_at(short_dir):
    kept = short_dir / "agent-dir"
    kept.mkdir()
    (kept / "file").write_text("agent's")
    own, public = short_dir / "own", short_dir / "x.ctrl"
    os.symlink(kept, own)
    os.symlink(own / "tpm.ctrl", public)
    isolation.remove(own, (public,))
    assert (kept / "file").read_text() == "agent's"
    assert not public.is_symlink()
    real = short_dir / "own2"
    real.mkdir()
    (real / "tpm.ctrl").write_text("")
    isolation.remove(real, ())
    assert not real.exists()  # control: a real socket dir goes


def test_link_refuses_a_public_path_another_process_serves(short_dir):
    public = short_dir / "x.ctrl"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(public))
        server.listen(1)
        with refused(exception.SwtpmError, "swtpm error for vTPCM own: another process "
                     "serves %s; not linking it to %s" % (public, short_dir / "own" / "t")):
            isolation.link(public, short_dir / "own" / "t")
        assert not public.is_symlink()
    finally:
        server.close()
    isolation.link(public, short_dir / "own" / "t")  # control: a dead socket is replaced
    assert os.readlink(public) == str(short_dir / "own" / "t")


_CHAIN = """
import os
for top in %r:
    d = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=d)
        n = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=d)
        os.close(d)
        d = n
    os.close(d)
"""


def test_a_deep_directory_chain_neither_blocks_start_nor_keeps_the_uid(hostile):
    """q2: the uid leaves a 3000-deep chain of directories in its state dir,
    its socket dir and /tmp. A recursive walk died with RecursionError, so
    hand-over, destroy and the uid's release never completed."""
    a, _ = _running(hostile)
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    hostile.stop(a)
    paths = hostile.paths(a, hostile.get(a).vtpcm_id)
    own = hostile.settings.run_dir / instances.OWN_DIRS / a
    tmp = Path("/tmp") / ("vtpcm-test-deep-%s" % a)  # noqa: S108
    try:
        build = as_uid(uid, "import os; os.mkdir(%r); os.mkdir(%r)\n%s" % (
            str(tmp), str(paths.state_dir / "x"),
            _CHAIN % ([str(paths.state_dir / "x"), str(own), str(tmp)],)))
        assert build.communicate(timeout=120)[0] == ""
        deep = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)  # control: the chain is there
        try:
            for _ in range(3000):
                n = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=deep)
                os.close(deep)
                deep = n
            assert os.fstat(deep).st_uid == uid
        finally:
            os.close(deep)

        assert hostile.start(a).pid is not None  # hand-over walked the chain
        hostile.destroy(a)

        assert hostile.associations.uid_of(a) is None
        assert not paths.state_dir.exists() and not own.exists() and not tmp.exists()
    finally:
        if tmp.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)], check=True,
                           timeout=120)


def test_destroy_leaves_nothing_of_the_uid_for_its_next_holder(hostile):
    """The low leftovers of the uid review: the per-VM swtpm log (owned by
    the uid), a lock file in /run/lock and (where mounted) a POSIX message
    queue in /dev/mqueue outlived destroy, so the next VM given the uid
    could read or keep them. On the old code: the log and the lock file
    were still there."""
    a, _ = _running(hostile)
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    paths = hostile.paths(a, hostile.get(a).vtpcm_id)
    assert paths.log_file.stat().st_uid == uid  # positive control: the uid's log
    lock = Path("/run/lock") / ("vtpcm-test-%s" % a)
    queue = Path("/dev/mqueue") / ("vtpcm-test-%s" % a)
    planted = as_uid(uid, "open(%r, 'w').write('left for the next holder')" % str(lock))
    try:
        assert planted.communicate(timeout=20)[0] == ""
        assert lock.stat().st_uid == uid
        if queue.parent.is_dir():  # an mqueue mount: a queue of the uid there too
            mq = as_uid(uid, "open(%r, 'w').close()" % str(queue))
            assert mq.communicate(timeout=20)[0] == ""
            assert queue.stat().st_uid == uid
        hostile.destroy(a)
        assert not lock.exists()
        assert not queue.exists()
        assert not paths.log_file.exists()
    finally:
        lock.unlink(missing_ok=True)
        queue.unlink(missing_ok=True)


def test_the_socket_check_never_follows_a_link_the_uid_planted(hostile, short_dir):
    """``socket_in_use`` connected as root to whatever the path resolved
    to: a swtpm uid that replaced its control socket by a symlink made the
    agent connect to any socket on the host (and refuse to start the VM's
    swtpm, "another process serves"). Now it is checked with lstat through
    an O_PATH fd and the server is named (SO_PEERCRED). On the old code:
    the link counted as in use."""
    elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    target = short_dir / "root.sock"
    elsewhere.bind(str(target))
    elsewhere.listen(4)
    try:
        link = short_dir / "tpm.ctrl"
        os.symlink(target, link)
        assert process.socket_server(target) == (os.getpid(), os.getuid())  # control
        assert not process.socket_in_use(link)
        assert process.socket_server(link) is None
    finally:
        elsewhere.close()
    assert not process.socket_in_use(target)  # nobody listens any more


def _attach(shm_id: int) -> tuple[ctypes.CDLL, int]:
    """This process (root: standing for any other user) attaches a segment."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    libc.shmdt.argtypes = (ctypes.c_void_p,)
    addr = libc.shmat(shm_id, None, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    return libc, addr


def test_destroy_finishes_and_keeps_aside_a_uid_a_leftover_of_which_remains(hostile, caplog):
    """Review of the sweep, MEDIUM 2 and 3: a leftover the sweep cannot
    remove (a segment of the uid another process keeps attached, a file
    made immutable) made destroy fail for good: keys and state shredded,
    the record left STOPPED (so never swept again), Nova's instance in
    ERROR. Now destroy finishes (DESTROYED), the uid is kept aside (never
    the instance's nor anyone's again), a WARNING names what remains, and
    the agent's start and its periodic sweep free it once nothing is left."""
    a, _ = _running(hostile)
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    vtpcm = hostile.get(a).vtpcm_id
    paths = hostile.paths(a, vtpcm)
    x11 = Path("/tmp") / ("vtpcm-test-x11-%s" % a)  # noqa: S108  a root-owned .X11-unix
    x11.mkdir()
    os.chmod(x11, 0o1777)  # noqa: S103
    shm_id, libc, addr = None, None, None
    try:
        made = as_uid(uid, """
            import ctypes, socket
            s = socket.socket(socket.AF_UNIX); s.bind(%r)
            open(%r, "w").close()
            print(ctypes.CDLL(None).shmget(0, 4096, 0o1666))
            """ % (str(x11 / "X9"), str(x11 / "stuck")))
        shm_id = int(made.communicate(timeout=20)[0])
        assert shm_id >= 0 and (x11 / "X9").lstat().st_uid == uid  # control: made
        libc, addr = _attach(shm_id)
        subprocess.run(["chattr", "+i", str(x11 / "stuck")], check=True, timeout=20)

        assert hostile.destroy(a).state.value == "DESTROYED"

        assert hostile.associations.uid_of(a) is None
        assert hostile.associations.kept_uids() == [(a, uid)]
        assert not hostile.keystore.exists(vtpcm) and not paths.state_dir.exists()
        assert not (x11 / "X9").exists()  # the rest went
        kept = [r.getMessage() for r in caplog.records if "aside" in r.getMessage()]
        assert len(kept) == 1 and ("(1: %s (" % (x11 / "stuck")) in kept[0] \
            and ("(1: SysV shared memory id %d" % shm_id) in kept[0], kept
        b, _pid = _running(hostile)  # the next VM never gets the kept uid
        assert hostile.associations.uid_of(b) not in (None, uid)
        hostile.recover()  # the agent's start: swept again, still kept
        assert hostile.associations.kept_uids() == [(a, uid)]

        subprocess.run(["chattr", "-i", str(x11 / "stuck")], check=True, timeout=20)
        assert libc.shmdt(ctypes.c_void_p(addr)) == 0
        libc = None
        assert hostile.sweep_kept() == 0  # the watchdog's periodic call
        assert hostile.associations.kept_uids() == []
        assert not (x11 / "stuck").exists() and x11.is_dir()
        c, _pid = _running(hostile)  # freed, and still never given out again
        assert hostile.associations.uid_of(c) not in (None, uid)
    finally:
        if libc is not None:
            libc.shmdt(ctypes.c_void_p(addr))
        subprocess.run(["chattr", "-i", str(x11 / "stuck")], capture_output=True, timeout=20)
        subprocess.run(["rm", "-rf", "--one-file-system", str(x11)], check=True, timeout=20)
        if shm_id is not None:
            subprocess.run(["ipcrm", "-m", str(shm_id)], capture_output=True, timeout=20)


LOCAL = 1900000241  # a local user, not a swtpm (outside UIDS)


def test_a_local_user_cannot_make_a_vtpcm_undeletable(hostile):
    """Review of the sweep, MEDIUM 2 (p3/p5): any local user gave a segment
    to a VM's swtpm uid (IPC_SET) and kept it attached: destroy failed for
    as long as they liked. Now it goes back to its creator and destroy
    frees the uid."""
    a, _ = _running(hostile)
    uid = hostile.associations.uid_of(a)
    gift = subprocess.Popen(["setpriv", "--reuid=%d" % LOCAL, "--regid=%d" % LOCAL,
                             "--clear-groups", CLIENT_PYTHON, "-c", textwrap.dedent("""
        import ctypes, ctypes.util, sys
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.shmat.restype = ctypes.c_void_p
        ident = libc.shmget(0, 4096, 0o1666)
        buf = ctypes.create_string_buffer(512)
        assert libc.shmctl(ident, 2, buf) == 0
        ctypes.c_uint.from_buffer(buf, 4).value = int(sys.argv[1])
        assert libc.shmctl(ident, 1, buf) == 0, ctypes.get_errno()
        assert libc.shmat(ident, None, 0) not in (None, ctypes.c_void_p(-1).value)
        print(ident, flush=True)
        sys.stdin.readline()
        """), str(uid)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert gift.stdout is not None
        shm = int(gift.stdout.readline())
        assert [(o.owner, o.creator) for o in uidprocs.sysvipc.objects_of(uid)
                if o.ident == shm] == [(uid, LOCAL)]  # control: given to the uid
        assert hostile.destroy(a).state.value == "DESTROYED"
        assert hostile.associations.uid_of(a) is None
        assert hostile.associations.kept_uids() == []  # nothing of the uid was left
        assert [(o.owner, o.attached) for o in uidprocs.sysvipc.objects_of(LOCAL)
                if o.ident == shm] == [(LOCAL, 1)]
    finally:
        gift.communicate("x\n", timeout=20)


def test_a_uid_regained_through_a_held_setuid_file_never_reaches_the_next_vm(hostile):
    """Review of the sweep, HIGH 1 (p1/p6): the uid (an exploited swtpm:
    open, write, fchmod) leaves a setuid copy of cat in /tmp, a local user
    holds it open across the sweep and execs it later through
    /proc/self/fd: euid the uid, which the next VM was given (a freed uid
    came back once the never-used ones were taken), so it read that VM's
    0600 state. Now a used uid is never given out again (a used-up range
    says to widen it) and the sweep clears the file's setuid and exec bits
    before the unlink."""
    hostile.settings = dataclasses.replace(hostile.settings, swtpm_uids=(UIDS[0], UIDS[0] + 1))
    a, _ = _running(hostile)
    _c, _ = _running(hostile)  # the range's other uid is taken
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    planted = Path("/tmp") / ("vtpcm-test-setuid-%s" % a)  # noqa: S108
    made = as_uid(uid, """
        import os
        data = open("/usr/bin/cat", "rb").read()
        fd = os.open(%r, os.O_WRONLY | os.O_CREAT, 0o755); os.write(fd, data)
        os.fchmod(fd, 0o4755); os.close(fd)
        """ % str(planted))
    holder = None
    try:
        assert made.communicate(timeout=20)[0] == ""
        assert planted.stat().st_mode & 0o7777 == 0o4755  # control: setuid, the uid's
        holder = subprocess.Popen(
            ["setpriv", "--reuid=%d" % LOCAL, "--regid=%d" % LOCAL, "--clear-groups",
             CLIENT_PYTHON, "-c", "import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "print('held', flush=True)\nwhat = sys.stdin.readline().strip()\n"
             "os.execv('/proc/self/fd/%d' % fd, ['cat', what])", str(planted)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        hostile.destroy(a)
        assert not planted.exists()

        with refused(exception.InvalidInput, "Invalid input: [agent] swtpm_uid_range %d-%d is "
                     "used up: each of its 2 uids ran a vTPCM once and is never given out "
                     "again; widen the range (raise LAST, or give uids above it)"
                     % (UIDS[0], UIDS[0] + 1)):
            _running(hostile)
        hostile.settings = dataclasses.replace(hostile.settings,
                                               swtpm_uids=(UIDS[0], UIDS[0] + 2))
        b, _ = _running(hostile)
        uid_b = hostile.associations.uid_of(b)
        assert uid_b not in (None, uid)
        state = hostile.paths(b, hostile.get(b).vtpcm_id).state_dir / "tpm2-00.permall"
        assert state.stat().st_uid == uid_b
        out, err = holder.communicate(str(state) + "\n", timeout=20)
        assert holder.returncode != 0 and out == "", (holder.returncode, len(out), err)
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(timeout=10)
        planted.unlink(missing_ok=True)


def test_an_abstract_socket_of_the_uid_dies_with_its_process_at_destroy(hostile):
    """An abstract socket is in no file system; a process of the uid that
    holds one is killed before the uid is freed, and the name with it."""
    a, _ = _running(hostile)
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    name = "vtpcm-test-abstract-%s" % a
    holder = as_uid(uid, """
        import socket, time
        s = socket.socket(socket.AF_UNIX); s.bind("\\0" + %r); s.listen(1)
        print("up", flush=True); time.sleep(120)
        """ % name)
    probe = socket.socket(socket.AF_UNIX)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        assert any(("@%s" % name) in held for held in uidprocs.abstract_sockets([holder.pid]))
        hostile.destroy(a)
        assert holder.wait(timeout=10) == -9
        assert hostile.associations.uid_of(a) is None
        probe.bind("\0" + name)  # free again
    finally:
        probe.close()
        _stop_child(holder)


def test_the_agents_start_sweeps_and_frees_a_uid_kept_without_a_vtpcm(hostile):
    """A uid recorded for an instance with no vTPCM here (a discard that
    could not sweep it, or an agent that died between forgetting the record
    and freeing the uid) was never freed before: only a destroy freed uids,
    and there was nothing left to destroy. ``recover`` sweeps it again and
    frees it once nothing of it remains."""
    gone = "00000000-0000-4000-8000-00000000d15c"
    uid = hostile.associations.assign_uid(gone, *UIDS)
    lock = Path("/run/lock") / ("vtpcm-test-%s" % gone)
    planted = as_uid(uid, "open(%r, 'w').close()" % str(lock))
    try:
        assert planted.communicate(timeout=20)[0] == ""
        subprocess.run(["chattr", "+i", str(lock)], check=True, timeout=20)
        assert hostile.associations.kept_uids() == [(gone, uid)]
        hostile.recover()
        assert hostile.associations.uid_of(gone) == uid  # something remains: kept
        subprocess.run(["chattr", "-i", str(lock)], check=True, timeout=20)
        hostile.recover()
        assert hostile.associations.uid_of(gone) is None
        assert hostile.associations.kept_uids() == []
        assert not lock.exists()
    finally:
        subprocess.run(["chattr", "-i", str(lock)], capture_output=True, timeout=20)
        lock.unlink(missing_ok=True)


_RESPAWN = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
print("held", flush=True)
while True:
    if os.fork() == 0:
        try:
            os.dup2(os.open("/dev/null", os.O_WRONLY), 1)  # the test's pipe ends with us
            os.execv("/proc/self/fd/%d" % fd, ["sleep", "30"])
        finally:
            os._exit(1)
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass
    time.sleep(0.002)
"""


def _respawner(hostile, a: str, tmp: Path):
    """Review round 2 of the sweep, MEDIUM 1 (p2_respawn): the exploited
    swtpm leaves a setuid copy of sleep (here in a root-owned directory the
    sweep never enters); a local user holds it open and re-execs it in a
    loop, faster than kill_all kills: processes of the uid never end."""
    uid = hostile.associations.uid_of(a)
    assert uid is not None
    os.chown(tmp, uid, uid)
    planted = tmp / "suid_sleep"
    made = as_uid(uid, """
        import os
        data = open("/usr/bin/sleep", "rb").read()
        fd = os.open(%r, os.O_WRONLY | os.O_CREAT, 0o755); os.write(fd, data)
        os.fchmod(fd, 0o4755); os.close(fd)
        """ % str(planted))
    assert made.communicate(timeout=20)[0] == ""
    os.chown(tmp, 0, 0)
    os.chmod(tmp, 0o755)  # noqa: S103  root's, entered by no sweep
    spawner = subprocess.Popen(
        ["setpriv", "--reuid=%d" % LOCAL, "--regid=%d" % LOCAL, "--clear-groups",
         CLIENT_PYTHON, "-c", _RESPAWN, str(planted)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert spawner.stdout is not None and spawner.stdout.readline() == "held\n"
    deadline = time.monotonic() + 10
    while len(uidprocs.pids_of(uid)) < 3:  # control: processes of the uid keep coming
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return uid, planted, spawner


@pytest.fixture
def root_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vtpcm-respawn-", dir="/tmp"))  # noqa: S108
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, timeout=20)


def test_a_setuid_file_of_the_uid_reexeced_by_another_user_is_defused(hostile, root_dir):
    a, pid = _running(hostile)
    vtpcm = hostile.get(a).vtpcm_id
    uid, planted, spawner = _respawner(hostile, a, root_dir)
    try:
        assert hostile.destroy(a).state.value == "DESTROYED"
        assert _gone(pid)
        assert not hostile.keystore.exists(vtpcm)
        assert not hostile.paths(a, vtpcm).state_dir.exists()
        assert planted.stat().st_mode & 0o7777 == 0o644  # defused where it lay
        assert uidprocs.pids_of(uid) == []
        assert hostile.associations.kept_uids() == []
    finally:
        _stop_child(spawner)


def test_processes_of_the_uid_that_survive_never_keep_the_keys(hostile, root_dir,
                                                               monkeypatch):
    """The same, with the defusing out of reach (stubbed): the swtpm is gone,
    so keys and state are shredded anyway and the uid is kept aside."""
    monkeypatch.setattr(uidprocs, "defuse", lambda uid, dirs, deadline=None: 0)
    a, pid = _running(hostile)
    vtpcm = hostile.get(a).vtpcm_id
    uid, _planted, spawner = _respawner(hostile, a, root_dir)
    try:
        assert hostile.destroy(a).state.value == "DESTROYED"
        assert _gone(pid)
        assert not hostile.keystore.exists(vtpcm)
        assert not hostile.paths(a, vtpcm).state_dir.exists()
        assert hostile.associations.uid_of(a) is None
        assert (a, uid) in hostile.associations.kept_uids()
    finally:
        _stop_child(spawner)
        uidprocs.kill_all(uid, timeout=5.0)


# Review round 3 of the sweep, MEDIUM 1 (p1_fake_swtpm): a survivor of the
# uid that poses as the swtpm in its own directories (pid file, control
# socket, swtpm-like argv), up after the last kill round
_FAKE_SWTPM = """
import os, socket, sys
ctrl, pidf, state, py = sys.argv[1:5]
try:
    os.unlink(ctrl)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX); s.bind(ctrl); s.listen(1)
os.set_inheritable(s.fileno(), True)
open(pidf, "w").write(str(os.getpid()))
print("up", flush=True)
os.execv(py, ["swtpm", "-c", "import time; time.sleep(60)", "socket",
              "dir=%s," % state, "type=unixio,path=%s," % ctrl])
"""

# MEDIUM 2 (p2_survivor_fills_state): a survivor that keeps adding files and
# directories to its state dir, so that an emptied directory never stays empty
_FILLER = """
import os, sys
d = sys.argv[1]
print("up", flush=True)
n = 0
while True:
    n += 1
    for made in (lambda p: open(p, "w").close(), os.mkdir):
        try:
            made(os.path.join(d, "f%d" % n if made is os.mkdir else "g%d" % n))
        except OSError:
            pass
"""


def _survivor_after_kill_all(monkeypatch, make):
    """kill_all kills for real, then a process of the uid (``make(uid)``)
    comes up after its last round, and it reports the survivor (as a
    respawner out of the defuse's reach makes it, ``_respawner``)."""
    real = uidprocs.kill_all
    started: list[subprocess.Popen[str]] = []

    def survived(uid, timeout=5.0, own_dirs=()):
        real(uid, timeout, own_dirs)
        proc = make(uid)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"
        time.sleep(0.2)
        raise exception.SwtpmError(vtpcm_id="uid %d" % uid,
                                   reason="processes of swtpm uid %d survive SIGKILL" % uid)

    monkeypatch.setattr(uidprocs, "kill_all", survived)
    return real, started


def test_a_survivor_posing_as_the_swtpm_never_keeps_the_keys(hostile, monkeypatch):
    a, pid = _running(hostile)
    vtpcm = hostile.get(a).vtpcm_id
    uid = hostile.associations.uid_of(a)
    paths = hostile.paths(a, vtpcm)
    real, started = _survivor_after_kill_all(monkeypatch, lambda u: subprocess.Popen(
        [CLIENT_PYTHON, "-c", _FAKE_SWTPM, str(paths.ctrl_socket), str(paths.pid_file),
         str(paths.state_dir), CLIENT_PYTHON],
        user=u, group=u, extra_groups=[], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
    try:
        assert hostile.destroy(a).state.value == "DESTROYED"
        assert _gone(pid)
        # the fake ran through the shred: only the kill_all of the uid's
        # release (after the state went) killed it, and then came again
        assert len(started) == 2 and started[0].wait(10) == -9
        assert started[1].poll() is None
        assert not hostile.keystore.exists(vtpcm)
        assert not paths.state_dir.exists()
        assert hostile.associations.uid_of(a) is None
        assert (a, uid) in hostile.associations.kept_uids()
    finally:
        monkeypatch.setattr(uidprocs, "kill_all", real)
        for proc in started:
            _stop_child(proc)


def test_a_survivor_refilling_the_state_dir_never_keeps_it(hostile, monkeypatch):
    a, pid = _running(hostile)
    vtpcm = hostile.get(a).vtpcm_id
    uid = hostile.associations.uid_of(a)
    paths = hostile.paths(a, vtpcm)
    fillers: list[subprocess.Popen[str]] = []

    def filler(u: int) -> subprocess.Popen[str]:
        # two writers: each fills the state dir while it is emptied
        for _ in range(2):
            proc = as_uid(u, _FILLER.replace("sys.argv[1]", repr(str(paths.state_dir))))
            fillers.append(proc)
        return fillers[-2]

    real, started = _survivor_after_kill_all(monkeypatch, filler)
    try:
        assert hostile.destroy(a).state.value == "DESTROYED"
        # they filled all through the state's removal; the kill_all of the
        # uid's release (after it) killed them, and two more came
        assert len(fillers) == 4 and [p.wait(10) for p in fillers[:2]] == [-9, -9]
        assert all(proc.poll() is None for proc in fillers[2:])
        assert not hostile.keystore.exists(vtpcm)
        assert not paths.state_dir.exists()
        assert (a, uid) in hostile.associations.kept_uids()
    finally:
        monkeypatch.setattr(uidprocs, "kill_all", real)
        for proc in fillers:
            _stop_child(proc)
