"""Per-agent swtpm_setup / swtpm_localca configuration.

Why: Debian's /etc/swtpm_setup.conf points every caller at one shared CA in
/var/lib/swtpm-localca. Each compute host (and each simulated host in the
lab) must sign its vTPCMs' EK and platform certificates with its OWN local
CA, so the agent writes its own three config files under ``localca_dir``;
swtpm_localca creates the CA key and certificate there on first use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from vtpcm_common import exception

SETUP_CONF = "swtpm_setup.conf"
LOCALCA_CONF = "swtpm-localca.conf"
LOCALCA_OPTIONS = "swtpm-localca.options"
CA_SUBDIR = "ca"

PLATFORM_MANUFACTURER = "vtpcm"
PLATFORM_VERSION = "2.1"
PLATFORM_MODEL = "QEMU"


def _write(path: Path, text: str) -> None:
    """Atomically, through a temporary file of this call's own: creates of
    several vTPCMs at once all refresh the same files, and a shared
    temporary name made one create's rename fail after another's (found by
    eight guests booted at once in the lab)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _check_value(value: str, what: str) -> str:
    if not value or any(ch in value for ch in "\n\r\0") or value != value.strip():
        raise exception.InvalidInput(reason="%s %r is not usable in a swtpm config" % (what, value))
    return value


def ensure_config(localca_dir: Path, *, localca_binary: str = "swtpm_localca",
                  active_pcr_banks: str = "sha256") -> Path:
    """Create (or refresh) the config files; return the swtpm_setup.conf path.

    Idempotent: the CA material in ``<localca_dir>/ca`` is never touched, so
    calling it again keeps the same CA.
    """
    localca_dir = Path(localca_dir)
    if not localca_dir.is_absolute():
        raise exception.InvalidInput(reason="localca_dir %s must be absolute" % localca_dir)
    tool = shutil.which(localca_binary)
    if tool is None:
        raise exception.InvalidInput(reason="%s not found in PATH" % localca_binary)
    _check_value(str(localca_dir), "localca_dir")
    _check_value(active_pcr_banks, "active_pcr_banks")
    ca_dir = localca_dir / CA_SUBDIR
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(localca_dir / LOCALCA_CONF,
           "statedir = %(d)s\n"
           "signingkey = %(d)s/signkey.pem\n"
           "issuercert = %(d)s/issuercert.pem\n"
           "certserial = %(d)s/certserial\n" % {"d": ca_dir})
    _write(localca_dir / LOCALCA_OPTIONS,
           "--platform-manufacturer %s\n--platform-version %s\n--platform-model %s\n"
           % (PLATFORM_MANUFACTURER, PLATFORM_VERSION, PLATFORM_MODEL))
    setup_conf = localca_dir / SETUP_CONF
    _write(setup_conf,
           "create_certs_tool = %s\n"
           "create_certs_tool_config = %s\n"
           "create_certs_tool_options = %s\n"
           "active_pcr_banks = %s\n"
           % (tool, localca_dir / LOCALCA_CONF, localca_dir / LOCALCA_OPTIONS, active_pcr_banks))
    return setup_conf


def issuer_cert(localca_dir: Path) -> Path:
    """Path of this agent's local CA certificate (exists after the first EK cert)."""
    return Path(localca_dir) / CA_SUBDIR / "issuercert.pem"
