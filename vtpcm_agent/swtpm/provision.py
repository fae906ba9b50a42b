"""Create a vTPCM's TPM state, encrypted at rest from its first byte.

Why here and not at first start: swtpm's ``--key`` cannot be added to
existing plaintext state, and an EK + certificates must exist before a guest
ever sees the TPM. swtpm_setup gets the at-rest key through a pipe
(``--keyfile-fd``): never in argv, never in a file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from oslo_log import log as logging

from vtpcm_agent.swtpm import ctrl, localca, process
from vtpcm_agent.swtpm.keypipe import key_pipe
from vtpcm_common import exception

LOG = logging.getLogger(__name__)

KEY_SIZE = 32  # aes-256-cbc
PERMANENT_STATE_FILE = "tpm2-00.permall"
_TAIL = 800




def _safe_tail(output: str, key: bytes) -> str:
    """Tail of swtpm_setup's output, with a guard against key material.

    swtpm_setup never reads the key itself (it hands the fd to swtpm) and
    neither prints it; the guard only makes that property not depend on it.
    """
    tail = output[-_TAIL:]
    for needle in (key.hex(), key.hex().upper()):
        if needle in output:
            return "<output withheld: it contained key material>"
    if key.decode("latin-1") in output:
        return "<output withheld: it contained key material>"
    return tail.strip()


def _clear_dir(state_dir: Path, created: bool) -> None:
    if not state_dir.exists():
        return
    if created:
        shutil.rmtree(state_dir)
        return
    for entry in state_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _command(state_dir: Path, key_fd: int, *, create_ek: bool, setup_conf: Path | None,
             binary: str) -> list[str]:
    cmd = [binary, "--tpm2", "--tpmstate", str(state_dir), "--keyfile-fd", str(key_fd),
           "--cipher", "aes-256-cbc", "--lock-nvram", "--not-overwrite"]
    if create_ek:
        cmd += ["--createek", "--create-ek-cert", "--create-platform-cert"]
    if setup_conf is not None:
        cmd += ["--config", str(setup_conf)]
    return cmd


def provision_state(state_dir: Path, at_rest_key: bytes, *, vtpcm_id: str,
                    create_ek: bool = True, localca_dir: Path | None = None,
                    swtpm_setup_binary: str = "swtpm_setup", timeout: float = 60.0) -> None:
    """Manufacture a TPM 2.0 state in ``state_dir``, encrypted with ``at_rest_key``.

    ``localca_dir`` holds this agent's own local CA (see ``localca``); None
    uses the system-wide swtpm_setup configuration. Refuses a directory that
    already holds state. On failure the directory is removed (if this call
    created it) or left empty, and SwtpmError is raised.
    """
    if not isinstance(at_rest_key, bytes) or len(at_rest_key) != KEY_SIZE:
        raise exception.InvalidInput(reason="at-rest key must be %d bytes" % KEY_SIZE)
    if not vtpcm_id:
        raise exception.InvalidInput(reason="vtpcm_id must not be empty")
    state_dir = Path(state_dir)
    if not state_dir.is_absolute():
        raise exception.InvalidInput(reason="state_dir %s must be absolute" % state_dir)
    if timeout <= 0:
        raise exception.InvalidInput(reason="timeout must be positive")
    if state_dir.exists() and (not state_dir.is_dir() or any(state_dir.iterdir())):
        raise exception.SwtpmError(vtpcm_id=vtpcm_id,
                                   reason="state dir %s is not an empty directory" % state_dir)
    setup_conf = localca.ensure_config(localca_dir) if localca_dir is not None else None
    created = not state_dir.exists()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    started = time.monotonic()
    key_fd = key_pipe(at_rest_key.hex().encode("ascii"))  # swtpm_setup passes no format=: hex
    try:
        _run_setup(_command(state_dir, key_fd, create_ek=create_ek, setup_conf=setup_conf,
                            binary=swtpm_setup_binary),
                   key_fd, at_rest_key, vtpcm_id, timeout)
        _check_encrypted(state_dir, vtpcm_id)
    except BaseException:
        _clear_dir(state_dir, created)
        raise
    finally:
        os.close(key_fd)
    LOG.info("Provisioned TPM state of vTPCM %(id)s in %(dir)s (EK: %(ek)s) in %(t).2fs",
             {"id": vtpcm_id, "dir": str(state_dir), "ek": create_ek,
              "t": time.monotonic() - started})


def _run_setup(cmd: list[str], key_fd: int, key: bytes, vtpcm_id: str, timeout: float) -> None:
    try:
        proc = subprocess.Popen(cmd, pass_fds=(key_fd,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace")
    except OSError as exc:
        raise exception.SwtpmError(vtpcm_id=vtpcm_id, reason="cannot run %s: %s"
                                   % (cmd[0], exc.strerror)) from None
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # swtpm_setup runs swtpm and swtpm_localca: kill its whole session.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.end_killed(proc, "swtpm_setup for vTPCM %s" % vtpcm_id)
        raise exception.SwtpmError(vtpcm_id=vtpcm_id,
                                   reason="swtpm_setup timed out after %.0fs" % timeout) from None
    if proc.returncode != 0:
        raise exception.SwtpmError(vtpcm_id=vtpcm_id,
                                   reason="swtpm_setup exited with %d: %s"
                                   % (proc.returncode, _safe_tail(output, key)))


def _check_encrypted(state_dir: Path, vtpcm_id: str) -> None:
    """The state file must exist and carry swtpm's 'encrypted' header flag."""
    path = state_dir / PERMANENT_STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise exception.SwtpmError(vtpcm_id=vtpcm_id,
                                   reason="swtpm_setup created no %s" % PERMANENT_STATE_FILE
                                   ) from None
    try:
        header = ctrl.parse_blob_header(data)
    except exception.InvalidInput as exc:
        raise exception.SwtpmError(vtpcm_id=vtpcm_id, reason=exc.message) from None
    if not header.at_rest_encrypted or not header.flags & ctrl.BLOB_FLAG_ENCRYPTED_256BIT_KEY:
        raise exception.SwtpmError(vtpcm_id=vtpcm_id,
                                   reason="%s is not encrypted with a 256-bit key"
                                   % PERMANENT_STATE_FILE)
