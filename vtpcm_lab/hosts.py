"""Two compute "hosts" on one machine: two libvirt session daemons, two users.

libvirt refuses a migration to the same host only by host UUID, so two
session daemons under two system users, each with its own ``host_uuid`` and
its own ``XDG_RUNTIME_DIR``, behave like two hosts. The lab starts them itself
(no systemd), records their pids and stops them (and their QEMUs) by pid.

Permissions: both users are in the group ``vtpcm-lab``; each host's runtime
dir and ``libvirt-sock`` are group-traversable/connectable, because in a
peer-to-peer migration the source daemon connects to the destination
daemon's socket as its own user. Root connects to either socket directly.
"""

import dataclasses
import grp
import os
import pwd
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import libvirt
from oslo_log import log as logging

from vtpcm_lab import ensure_dir, guest, lab_dir
from vtpcm_lab.exception import LabError

LOG = logging.getLogger(__name__)

LAB_GROUP = "vtpcm-lab"
LIBVIRTD = "/usr/sbin/libvirtd"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

_LIBVIRTD_CONF = """\
host_uuid = "%(host_uuid)s"
unix_sock_group = "%(group)s"
unix_sock_rw_perms = "0770"
unix_sock_ro_perms = "0770"
unix_sock_admin_perms = "0700"
"""
# stdio_handler=file: no per-user virtlogd process to track and stop.
_QEMU_CONF = """\
stdio_handler = "file"
"""


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def ensure_users(users: tuple[str, ...]) -> None:
    """Create the lab group and system users if absent (idempotent)."""
    try:
        subprocess.run(["getent", "group", LAB_GROUP], check=True, capture_output=True,
                       timeout=10)
    except subprocess.CalledProcessError:
        _run(["groupadd", "--system", LAB_GROUP])
    for user in users:
        try:
            subprocess.run(["id", "-u", user], check=True, capture_output=True, timeout=10)
        except subprocess.CalledProcessError:
            _run(["useradd", "--system", "--gid", LAB_GROUP, "--no-create-home",
                  "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", user])


def _uid_gid(user: str) -> tuple[int, int]:
    return pwd.getpwnam(user).pw_uid, grp.getgrnam(LAB_GROUP).gr_gid


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _proc_uid(pid: int) -> int | None:
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _proc_exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink("/proc/%d/exe" % pid))
    except OSError:
        return ""


def kill_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait (bounded), then SIGKILL; reap it if it is our child."""
    if not _pid_alive(pid):
        _reap(pid)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    LOG.warning("pid %(pid)s ignored SIGTERM, killing it", {"pid": pid})
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _pid_alive(pid):
        _reap(pid)
        time.sleep(0.05)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


@dataclasses.dataclass(frozen=True)
class HostNamespace:
    """A host's own UTS and mount namespace (the real-Nova mode of the lab).

    Nova names a compute node after libvirt's ``getHostname()`` and assumes
    one instances path on every host: each daemon gets its own hostname and
    its own directory bind-mounted at the common ``mountpoint``. ``unshare``
    and ``setpriv`` exec in place, so the recorded pid stays libvirtd's;
    nova-compute joins the namespace with ``nsenter`` on that pid.
    """

    hostname: str
    source: Path
    mountpoint: Path

    def wrap(self, argv: list[str], uid: int) -> list[str]:
        for path in (self.source, self.mountpoint):
            ensure_dir(path, 0o755)
        os.chown(self.source, uid, -1)
        script = ('hostname "$1" && mount --bind "$2" "$3" && shift 3 && exec "$@"')
        return ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c",
                script, "sh", self.hostname, str(self.source), str(self.mountpoint), *argv]


class LabHost:
    """One lab "compute host": a libvirt session daemon run as ``user``."""

    def __init__(self, name: str, user: str, base_dir: Path | None = None) -> None:
        self.name = name
        self.user = user
        self.dir = (base_dir or lab_dir()) / name
        self.home = self.dir / "home"
        self.runtime_dir = self.dir / "run"
        self.serial_dir = self.dir / "serial"
        self.tpm_dir = self.dir / "tpm"
        self.pid_file = self.dir / "libvirtd.pid"
        self.log_file = self.dir / "libvirtd.log"
        self._uuid_file = self.dir / "host_uuid"
        self.namespace: HostNamespace | None = None

    def __repr__(self) -> str:
        return "LabHost(%r, user=%r)" % (self.name, self.user)

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return "qemu+unix:///session?socket=%s" % self.socket_path

    @property
    def uid(self) -> int:
        return _uid_gid(self.user)[0]

    @property
    def gid(self) -> int:
        return _uid_gid(self.user)[1]

    @property
    def host_uuid(self) -> str:
        """Stable per lab dir: a restarted daemon is still the same host."""
        if not self._uuid_file.exists():
            ensure_dir(self.dir)
            self._uuid_file.write_text(str(uuid.uuid4()) + "\n")
        return self._uuid_file.read_text().strip()

    def serial_path(self, domain_name: str) -> Path:
        return self.serial_dir / ("%s.sock" % domain_name)

    def qemu_log(self, domain_name: str) -> Path:
        """The session driver's QEMU log of a domain (stdio_handler=file)."""
        return self.home / ".cache" / "libvirt" / "qemu" / "log" / ("%s.log" % domain_name)

    def _prepare_dirs(self) -> None:
        uid, gid = _uid_gid(self.user)
        ensure_dir(self.dir)
        host_uuid = self.host_uuid
        for path, mode in ((self.home, 0o750), (self.home / ".config", 0o750),
                           (self.home / ".config" / "libvirt", 0o750),
                           (self.runtime_dir, 0o750),
                           (self.runtime_dir / "libvirt", 0o750),
                           (self.serial_dir, 0o750)):
            ensure_dir(path, mode)
            os.chown(path, uid, gid)
        ensure_dir(self.tpm_dir, 0o755)
        conf_dir = self.home / ".config" / "libvirt"
        for fname, text in (("libvirtd.conf", _LIBVIRTD_CONF), ("qemu.conf", _QEMU_CONF)):
            path = conf_dir / fname
            path.write_text(text % {"host_uuid": host_uuid, "group": LAB_GROUP})
            os.chmod(path, 0o644)
            os.chown(path, uid, gid)

    def _recorded_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if (_pid_alive(pid) and _proc_uid(pid) == self.uid
                and _proc_exe_name(pid) == "libvirtd"):
            return pid
        return None

    @property
    def pid(self) -> int | None:
        """The running daemon's pid (what ``nsenter`` joins), or None."""
        return self._recorded_pid()

    def is_running(self) -> bool:
        """True if our recorded libvirtd is alive and its socket accepts."""
        if self._recorded_pid() is None:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            return False
        finally:
            sock.close()
        return True

    def start(self) -> None:
        """Start the daemon unless it already runs; clean leftovers of a crash."""
        if self.is_running():
            return
        stale = self._recorded_pid()
        if stale is not None:
            self._stop_daemon(stale)
        self._kill_qemus()
        self._prepare_dirs()
        for leftover in (self.socket_path, self.runtime_dir / "libvirt" / "libvirt-admin-sock",
                         self.runtime_dir / "libvirt" / "libvirtd.pid"):
            if leftover.exists() or leftover.is_symlink():
                leftover.unlink()
        env = {
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }
        argv = ["setpriv", "--reuid", self.user, "--regid", LAB_GROUP, "--init-groups",
                LIBVIRTD]
        if self.namespace is not None:
            argv = self.namespace.wrap(argv, self.uid)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                argv,
                env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        self.pid_file.write_text("%d\n" % proc.pid)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.is_running():
            if proc.poll() is not None:
                raise LabError(
                    reason="libvirtd of host %s exited with %s, see %s"
                    % (self.name, proc.returncode, self.log_file))
            if time.monotonic() >= deadline:
                kill_pid(proc.pid)
                raise LabError(reason="libvirtd of host %s did not start" % self.name)
            time.sleep(0.1)
        LOG.info("Lab host %(name)s up, pid %(pid)s", {"name": self.name, "pid": proc.pid})

    def connect(self) -> libvirt.virConnect:
        """A libvirt-python connection to this host (root may use any lab socket)."""
        return libvirt.open(self.uri)

    def qemu_pids(self) -> list[int]:
        """Pids of this user's QEMUs, from the session driver's pid files."""
        pids: list[int] = []
        run = self.runtime_dir / "libvirt" / "qemu" / "run"
        if not run.is_dir():
            return pids
        for pid_file in run.glob("*.pid"):
            if pid_file.name == "driver.pid":
                continue
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if _pid_alive(pid) and _proc_uid(pid) == self.uid:
                pids.append(pid)
        return pids

    def _kill_qemus(self) -> None:
        for pid in self.qemu_pids():
            LOG.info("Killing leftover QEMU %(pid)s of host %(name)s",
                     {"pid": pid, "name": self.name})
            kill_pid(pid, timeout=5.0)

    def _destroy_domains(self) -> None:
        try:
            conn = self.connect()
        except libvirt.libvirtError as exc:
            LOG.warning("Cannot connect to host %(name)s to destroy domains: %(err)s",
                        {"name": self.name, "err": exc})
            return
        try:
            for dom in conn.listAllDomains():
                try:
                    if dom.isActive():
                        dom.destroy()
                    if dom.isPersistent():
                        dom.undefine()
                except libvirt.libvirtError as exc:
                    LOG.warning("Cleaning domain %(dom)s failed: %(err)s",
                                {"dom": dom.name(), "err": exc})
        finally:
            conn.close()

    def _stop_daemon(self, pid: int) -> None:
        kill_pid(pid)
        if self.pid_file.exists():
            self.pid_file.unlink()

    def stop(self) -> None:
        """Destroy this host's domains, kill leftover QEMUs, stop libvirtd (by pid)."""
        pid = self._recorded_pid()
        if pid is not None and self.is_running():
            self._destroy_domains()
        self._kill_qemus()
        if pid is not None:
            self._stop_daemon(pid)
        LOG.info("Lab host %(name)s down", {"name": self.name})


class Lab:
    """The two-host lab: hosts ``a`` and ``b`` plus the cached guest image."""

    def __init__(self, base_dir: Path | None = None) -> None:
        self.base_dir = base_dir or lab_dir()
        self.a = LabHost("a", "vtpcm-lab-a", self.base_dir)
        self.b = LabHost("b", "vtpcm-lab-b", self.base_dir)
        self.image: guest.GuestImage | None = None

    def __repr__(self) -> str:
        return "Lab(%s)" % self.base_dir

    def __enter__(self) -> "Lab":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def hosts(self) -> tuple[LabHost, LabHost]:
        return (self.a, self.b)

    def up(self) -> guest.GuestImage:
        """Users, dirs, guest image and both daemons; idempotent."""
        ensure_dir(self.base_dir)
        ensure_users(tuple(h.user for h in self.hosts))
        self.image = guest.build_guest(self.base_dir)
        try:
            for host in self.hosts:
                host.start()
        except Exception:
            self.down()
            raise
        return self.image

    def down(self) -> None:
        """Stop everything the lab started; safe to call twice or after a crash."""
        errors: list[BaseException] = []
        for host in self.hosts:
            try:
                host.stop()
            except (OSError, LabError, libvirt.libvirtError) as exc:
                errors.append(exc)
        if errors:
            raise LabError(reason="stopping the lab: %s" % errors)
