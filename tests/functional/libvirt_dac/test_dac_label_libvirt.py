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
from vtpcm_agent import association, instances
from vtpcm_agent.keystore import DevKeyFileHostKey, KeyStore
from vtpcm_agent.swtpm import process
from vtpcm_lab import guest as lab_guest
from vtpcm_lab import hosts, lablock
from vtpcm_nova.virt import daclabel, tpmxml

pytestmark = pytest.mark.functional

SWTPM_UIDS = (1951000000, 1951000009)  # [agent] swtpm_uid_range, no account has them
QEMU_UIDS = (1951000100, 1951000109)  # [agent] qemu_uid_range
RANGES = daclabel.Ranges(qemu_uids=QEMU_UIDS, vm_gids=SWTPM_UIDS)  # the compute side's
LOCK_TIMEOUT = 900.0
START_TIMEOUT = 15.0


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail("%s is not installed (tools/install-deps.sh installs it)" % tool,
                        pytrace=False)


class Libvirtd:
    """A privileged libvirtd in a private mount namespace, stopped by pid."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sock = base / "sock"
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
            'stdio_handler = "file"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n')
        script = ("mount -t tmpfs none /run; mkdir -p /run/lock; "
                  "mount -t tmpfs none /var/lib/libvirt; mount -t tmpfs none /var/cache/libvirt; "
                  "mount --bind %s /var/log/libvirt; mount --bind %s /etc/libvirt; "
                  "exec /usr/sbin/libvirtd" % (log, etc))
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
            ["virsh", "-q", "-c", "qemu+unix:///system?socket=%s" % (self.sock / "libvirt-sock"),
             *args], capture_output=True, text=True, timeout=60, check=False)

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
    except Exception as err:  # noqa: BLE001 - reported as the skip's reason
        pytest.skip("lab guest image cannot be built: %s" % err)


def test_each_qemu_runs_as_its_vms_ids_and_reaches_only_its_own_vtpcm(guest_image):
    _need("virsh", "qemu-img", "qemu-system-x86_64", "unshare", "swtpm")
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="vtpcm-dac-"))  # noqa: S108
    os.chmod(base, 0o711)  # noqa: S103 - the per-VM uids traverse to their files
    daemon = Libvirtd(base / "libvirtd")
    settings = instances.AgentSettings(
        host="dac-host", state_root=base / "state", run_dir=base / "run", create_ek=False,
        swtpm_uids=SWTPM_UIDS, qemu_uids=QEMU_UIDS)
    settings.state_root.mkdir()
    assoc_list = association.AssociationList(settings.state_root / "associations.sqlite")
    agent = instances.InstanceManager(
        settings, assoc_list,
        KeyStore(settings.state_root / "keys", DevKeyFileHostKey(base / "hostkey")))
    names = {v: "vtpcm-dac-%s-%s" % (v, uuid.uuid4().hex[:8]) for v in "AB"}
    vms = {v: str(uuid.uuid4()) for v in "AB"}
    qemus: list[int] = []
    try:
        # Nova's layout: instances/_base/<image> shared, one dir per instance
        instances_dir = base / "instances"
        base_file = instances_dir / "_base" / "image"
        base_file.parent.mkdir(parents=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base_file), "64M"],
                       check=True, timeout=30)
        os.chmod(base_file, 0o644)
        os.chmod(instances_dir, 0o755)  # noqa: S103
        os.chmod(base_file.parent, 0o755)  # noqa: S103
        daemon.start()
        ids: dict[str, tuple[int, int]] = {}
        for v, instance in vms.items():
            inst_dir = instances_dir / instance
            inst_dir.mkdir(mode=0o755)
            shutil.copy(guest_image.kernel, inst_dir / "kernel")
            shutil.copy(guest_image.initrd, inst_dir / "ramdisk")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                            str(base_file), str(inst_dir / "disk")], check=True, timeout=30)
            for f in inst_dir.iterdir():
                os.chmod(f, 0o644)
            agent.create(instance)
            agent.start(instance)
            vm = agent.vm_ids(instance)
            assert vm is not None
            ids[v] = vm
            xml_path = base / ("%s.xml" % v)
            xml_path.write_text(guest_xml(names[v], inst_dir, instance,
                                          str(agent.public_ctrl_socket(instance)), vm))
            done = daemon.virsh("create", str(xml_path))
            assert done.returncode == 0, done.stderr
            pid = qemu_pid(names[v])
            assert pid is not None, "no QEMU for %s" % names[v]
            qemus.append(pid)

        (qa, ga), (qb, gb) = ids["A"], ids["B"]
        assert qa != ga and qa != qb and ga != gb
        # A's QEMU: A's QEMU uid, the VM's gid, no other group
        status = status_of(qemus[0])
        assert status["Uid"].split() == [str(qa)] * 4
        assert status["Gid"].split() == [str(ga)] * 4
        assert status["Groups"].split() == [str(ga)]
        assert status_of(qemus[1])["Uid"].split()[0] == str(qb)
        # A's socket is 0660 U:U: A's QEMU ids connect (positive control),
        # B's socket refuses them
        sock_a = agent.paths(vms["A"], agent.get(vms["A"]).vtpcm_id).ctrl_socket
        st = sock_a.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (ga, ga, 0o660)
        assert open_as(qa, ga, agent.public_ctrl_socket(vms["A"])) == "OK"
        assert open_as(qa, ga, agent.public_ctrl_socket(vms["B"])) == "EACCES"
        assert open_as(qb, gb, agent.public_ctrl_socket(vms["A"])) == "EACCES"
        # libvirt applied the label to A's own overlay, not to the shared base
        overlay = (instances_dir / vms["A"] / "disk").stat()
        assert (overlay.st_uid, overlay.st_gid) == (qa, ga)
        st = base_file.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    finally:
        for v in "AB":
            daemon.virsh("destroy", names[v])
        for pid in qemus:
            hosts.kill_pid(pid, timeout=10.0)
        daemon.stop()
        for instance in vms.values():
            try:
                record = agent.associations.find(instance)
                if record is not None:
                    paths = agent.paths(instance, record.vtpcm_id)
                    pid = process.find_running(paths) or record.pid
                    if pid is not None:
                        process.stop(pid, paths, timeout=6.0)
            except Exception:  # noqa: BLE001, S110 - the next one must still stop
                pass
        assoc_list.close()
        shutil.rmtree(base, ignore_errors=True)
