"""Build the lab's test guest (kernel + initramfs), once, cached by its inputs.

The guest is a Debian cloud kernel (TPM TIS/CRB drivers built in) and an
initramfs holding busybox-static, the tpm2-tools multi-call binary with its
shared libraries and the dlopen'ed device TCTI, and ``guest_init.sh`` as
``/init``. Rebuilding takes a few seconds, so it only happens when one of
the inputs (files, sizes, mtimes, init script) changed.
"""

import dataclasses
import glob
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from oslo_log import log as logging

from vtpcm_lab import ensure_dir, lab_dir
from vtpcm_lab.exception import LabError

LOG = logging.getLogger(__name__)

BUILD_VERSION = "2"
INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")
BUSYBOX = Path("/bin/busybox")
TPM2_BINARY = Path("/usr/bin/tpm2")
TCTI_GLOB = "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so*"
KERNEL_GLOB = "/boot/vmlinuz-*-cloud-amd64"
TPM2_TOOLS = (
    "tpm2_pcrextend", "tpm2_pcrread", "tpm2_nvdefine", "tpm2_nvwrite",
    "tpm2_nvread", "tpm2_nvreadpublic", "tpm2_readpublic", "tpm2_getcap",
    "tpm2_startup",
)
CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1 tpm_tis.interrupts=0 rdinit=/init"


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """Paths of a built guest; readable by every lab user."""

    kernel: Path
    initrd: Path
    cmdline: str


def _find_kernel() -> Path:
    kernels = sorted(glob.glob(KERNEL_GLOB))
    if not kernels:
        raise LabError(reason="no %s (install linux-image-cloud-amd64)" % KERNEL_GLOB)
    return Path(kernels[-1])


def _shared_libs(binary: Path) -> list[Path]:
    """Resolved shared-library paths of ``binary`` (ldd), loader included."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    libs: list[Path] = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def _inputs(kernel: Path) -> list[Path]:
    tcti = sorted(Path(p) for p in glob.glob(TCTI_GLOB))
    if not tcti:
        raise LabError(reason="libtss2-tcti-device not installed")
    files = [kernel, INIT_SCRIPT, BUSYBOX, TPM2_BINARY, *tcti]
    for path in files:
        if not path.exists():
            raise LabError(reason="guest input %s missing" % path)
    return files


def _fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256(BUILD_VERSION.encode())
    digest.update(CMDLINE.encode())
    for path in files:
        st = path.stat()
        digest.update(("%s:%d:%d\n" % (path, st.st_size, st.st_mtime_ns)).encode())
    digest.update(INIT_SCRIPT.read_bytes())
    return digest.hexdigest()


def _copy_into(root: Path, src: Path) -> None:
    """Copy ``src`` (following links) to the same absolute path under ``root``."""
    dest = root / str(src).lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Only the name the loader asks for (the soname), never the duplicate real
    # file: it halves the initramfs, which TCG has to decompress at each boot.
    shutil.copy2(os.path.realpath(src), dest)


def _stage(root: Path) -> None:
    for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
                "lib/x86_64-linux-gnu", "lib64"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    shutil.copy2(TPM2_BINARY, root / "usr/bin/tpm2")
    for tool in TPM2_TOOLS:
        (root / "usr/bin" / tool).symlink_to("tpm2")
    libs: set[Path] = set(_shared_libs(TPM2_BINARY))
    for tcti in glob.glob(TCTI_GLOB):
        libs.add(Path(tcti))
        libs.update(_shared_libs(Path(tcti)))
    for lib in sorted(libs):
        _copy_into(root, lib)
    # Debian's "/lib" is a symlink to usr/lib on merged-/usr hosts; ldd prints
    # /lib/... paths, which we copied as real directories: fine for the guest.
    init = root / "init"
    shutil.copy2(INIT_SCRIPT, init)
    os.chmod(init, 0o755)  # noqa: S103 - the guest's /init must be executable
    os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))


def _pack(root: Path, dest: Path) -> None:
    """cpio newc archive of ``root``, gzip'ed, owned by root in the archive."""
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True,
                           timeout=60).stdout
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
                             cwd=root, input=names, capture_output=True, check=True,
                             timeout=120).stdout
    tmp = dest.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=6) as out:
        out.write(archive)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def build_guest(base: Path | None = None) -> GuestImage:
    """Build (or reuse) the guest under ``<lab dir>/guest``; idempotent."""
    guest_dir = ensure_dir((base or lab_dir()) / "guest")
    kernel_src = _find_kernel()
    files = _inputs(kernel_src)
    fingerprint = _fingerprint(files)
    kernel = guest_dir / "vmlinuz"
    initrd = guest_dir / "initrd.gz"
    stamp = guest_dir / "inputs.sha256"
    if (stamp.exists() and stamp.read_text().strip() == fingerprint
            and kernel.exists() and initrd.exists()):
        return GuestImage(kernel=kernel, initrd=initrd, cmdline=CMDLINE)
    LOG.info("Building lab guest in %(dir)s", {"dir": guest_dir})
    shutil.copyfile(kernel_src, kernel)
    os.chmod(kernel, 0o644)
    with tempfile.TemporaryDirectory(dir=guest_dir) as staging:
        _stage(Path(staging))
        _pack(Path(staging), initrd)
    stamp.write_text(fingerprint + "\n")
    os.chmod(stamp, 0o644)
    return GuestImage(kernel=kernel, initrd=initrd, cmdline=CMDLINE)
