"""Per-VM privilege separation of swtpm (issue 9 point 5), with REAL swtpm.

An InstanceManager in this process (real swtpm_setup, swtpm 0.7.1, SQLite
association list, dev host key) runs with ``swtpm_uids``: each vTPCM's swtpm
must run as a uid of its own, confined by seccomp, with sockets and state
that no other VM's uid can open. The clients are real processes started
with another uid and gid (as a QEMU with a per-domain DAC label would run).
Positive controls: the VM's own uid and its own group connect.
Every swtpm started here is stopped by pid in the finalizer.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.agent.conftest import _kill_hard
from tests.refusal import refused
from vtpcm_agent import association, instances
from vtpcm_agent.keystore import DevKeyFileHostKey, KeyStore
from vtpcm_agent.swtpm import process
from vtpcm_common import exception

pytestmark = pytest.mark.functional

FIRST_UID = 64200  # reserved for these tests: no account on the test machines uses it
UIDS = (FIRST_UID, FIRST_UID + 9)
# the clients run as other uids: the system python (the venv's lives under
# /root), which only needs the standard library
CLIENT_PYTHON = "/usr/bin/python3"

_OPEN = """
import errno, socket, sys
path, what = sys.argv[1], sys.argv[2]
try:
    if what == "connect":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.close()
    else:
        open(path, "rb").close()
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("OK")
"""


def open_as(uid: int, gid: int, path: Path, what: str = "connect") -> str:
    """Connect to (or read) ``path`` from a process of ``uid``:``gid``
    without other groups: "OK" or the errno name."""
    done = subprocess.run([CLIENT_PYTHON, "-c", _OPEN, str(path), what], user=uid,
                          group=gid, extra_groups=[], capture_output=True, text=True,
                          timeout=20, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def status_of(pid: int) -> dict[str, str]:
    with open("/proc/%d/status" % pid, encoding="ascii") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


QEMU_UIDS = (FIRST_UID + 100, FIRST_UID + 109)  # [agent] qemu_uid_range beside UIDS


def _manager(base: Path, uids: tuple[int, int] | None,
             qemu_uids: tuple[int, int] | None = None) -> instances.InstanceManager:
    settings = instances.AgentSettings(
        host="iso-host", state_root=base / "state", run_dir=base / "run",
        create_ek=False, expose_data_socket=True, swtpm_uids=uids, qemu_uids=qemu_uids)
    settings.state_root.mkdir()
    assoc = association.AssociationList(settings.state_root / "associations.sqlite")
    keys = KeyStore(settings.state_root / "keys", DevKeyFileHostKey(base / "hostkey"))
    return instances.InstanceManager(settings, assoc, keys)


@pytest.fixture
def base(short_dir: Path) -> Path:
    # the per-VM uids (and their clients) must traverse to their own files
    os.chmod(short_dir, 0o711)  # noqa: S103
    return short_dir


@pytest.fixture
def isolated(base: Path) -> Iterator[instances.InstanceManager]:
    yield from _stopping(_manager(base, UIDS))


@pytest.fixture
def with_qemu_uids(base: Path) -> Iterator[instances.InstanceManager]:
    yield from _stopping(_manager(base, UIDS, QEMU_UIDS))


def _stopping(manager: instances.InstanceManager) -> Iterator[instances.InstanceManager]:
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
        manager.associations.close()


def _running(manager: instances.InstanceManager) -> tuple[str, int]:
    instance = str(uuid.uuid4())
    manager.create(instance)
    assoc = manager.start(instance)
    assert assoc.pid is not None
    return instance, assoc.pid


def test_each_swtpm_runs_as_its_own_uid_confined_by_seccomp(isolated):
    (a, pid_a), (b, pid_b) = _running(isolated), _running(isolated)
    uid_a, uid_b = isolated.associations.uid_of(a), isolated.associations.uid_of(b)
    assert {uid_a, uid_b} == {FIRST_UID, FIRST_UID + 1}
    for pid, uid in ((pid_a, uid_a), (pid_b, uid_b)):
        status = status_of(pid)
        assert status["Uid"].split() == [str(uid)] * 4
        assert status["Gid"].split() == [str(uid)] * 4
        assert status["Groups"].strip() == ""
        assert status["CapEff"] == "0000000000000000"
        assert status["Seccomp"] == "2"  # filter mode, --seccomp action=kill
        assert status["NoNewPrivs"] == "1"


def test_one_vms_uid_cannot_open_another_vms_sockets_or_state(isolated):
    (a, _), (b, _) = _running(isolated), _running(isolated)
    uid_a, uid_b = isolated.associations.uid_of(a), isolated.associations.uid_of(b)
    assert uid_a is not None and uid_b is not None
    run = isolated.settings.run_dir
    ctrl_a, data_a = run / (a + ".ctrl"), run / a  # the public paths QEMU is given
    assert ctrl_a == Path(isolated.get(a).ctrl_socket)
    # VM b's swtpm uid, and a QEMU running with VM b's group, get EACCES
    for who in ((uid_b, uid_b), (uid_b, uid_a + 100000)):
        assert open_as(*who, ctrl_a) == "EACCES"
        assert open_as(*who, data_a) == "EACCES"
    # and cannot read a's state, log or anything under the agent's keys
    state_a = isolated.paths(a, isolated.get(a).vtpcm_id)
    assert open_as(uid_b, uid_b, state_a.state_dir / instances.PERMANENT_STATE_FILE,
                   "read") == "EACCES"
    assert open_as(uid_b, uid_b, state_a.log_file, "read") == "EACCES"
    assert open_as(uid_a, uid_a, isolated.settings.state_root / "keys" /
                   (isolated.get(a).vtpcm_id + ".keys"), "read") == "EACCES"
    for name in ("associations.sqlite", "associations.sqlite-wal"):
        assert open_as(uid_a, uid_a, isolated.settings.state_root / name, "read") == "EACCES"
    # positive controls: a QEMU in VM a's own group (another uid) connects,
    # and so does a's own uid; VM b's own sockets serve its group
    assert open_as(uid_a + 100000, uid_a, ctrl_a) == "OK"
    assert open_as(uid_a + 100000, uid_a, data_a) == "OK"
    assert open_as(uid_a, uid_a, ctrl_a) == "OK"
    assert open_as(uid_b + 100000, uid_b, run / (b + ".ctrl")) == "OK"


def test_a_restarted_vtpcm_keeps_its_uid_across_agent_restarts(base, isolated):
    a, pid = _running(isolated)
    uid = isolated.associations.uid_of(a)
    isolated.stop(a)
    assert not process.is_alive(pid, isolated.paths(a, isolated.get(a).vtpcm_id))
    _running(isolated)  # another instance takes the next uid meanwhile
    again = isolated.start(a)
    assert again.pid is not None and status_of(again.pid)["Uid"].split()[0] == str(uid)
    isolated.stop(a)
    isolated.associations.close()
    # a new agent process on the same association list
    isolated.associations = association.AssociationList(
        isolated.settings.state_root / "associations.sqlite")
    third = isolated.start(a)
    assert third.pid is not None and status_of(third.pid)["Uid"].split()[0] == str(uid)


def test_destroy_frees_the_uid_and_removes_the_socket_dir(isolated):
    a, _ = _running(isolated)
    uid = isolated.associations.uid_of(a)
    run = isolated.settings.run_dir
    isolated.destroy(a)
    assert isolated.associations.uid_of(a) is None
    assert not (run / instances.OWN_DIRS / a).exists()
    assert not (run / (a + ".ctrl")).is_symlink() and not (run / a).is_symlink()
    b, _ = _running(isolated)
    assert isolated.associations.uid_of(b) == uid + 1  # a freed uid is given out last


def test_without_a_uid_range_swtpm_runs_as_the_agent(base):
    """The default keeps releases before unchanged (the lab's agents)."""
    manager = _manager(base, None)
    instance = str(uuid.uuid4())
    manager.create(instance)
    assoc = manager.start(instance)
    paths = manager.paths(instance, assoc.vtpcm_id)
    try:
        assert assoc.pid is not None
        assert status_of(assoc.pid)["Uid"].split()[0] == str(os.getuid())
        assert status_of(assoc.pid)["Seccomp"] == "2"
        assert paths.ctrl_socket == manager.settings.run_dir / (instance + ".ctrl")
        assert manager.associations.uid_of(instance) is None
    finally:
        if assoc.pid is not None:
            try:
                process.stop(assoc.pid, paths, timeout=6.0)
            finally:
                _kill_hard(assoc.pid, paths)
        manager.associations.close()


def test_a_connect_refusal_is_eacces_not_a_missing_file(isolated):
    """Guards the test above: EACCES, not ENOENT from a wrong path."""
    a, _ = _running(isolated)
    other = isolated.associations.uid_of(a)
    assert other is not None
    assert open_as(other + 1, other + 1, isolated.settings.run_dir / "nope.ctrl") \
        == errno.errorcode[errno.ENOENT]


def test_a_state_root_the_swtpm_uid_cannot_reach_is_named(short_dir):
    """Bad configuration gets a clear error, not swtpm's silent exit 1."""
    os.chmod(short_dir, 0o700)  # as mkdtemp makes it: no way through for others
    manager = _manager(short_dir, UIDS)
    instance = str(uuid.uuid4())
    try:
        manager.create(instance)
        with refused(exception.SwtpmError,
                     "swtpm error for vTPCM %s: swtpm uid %d cannot reach %s: directory "
                     "%s is mode 0700 (it needs o+x)" % (
                         manager.get(instance).vtpcm_id, FIRST_UID,
                         manager.paths(instance, manager.get(instance).vtpcm_id).state_dir,
                         short_dir)):
            manager.start(instance)
        assert manager.get(instance).state.value == "STOPPED"
        assert manager.get(instance).pid is None
    finally:
        manager.associations.close()


def test_a_hard_link_in_the_state_dir_is_not_handed_over(isolated):
    """Positive control first: the same start passes without the link."""
    a, _ = _running(isolated)
    isolated.stop(a)
    state_dir = isolated.paths(a, isolated.get(a).vtpcm_id).state_dir
    outside = state_dir.parent.parent / "root-only"
    outside.write_bytes(b"agent's")
    os.chmod(outside, 0o600)
    os.link(outside, state_dir / "planted")
    with refused(exception.SwtpmError,
                 "swtpm error for vTPCM %s: %s has 2 hard links; not handing it over"
                 % (state_dir.name, state_dir / "planted")):
        isolated.start(a)
    assert os.stat(outside).st_uid == 0
    os.unlink(state_dir / "planted")
    assert isolated.start(a).pid is not None


def test_each_vm_gets_a_qemu_uid_of_its_own_beside_its_swtpm_uid(with_qemu_uids):
    """[agent] qemu_uid_range: Q = first + (U - first swtpm uid), never U."""
    a, _ = _running(with_qemu_uids)
    b, _ = _running(with_qemu_uids)
    ua, ub = (with_qemu_uids.associations.uid_of(i) for i in (a, b))
    assert with_qemu_uids.vm_ids(a) == (QEMU_UIDS[0] + ua - UIDS[0], ua)
    assert with_qemu_uids.vm_ids(b) == (QEMU_UIDS[0] + ub - UIDS[0], ub)
    assert ua != ub
    # the label's ids reach the VM's own socket, not the other VM's
    qa, ga = with_qemu_uids.vm_ids(a)  # type: ignore[misc]
    run = with_qemu_uids.settings.run_dir
    assert open_as(qa, ga, run / (a + ".ctrl")) == "OK"
    assert open_as(qa, ga, run / (b + ".ctrl")) == "EACCES"


def test_without_a_qemu_uid_range_no_ids_are_reported(isolated):
    a, _ = _running(isolated)
    assert isolated.vm_ids(a) is None


def test_destroy_kills_the_qemu_uid_and_sweeps_its_files_before_freeing(with_qemu_uids,
                                                                        held_fd_scans):
    """A process left by the VM's QEMU uid (an escaped QEMU that hid) must
    not meet the next VM given the same pair of uids. Both uids are swept
    with one held-fd scan (final read: there were two, one per uid)."""
    a, _ = _running(with_qemu_uids)
    qemu, gid = with_qemu_uids.vm_ids(a)  # type: ignore[misc]
    left = Path("/tmp/vtpcm-test-qemu-leftover-%d" % qemu)  # noqa: S108
    hidden = subprocess.Popen(  # noqa: S603
        ["/bin/sh", "-c", "touch %s; exec sleep 60" % left], user=qemu, group=gid,
        extra_groups=[], stdin=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if left.exists():
                break
            time.sleep(0.05)
        assert left.exists() and left.stat().st_uid == qemu  # positive control
        with_qemu_uids.destroy(a)
        # the sweep's scan, last (a kill_all whose first round left a
        # process defuses its one uid before): gid is the VM's swtpm uid
        assert held_fd_scans[-1] == frozenset({gid, qemu})
        assert hidden.wait(timeout=10) == -9  # SIGKILLed
        assert not left.exists()
        assert with_qemu_uids.associations.uid_of(a) is None
    finally:
        if hidden.poll() is None:
            hidden.kill()
            hidden.wait(timeout=10)
        left.unlink(missing_ok=True)


def test_a_leftover_of_the_qemu_uid_keeps_the_pair_aside_until_swept(with_qemu_uids):
    """Q follows U (merge of the sweep): something of the VM's QEMU uid that
    the sweep cannot remove keeps U (and so Q) aside, swept again with U,
    instead of freeing the pair with Q's leftover in place."""
    a, _ = _running(with_qemu_uids)
    uid = with_qemu_uids.associations.uid_of(a)
    qemu, gid = with_qemu_uids.vm_ids(a)  # type: ignore[misc]
    lock = Path("/run/lock/vtpcm-test-qemu-kept-%d" % qemu)
    planted = subprocess.Popen(  # noqa: S603
        ["/bin/sh", "-c", "touch %s" % lock], user=qemu, group=gid, extra_groups=[],
        stdin=subprocess.DEVNULL)
    try:
        assert planted.wait(timeout=20) == 0 and lock.stat().st_uid == qemu
        subprocess.run(["chattr", "+i", str(lock)], check=True, timeout=20)
        with_qemu_uids.destroy(a)
        assert with_qemu_uids.associations.kept_uids() == [(a, uid)]
        assert with_qemu_uids.sweep_kept() == 1  # still there: still kept
        subprocess.run(["chattr", "-i", str(lock)], check=True, timeout=20)
        assert with_qemu_uids.sweep_kept() == 0
        assert with_qemu_uids.associations.kept_uids() == []
        assert not lock.exists()
    finally:
        subprocess.run(["chattr", "-i", str(lock)], capture_output=True, timeout=20)
        lock.unlink(missing_ok=True)
