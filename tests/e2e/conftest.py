"""Fixtures of the two-host lab tests: the lab itself and RAW swtpm processes.

Here the tests run swtpm themselves (the vTPCM agent does it in the product):
state created encrypted at rest by ``swtpm_setup`` with an EK and
certificates, keys handed over through pipes only, every process stopped by
pid at teardown, every wait bounded.
"""

import os
import shutil
import subprocess
import tempfile
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.functional import tpmtools
from vtpcm_agent.swtpm.keypipe import key_pipe
from vtpcm_lab import console, domain, hosts
from vtpcm_lab.live import free_port  # noqa: F401 (lab_fx.free_port)

SWTPM_START_TIMEOUT = 10.0


def _quiet_libvirt(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error to stderr, even handled ones."""


libvirt.registerErrorHandler(_quiet_libvirt, None)


class Key:
    """An AES-256 key that never shows up in a repr or a log line."""

    def __init__(self) -> None:
        self.raw = os.urandom(32)

    def __repr__(self) -> str:
        return "Key(<hidden>)"




def setup_state(state_dir: Path, key: Key) -> None:
    """Manufacture an encrypted TPM 2 state with EK + certificates."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = key_pipe(key.raw.hex().encode())
    try:
        proc = subprocess.run(
            ["swtpm_setup", "--tpm2", "--tpmstate", str(state_dir), "--createek",
             "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
             "--keyfile-fd", str(fd), "--cipher", "aes-256-cbc"],
            pass_fds=(fd,), capture_output=True, text=True, timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stdout + proc.stderr


class SwtpmProcs:
    """Starts swtpm processes and stops every one of them by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, state_dir: Path, ctrl: Path, uid: int, key: Key,
              migration_key: Key | None) -> subprocess.Popen[bytes]:
        state_dir.mkdir(parents=True, exist_ok=True)
        if ctrl.exists():
            ctrl.unlink()
        fds = [key_pipe(key.raw)]
        argv = ["swtpm", "socket", "--tpm2", "--tpmstate", "dir=%s" % state_dir,
                "--ctrl", "type=unixio,path=%s,mode=0660,uid=%d" % (ctrl, uid),
                "--key", "fd=%d,mode=aes-256-cbc,format=binary" % fds[0],
                "--log", "file=%s,level=1" % (state_dir / "swtpm.log")]
        if migration_key is not None:
            fds.append(key_pipe(migration_key.raw))
            argv += ["--migration-key", "fd=%d,mode=aes-256-cbc,format=binary" % fds[1]]
        try:
            proc = subprocess.Popen(argv, pass_fds=tuple(fds), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            for fd in fds:
                os.close(fd)
        self.procs.append(proc)
        deadline = time.monotonic() + SWTPM_START_TIMEOUT
        while not ctrl.exists():
            assert proc.poll() is None, "swtpm exited with %s" % proc.returncode
            assert time.monotonic() < deadline, "swtpm did not create %s" % ctrl
            time.sleep(0.02)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            hosts.kill_pid(proc.pid, timeout=5.0)
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()


def plaintext_permanent_state(src_state: Path, key: Key) -> bytes:
    """Plaintext permanent state of ``src_state``, from a key-only clone."""
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="vtp-"))
    try:
        with tpmtools.plaintext_permanent(src_state, key.raw, base) as plain:
            return plain
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def lab() -> Iterator[hosts.Lab]:
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests run the two-host lab and need root (two libvirt "
                    "session daemons under two users); run them as root, as CI does, or "
                    "deselect tests/e2e explicitly", pytrace=False)
    the_lab = hosts.Lab()
    try:
        the_lab.up()
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def swtpms() -> Iterator[SwtpmProcs]:
    procs = SwtpmProcs()
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def tpm_dirs() -> Iterator[Path]:
    """Short per-test dir for swtpm state (root only)."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="vtps-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ctrl_path(host: hosts.LabHost, tag: str) -> Path:
    return host.tpm_dir / ("%s.ctrl" % tag)


class Guest:
    """A lab guest defined and started on one host; destroyed at teardown."""

    def __init__(self, the_lab: hosts.Lab, name: str) -> None:
        self.lab = the_lab
        self.name = name
        self.uuid = str(uuid.uuid4())
        self.boot_s = 0.0

    def boot(self, host: hosts.LabHost, ctrl: Path | None) -> console.GuestConsole:
        assert self.lab.image is not None
        xml = domain.render_domain_xml(
            self.name, self.lab.image, ctrl, host.serial_path(self.name),
            domain_uuid=self.uuid)
        conn = host.connect()
        try:
            dom = conn.defineXML(xml)
            start = time.monotonic()
            dom.create()
        finally:
            conn.close()
        con = console.GuestConsole(host.serial_path(self.name))
        con.wait_ready(timeout=90.0)
        self.boot_s = time.monotonic() - start
        return con

    def cleanup(self) -> None:
        for host in self.lab.hosts:
            try:
                conn = host.connect()
            except libvirt.libvirtError:
                continue
            try:
                dom = conn.lookupByName(self.name)
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
            except libvirt.libvirtError:
                pass  # not on this host: nothing to clean
            finally:
                conn.close()


@pytest.fixture
def make_guest(lab: hosts.Lab) -> Iterator[object]:
    guests: list[Guest] = []

    def _make(name: str) -> Guest:
        g = Guest(lab, name)
        guests.append(g)
        return g

    try:
        yield _make
    finally:
        for g in guests:
            g.cleanup()


@pytest.fixture
def lab_fx() -> types.SimpleNamespace:
    """This module's helpers (Key, setup_state, console, ...) for the tests.

    Not ``sys.modules[__name__]``: every conftest.py is imported as
    ``conftest``, so that name may belong to another directory's conftest."""
    return types.SimpleNamespace(**{k: v for k, v in globals().items()
                                    if not k.startswith("__")})
