"""``[vtpcm] qemu_dac_label`` with REAL libvirt 9.0 + QEMU (TCG) and the
real agent code (issue 9 point 5; turned from tools/dac-label-experiment.sh).

A privileged libvirtd runs in a private mount namespace (its /run,
/var/lib/libvirt, /etc/libvirt and log dir are its own: the host's are
untouched). The vTPCM agent's InstanceManager (real swtpm_setup and swtpm,
per-VM isolation with ``swtpm_uids`` and ``qemu_uids``) creates and starts
two vTPCMs; each guest's XML gets its TPM, its DAC label and its pinned
backing chain from the driver's own functions (``tpmxml.tpm_element``,
``daclabel.checked_ids``, ``daclabel.label_domain`` with the real
``qemu-img``) over a Nova-like layout: ``instances/_base/<image>`` (raw,
root:root 0644) under a qcow2 overlay per instance. Seen: VM A's QEMU runs
as A's Q:U with no other group; A's ids connect to A's socket (positive
control) and get EACCES on B's; the shared base is still root:root 0644
with both guests running. Holds the lab lock; everything it started is
stopped by pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.functional.agent.test_swtpm_isolation import open_as, status_of
from tests.functional.hosttpm_fixture import TEST_KEY_AUTH
from vtpcm_agent import association, instances, sealing
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.keystore import DevKeyFileHostKey, KeyStore
from vtpcm_agent.swtpm import process
from vtpcm_lab import guest as lab_guest
from vtpcm_lab import hosts, lablock
from vtpcm_lab.hosttpm import HostTPMStandIn
from vtpcm_nova.virt import daclabel, tpmxml

pytestmark = pytest.mark.functional

# [agent] swtpm_uid_range and qemu_uid_range of two agents (no account has
# these ids), and [vtpcm] vm_gid_range and qemu_uid_range covering both
SWTPM_UIDS = (1951000000, 1951000009)
QEMU_UIDS = (1951000100, 1951000109)
DEST_SWTPM_UIDS = (1951000010, 1951000019)
DEST_QEMU_UIDS = (1951000110, 1951000119)
RANGES = daclabel.Ranges(qemu_uids=(1951000100, 1951000199),
                         vm_gids=(1951000000, 1951000099))
LOCK_TIMEOUT = 900.0
START_TIMEOUT = 15.0


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail("%s is not installed (tools/install-deps.sh installs it)" % tool,
                        pytrace=False)


class Libvirtd:
    """A privileged libvirtd in a private mount namespace, stopped by pid."""

    def __init__(self, base: Path, qemu_conf_extra: str = "",
                 binds: tuple[tuple[Path, Path], ...] = ()) -> None:
        self.base = base
        self.sock = base / "sock"
        self.uri = "qemu+unix:///system?socket=%s" % (self.sock / "libvirt-sock")
        self.qemu_conf_extra = qemu_conf_extra
        # (what, where): this daemon (and its QEMUs) see ``what`` at ``where``
        self.binds = binds
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        etc, log = self.base / "etc", self.base / "log"
        for d in (etc / "qemu" / "networks" / "autostart", log, self.sock):
            d.mkdir(parents=True)
        for name in ("libvirtd.conf", "libvirt.conf"):
            shutil.copy(Path("/etc/libvirt") / name, etc / name)
        with open(etc / "libvirtd.conf", "a", encoding="ascii") as fh:
            fh.write('host_uuid = "%s"\nunix_sock_dir = "%s"\n' % (uuid.uuid4(), self.sock))
        (etc / "qemu.conf").write_text(
            'stdio_handler = "file"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n%s\n'
            % self.qemu_conf_extra)
        script = ("mount -t tmpfs none /run; mkdir -p /run/lock; "
                  "mount -t tmpfs none /var/lib/libvirt; mount -t tmpfs none /var/cache/libvirt; "
                  "mount --bind %s /var/log/libvirt; mount --bind %s /etc/libvirt; %s"
                  "exec /usr/sbin/libvirtd" % (log, etc, "".join(
                      "mount --bind %s %s; " % pair for pair in self.binds)))
        with open(log / "out", "wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603
                ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.sock / "libvirt-sock").exists():
            assert self.proc.poll() is None, (log / "out").read_text()
            assert time.monotonic() < deadline, "libvirtd did not open its socket"
            time.sleep(0.1)

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603
            ["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True,
            timeout=60, check=False)

    def stop(self) -> None:
        if self.proc is not None:
            hosts.kill_pid(self.proc.pid, timeout=10.0)


def qemu_pid(name: str) -> int | None:
    """The QEMU of domain ``name`` (a name unique to this test run)."""
    needle = ("guest=%s," % name).encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline and b"qemu-system" in cmdline:
                return int(entry.name)
    return None


def _nova_like_domain(name: str, inst_dir: Path) -> str:
    """The part of the guest's XML Nova writes (kernel boot, one qcow2 disk)."""
    return (
        "<domain type='qemu'><name>%s</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><kernel>%s/kernel</kernel>"
        "<initrd>%s/ramdisk</initrd><cmdline>console=ttyS0</cmdline></os>"
        "<features><acpi/></features><devices><emulator>/usr/bin/qemu-system-x86_64"
        "</emulator><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='%s/disk'/><target dev='vda' bus='virtio'/></disk></devices>"
        "</domain>" % (name, inst_dir, inst_dir, inst_dir))


def guest_xml(name: str, inst_dir: Path, instance_uuid: str, socket: str,
              vm_ids: tuple[int, int] | None) -> str:
    """What the driver makes of it: ``_add_vtpm_device``'s TPM element, then
    ``_get_guest_xml``'s label with the agent's ids checked (real qemu-img)."""
    dom = ET.fromstring(_nova_like_domain(name, inst_dir))  # noqa: S314 (our own text)
    devices = dom.find("devices")
    assert devices is not None
    devices.append(tpmxml.tpm_element(tpmxml.checked_socket_path(
        socket, instance_uuid, [str(Path(socket).parent)])))
    ids = daclabel.checked_ids(vm_ids[0] if vm_ids else None, vm_ids[1] if vm_ids else None,
                               RANGES, instance_uuid, "dac-host")
    return daclabel.label_domain(ET.tostring(dom, encoding="unicode"), ids, str(inst_dir),
                                 instance_uuid)


@pytest.fixture
def lab_lock() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.fail("needs root (a privileged libvirtd, per-VM uids)", pytrace=False)
    with lablock.hold(LOCK_TIMEOUT):
        yield


@pytest.fixture
def guest_image(lab_lock: None) -> lab_guest.GuestImage:
    try:
        return lab_guest.build_guest()
    except Exception as err:  # noqa: BLE001 - reported as the failure's reason
        # a required part, as the tools _need names: never a skip
        pytest.fail("lab guest image cannot be built (tools/install-deps.sh): %s" % err,
                    pytrace=False)


class Layout:
    """Nova's: ``instances/_base/<image>`` (raw, root:root 0644) shared, a
    dir per instance with its kernel, ramdisk and qcow2 overlay on it."""

    def __init__(self, base: Path, image: lab_guest.GuestImage) -> None:
        self.instances = base / "instances"
        self.base_file = self.instances / "_base" / "image"
        self.image = image
        self.base_file.parent.mkdir(parents=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(self.base_file), "64M"],
                       check=True, timeout=30)
        os.chmod(self.base_file, 0o644)
        os.chmod(self.instances, 0o755)  # noqa: S103
        os.chmod(self.base_file.parent, 0o755)  # noqa: S103

    def instance(self, instance_uuid: str) -> Path:
        inst_dir = self.instances / instance_uuid
        inst_dir.mkdir(mode=0o755)
        shutil.copy(self.image.kernel, inst_dir / "kernel")
        shutil.copy(self.image.initrd, inst_dir / "ramdisk")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.base_file), str(inst_dir / "disk")], check=True, timeout=30)
        for f in inst_dir.iterdir():
            os.chmod(f, 0o644)
        return inst_dir

    def base_owner_mode(self) -> tuple[int, int, int]:
        st = self.base_file.stat()
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _agent(base: Path, name: str, swtpm_uids: tuple[int, int], qemu_uids: tuple[int, int],
           host_tpm: object = None) -> instances.InstanceManager:
    """The agent's InstanceManager with per-VM swtpm and QEMU uids."""
    settings = instances.AgentSettings(
        host=name, state_root=base / name / "state", run_dir=base / name / "run",
        create_ek=False, swtpm_uids=swtpm_uids, qemu_uids=qemu_uids)
    settings.state_root.mkdir(parents=True)
    os.chmod(base / name, 0o711)  # noqa: S103
    return instances.InstanceManager(
        settings, association.AssociationList(settings.state_root / "associations.sqlite"),
        KeyStore(settings.state_root / "keys", DevKeyFileHostKey(base / name / "hostkey")),
        host_tpm)  # type: ignore[arg-type]


def _stop_swtpms(agent: instances.InstanceManager) -> None:
    for record in agent.list_vtpcms():
        try:
            paths = agent.paths(record.instance_uuid, record.vtpcm_id)
            pid = process.find_running(paths) or record.pid
            if pid is not None:
                process.stop(pid, paths, timeout=6.0)
        except Exception:  # noqa: BLE001, S110 - the next one must still stop
            pass
    agent.associations.close()


def _start_guest(daemon: Libvirtd, agent: instances.InstanceManager, name: str,
                 inst_dir: Path, instance_uuid: str, qemus: list[int]) -> tuple[int, int]:
    """Create and start the vTPCM, then the guest labelled with its ids."""
    agent.create(instance_uuid)
    agent.start(instance_uuid)
    vm = agent.vm_ids(instance_uuid)
    assert vm is not None
    xml_path = inst_dir.parent.parent / ("%s.xml" % name)
    xml_path.write_text(guest_xml(name, inst_dir, instance_uuid,
                                  str(agent.public_ctrl_socket(instance_uuid)), vm))
    done = daemon.virsh("create", str(xml_path))
    assert done.returncode == 0, done.stderr
    pid = qemu_pid(name)
    assert pid is not None, "no QEMU for %s" % name
    qemus.append(pid)
    return vm


def _ids_of(pid: int) -> tuple[list[str], list[str], list[str]]:
    status = status_of(pid)
    return status["Uid"].split(), status["Gid"].split(), status["Groups"].split()


def _cleanup(daemons: list[Libvirtd], names: list[str], qemus: list[int],
             agents: list[instances.InstanceManager]) -> None:
    for daemon in daemons:
        for name in names:
            daemon.virsh("destroy", name)
    for pid in qemus:
        hosts.kill_pid(pid, timeout=10.0)
    for daemon in daemons:
        daemon.stop()
    for agent in agents:
        _stop_swtpms(agent)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_each_qemu_runs_as_its_vms_ids_and_reaches_only_its_own_vtpcm(guest_image):
    _need("virsh", "qemu-img", "qemu-system-x86_64", "unshare", "swtpm")
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vtpcm-dac-"))  # noqa: S108
    os.chmod(base, 0o711)  # noqa: S103 - the per-VM uids traverse to their files
    daemon = Libvirtd(base / "libvirtd")
    names = {v: "vtpcm-dac-%s-%s" % (v, uuid.uuid4().hex[:8]) for v in "AB"}
    vms = {v: str(uuid.uuid4()) for v in "AB"}
    qemus: list[int] = []
    agent = _agent(base, "dac-host", SWTPM_UIDS, QEMU_UIDS)
    try:
        layout = Layout(base, guest_image)
        daemon.start()
        ids = {v: _start_guest(daemon, agent, names[v], layout.instance(vms[v]), vms[v], qemus)
               for v in "AB"}
        (qa, ga), (qb, gb) = ids["A"], ids["B"]
        assert qa != ga and qa != qb and ga != gb
        # A's QEMU: A's QEMU uid, the VM's gid, no other group
        assert _ids_of(qemus[0]) == ([str(qa)] * 4, [str(ga)] * 4, [str(ga)])
        assert _ids_of(qemus[1])[0] == [str(qb)] * 4
        # A's socket is 0660 U:U: A's QEMU ids connect (positive control),
        # B's socket refuses them
        sock_a = agent.paths(vms["A"], agent.get(vms["A"]).vtpcm_id).ctrl_socket
        st = sock_a.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (ga, ga, 0o660)
        assert open_as(qa, ga, agent.public_ctrl_socket(vms["A"])) == "OK"
        assert open_as(qa, ga, agent.public_ctrl_socket(vms["B"])) == "EACCES"
        assert open_as(qb, gb, agent.public_ctrl_socket(vms["A"])) == "EACCES"
        # libvirt applied the label to A's own overlay, not to the shared base
        overlay = (layout.instances / vms["A"] / "disk").stat()
        assert (overlay.st_uid, overlay.st_gid) == (qa, ga)
        assert layout.base_owner_mode() == (0, 0, 0o644)
    finally:
        _cleanup([daemon], list(names.values()), qemus, [agent])
        shutil.rmtree(base, ignore_errors=True)


def test_live_migration_runs_the_qemu_as_the_destination_agents_ids(guest_image):
    """The source's migratable XML rewritten as ``_RewritingGuest`` does
    (socket path, then the label with the destination agent's checked ids
    for its incoming vTPCM, prepared with the migration key sealed to its
    host TPM stand-in). Both daemons share this file system, so the
    destination runs with ``remember_owner = 0`` (see design.rst)."""
    _need("virsh", "qemu-img", "qemu-system-x86_64", "unshare", "swtpm")
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vtpcm-dac-"))  # noqa: S108
    os.chmod(base, 0o711)  # noqa: S103
    src_daemon = Libvirtd(base / "src-libvirtd")
    dst_daemon = Libvirtd(base / "dst-libvirtd", "remember_owner = 0")
    name = "vtpcm-dac-M-%s" % uuid.uuid4().hex[:8]
    vm = str(uuid.uuid4())
    qemus: list[int] = []
    standin = HostTPMStandIn(base, "dst-tpm")
    agents: list[instances.InstanceManager] = []
    dst_tpm = None
    try:
        standin.start()
        dst_tpm = HostTPM(standin.tcti, TEST_KEY_AUTH, key_file=base / "dst-hostkeys.tpm")
        src = _agent(base, "dac-src", SWTPM_UIDS, QEMU_UIDS)
        agents.append(src)
        dst = _agent(base, "dac-dst", DEST_SWTPM_UIDS, DEST_QEMU_UIDS, dst_tpm)
        agents.append(dst)
        layout = Layout(base, guest_image)
        src_daemon.start()
        dst_daemon.start()
        q1, g1 = _start_guest(src_daemon, src, name, layout.instance(vm), vm, qemus)
        # the protocol's begin: seal to the destination's TPM, prepare there
        ctx = sealing.SealContext(migration_id=str(uuid.uuid4()), instance_uuid=vm,
                                  generation=src.get(vm).generation, source_host="dac-src",
                                  dest_host="dac-dst")
        envelope = src.seal_migration_key(ctx, dst_tpm.identity(b"").kem_public)
        assert dst.prepare_incoming(ctx, envelope).state.value == "MIGRATING_IN"
        reported = dst.vm_ids(vm)
        assert reported is not None
        ids = daclabel.checked_ids(reported[0], reported[1], RANGES, vm, "dac-dst")
        assert (ids.qemu_uid, ids.vm_gid) != (q1, g1)
        dumped = src_daemon.virsh("dumpxml", "--migratable", name)
        assert dumped.returncode == 0, dumped.stderr
        xml = tpmxml.rewrite_tpm_socket(dumped.stdout, str(dst.public_ctrl_socket(vm)))
        xml_path = base / "migrate.xml"
        xml_path.write_text(daclabel.relabel_for_destination(xml, ids, vm))
        done = src_daemon.virsh("migrate", "--live", "--unsafe", name, dst_daemon.uri,
                                "--migrateuri", "tcp://127.0.0.1:%d" % _free_port(),
                                "--xml", str(xml_path))
        assert done.returncode == 0, done.stderr
        pid = qemu_pid(name)
        assert pid is not None and pid != qemus[0]
        qemus.append(pid)
        assert _ids_of(pid) == ([str(ids.qemu_uid)] * 4, [str(ids.vm_gid)] * 4,
                                [str(ids.vm_gid)])
        assert dst.holds_state(dst.get(vm))  # the state came through QEMU
        assert layout.base_owner_mode() == (0, 0, 0o644)
        # the source's ids do not reach the destination's socket
        assert open_as(q1, g1, dst.public_ctrl_socket(vm)) == "EACCES"
        assert open_as(ids.qemu_uid, ids.vm_gid, dst.public_ctrl_socket(vm)) == "OK"
    finally:
        _cleanup([src_daemon, dst_daemon], [name], qemus, agents)
        if dst_tpm is not None:
            dst_tpm.close()
        standin.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def test_an_unlabelled_guest_beside_a_labelled_one_leaves_the_base_roots(guest_image):
    """Review of the DAC label round 3, HIGH 1 (mixed_base.py): a guest
    without a vTPCM (Nova's XML, libvirt's dynamic ownership) on the host
    of a labelled one had libvirt chown the shared _base to its QEMU user
    for good: every unlabelled QEMU could write what the labelled guest
    reads. With the option on its XML goes through ``daclabel.pin_domain``
    (what ``_get_guest_xml`` does for it): the base stays root's 0644 with
    both running, and through the unlabelled guest's managed save and
    restore (the cold snapshot Nova's snapshot takes for it then)."""
    _need("virsh", "qemu-img", "qemu-system-x86_64", "unshare", "swtpm")
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vtpcm-dac-"))  # noqa: S108
    os.chmod(base, 0o711)  # noqa: S103
    daemon = Libvirtd(base / "libvirtd")
    names = {v: "vtpcm-dac-%s-%s" % (v, uuid.uuid4().hex[:8]) for v in "LN"}
    vms = {v: str(uuid.uuid4()) for v in "LN"}
    qemus: list[int] = []
    agent = _agent(base, "dac-host", SWTPM_UIDS, QEMU_UIDS)
    try:
        layout = Layout(base, guest_image)
        daemon.start()
        _start_guest(daemon, agent, names["L"], layout.instance(vms["L"]), vms["L"], qemus)
        inst_dir = layout.instance(vms["N"])
        xml_path = base / "N.xml"
        xml_path.write_text(daclabel.pin_domain(_nova_like_domain(names["N"], inst_dir),
                                                str(inst_dir)))
        for step in (("define", str(xml_path)), ("start", names["N"])):
            done = daemon.virsh(*step)
            assert done.returncode == 0, done.stderr
        pid = qemu_pid(names["N"])
        assert pid is not None
        qemus.append(pid)
        # libvirt's own QEMU user (dynamic ownership), not a per-VM one
        qemu_user = _ids_of(pid)[0][0]
        assert int(qemu_user) not in range(QEMU_UIDS[0], QEMU_UIDS[1] + 1)
        overlay = (inst_dir / "disk").stat()
        assert str(overlay.st_uid) == qemu_user  # its own overlay is its QEMU's
        assert layout.base_owner_mode() == (0, 0, 0o644)
        for step in (("managedsave", names["N"]), ("start", names["N"])):
            done = daemon.virsh(*step)
            assert done.returncode == 0, done.stderr
        pid = qemu_pid(names["N"])
        assert pid is not None
        qemus.append(pid)
        assert layout.base_owner_mode() == (0, 0, 0o644)
    finally:
        _cleanup([daemon], list(names.values()), qemus, [agent])
        shutil.rmtree(base, ignore_errors=True)


def test_a_guest_started_unpinned_migrates_pinned_and_leaves_the_destinations_base(
        guest_image):
    """Review of the DAC label round 4, MEDIUM 3 (ii): a guest without a
    vTPCM started before the option (Nova's XML, its chain unpinned) is
    live-migrated with its migratable XML through ``pin_for_migration``
    (what ``_PinningGuest`` does): the destination's own ``_base`` (a file
    of its own, bound over the same path in its mount namespace, as on a
    real second host) stays root:root 0644 with the guest running there.
    The source's base is the one libvirt chowned when the guest started.
    Control (seen): the migratable XML sent as it is, the destination's
    base became uid 64055's; libvirt 9.0's migratable XML names no
    ``<backingStore>``."""
    _need("virsh", "qemu-img", "qemu-system-x86_64", "unshare")
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vtpcm-dac-"))  # noqa: S108
    os.chmod(base, 0o711)  # noqa: S103
    layout = Layout(base, guest_image)
    dst_base = base / "dst-base"
    dst_base.mkdir(mode=0o755)
    shutil.copy(layout.base_file, dst_base / "image")
    os.chmod(dst_base / "image", 0o644)
    src_daemon = Libvirtd(base / "src-libvirtd")
    dst_daemon = Libvirtd(base / "dst-libvirtd", "remember_owner = 0",
                          binds=((dst_base, layout.base_file.parent),))
    name = "vtpcm-dac-U-%s" % uuid.uuid4().hex[:8]
    qemus: list[int] = []
    try:
        inst_dir = layout.instance(str(uuid.uuid4()))
        src_daemon.start()
        dst_daemon.start()
        xml_path = base / "U.xml"
        xml_path.write_text(_nova_like_domain(name, inst_dir))  # before the option
        done = src_daemon.virsh("create", str(xml_path))
        assert done.returncode == 0, done.stderr
        pid = qemu_pid(name)
        assert pid is not None
        qemus.append(pid)
        qemu_user = int(_ids_of(pid)[0][0])
        assert layout.base_owner_mode()[0] == qemu_user  # unpinned: libvirt chowned it
        dumped = src_daemon.virsh("dumpxml", "--migratable", name)
        assert dumped.returncode == 0, dumped.stderr
        migrate_xml = base / "migrate.xml"
        migrate_xml.write_text(daclabel.pin_for_migration(dumped.stdout, str(inst_dir)))
        done = src_daemon.virsh("migrate", "--live", "--unsafe", name, dst_daemon.uri,
                                "--migrateuri", "tcp://127.0.0.1:%d" % _free_port(),
                                "--xml", str(migrate_xml))
        assert done.returncode == 0, done.stderr
        pid = qemu_pid(name)
        assert pid is not None and pid != qemus[0]
        qemus.append(pid)
        st = (dst_base / "image").stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    finally:
        _cleanup([src_daemon, dst_daemon], [name], qemus, [])
        shutil.rmtree(base, ignore_errors=True)
