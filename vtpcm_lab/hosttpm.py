"""A real swtpm standing in for a compute node's host TPM (``/dev/tpmrm0``).

Used by the lab and by the tests: ``HostTPMStandIn(tmpdir)`` gives ``.tcti``
(a tpm2-tss TCTI string for ``HostTPM``), ``.start()`` and ``.stop()`` (by
pid, with a timeout, killed if needed). ``measured_boot`` extends PCRs 0-7
with fixed digests, so honest stand-ins quote identical "golden" values.

The socket directory is created under /tmp with a short name because unix
socket paths are limited to 107 bytes; the TPM state lives in ``tmpdir``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SWTPM = shutil.which("swtpm") or "/usr/bin/swtpm"
SWTPM_SETUP = shutil.which("swtpm_setup") or "/usr/bin/swtpm_setup"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
BOOT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7)


LOCALCA_CONF = Path("/etc/swtpm-localca.conf")


def localca_ek_cas(dest: Path) -> Path:
    """Write the certificates of swtpm-localca (the "manufacturer" of
    stand-ins made ``with_ek_cert``) to ``dest``: the engine's
    ``[attestation] ek_ca_file`` for the lab. Call after one stand-in was
    manufactured (swtpm_setup creates the CA on first use)."""
    settings = {}
    for line in LOCALCA_CONF.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.strip().startswith("#"):
            settings[key.strip()] = value.strip()
    statedir = Path(settings.get("statedir", "/var/lib/swtpm-localca"))
    issuer = Path(settings.get("issuercert", statedir / "issuercert.pem"))
    pems = [issuer.read_bytes()]
    root = statedir / "swtpm-localca-rootca-cert.pem"
    if root.exists():
        pems.append(root.read_bytes())
    dest.write_bytes(b"".join(pems))
    return dest


def measured_boot(tcti: str) -> None:
    """Simulate firmware + bootloader + kernel measurements into PCRs 0-7."""
    from vtpcm_agent.hosttpm import HostTPM

    with HostTPM(tcti) as tpm:
        for index in BOOT_PCRS:
            tpm.extend_pcr(index, hashlib.sha256(b"golden boot stage %d" % index).digest())


class HostTPMStandIn:
    """One swtpm process acting as a host TPM; state survives stop/start."""

    def __init__(self, tmpdir: Path | str, name: str = "host",
                 with_ek_cert: bool = False) -> None:
        """``with_ek_cert`` manufactures the TPM first (swtpm_setup: EKs and
        EK certificates from the local CA, ~1 s), like a real host TPM."""
        self.state_dir = Path(tmpdir) / ("tpmstate-" + name)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._with_ek_cert = with_ek_cert
        self._manufactured = False
        self._sock_dir = tempfile.mkdtemp(prefix="htpm", dir="/tmp")
        self.socket_path = os.path.join(self._sock_dir, "tpm")
        self.ctrl_path = self.socket_path + ".ctrl"
        self.log_path = self.state_dir / "swtpm.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        """TCTI config string for ``HostTPM`` / ``TCTILdr.parse``."""
        return "swtpm:path=" + self.socket_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("host TPM stand-in already started")
        if self._with_ek_cert and not self._manufactured:
            self._manufacture()
        for p in (self.socket_path, self.ctrl_path):
            if os.path.exists(p):
                os.unlink(p)
        argv = [
            SWTPM, "socket", "--tpm2",
            "--server", "type=unixio,path=" + self.socket_path,
            "--ctrl", "type=unixio,path=" + self.ctrl_path,
            "--tpmstate", "dir=" + str(self.state_dir),
            "--flags", "startup-clear",
            "--log", "file=" + str(self.log_path) + ",level=1",
        ]
        self._proc = subprocess.Popen(  # noqa: S603
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _manufacture(self) -> None:
        subprocess.run(  # noqa: S603
            [SWTPM_SETUP, "--tpm2", "--tpmstate", str(self.state_dir), "--createek",
             "--create-ek-cert", "--lock-nvram", "--overwrite",
             "--logfile", str(self.state_dir / "swtpm_setup.log")],
            check=True, timeout=60, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._manufactured = True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"swtpm exited early with code {self._proc.returncode}")
            # swtpm binds (the file appears) before it listens: only a
            # successful connect to BOTH sockets means a TCTI can open it
            if self._connectable(self.ctrl_path) and self._connectable(self.socket_path):
                return
            time.sleep(0.02)
        raise TimeoutError(f"swtpm host TPM stand-in not ready after {START_TIMEOUT:.0f} s")

    @staticmethod
    def _connectable(path: str) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect(path)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def stop(self) -> None:
        """Stop the process by pid (TERM, then KILL after a timeout)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)

    def cleanup(self) -> None:
        """Stop and remove the short socket directory."""
        self.stop()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __enter__(self) -> HostTPMStandIn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
