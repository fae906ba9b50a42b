"""Start, find and stop the control-channel proxy of one swtpm (agent side).

Why apart from ``ctrlproxy``: that module is the proxy process and imports
nothing of the agent; this one is what the agent runs to give QEMU a socket
whose owner and mode are right before anyone can connect, and to start the
proxy as the swtpm's uid, detached, so that it outlives the agent.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

from vtpcm_agent.swtpm import ctrlproxy, process
from vtpcm_common import exception

LISTEN_BACKLOG = 4
# where vtpcm_agent is imported from, put first on the proxy's path: it
# starts without site (-S, -E: ~45 ms of .pth files in a venv), so that a
# migration's prepare_incoming waits ~0.1 s for it rather than ~0.2 s
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# isolated (-I: no environment, no user site, no '' on the path): the root
# goes after the standard library, so nothing there shadows it in a
# process that starts as root (review round 7, LOW 3)
_BOOT = ("import sys; sys.path.append(%r); "
         "from vtpcm_agent.swtpm.ctrlproxy import main; sys.exit(main(sys.argv[1:]))")


def _bytecode_options() -> list[str]:
    """What the agent was told about bytecode, which -I would drop."""
    options = ["-B"] if sys.dont_write_bytecode else []
    if sys.pycache_prefix:
        options += ["-X", "pycache_prefix=%s" % sys.pycache_prefix]
    return options


def _bind(public: Path, staging_dir: Path, mode: int, uid: int | None,
          gid: int | None) -> socket.socket:
    """A listening socket at ``public``, its owner and mode set in
    ``staging_dir`` (the agent's own, root-only writable) before it is
    renamed into place: nobody can connect before it is right, and a link
    planted at ``public`` is replaced, never followed."""
    tmp = staging_dir / (".%s.%d.sock" % (public.name, os.getpid()))
    tmp.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(tmp))
        os.chmod(tmp, mode)
        if uid is not None or gid is not None:
            os.chown(tmp, -1 if uid is None else uid, -1 if gid is None else gid,
                     follow_symlinks=False)
        listener.listen(LISTEN_BACKLOG)
        os.replace(tmp, public)
    except OSError:
        listener.close()
        tmp.unlink(missing_ok=True)
        raise
    return listener


def start(public: Path, upstream: Path, swtpm_pid: int, record: Path, *,
          staging_dir: Path, log_file: Path, socket_mode: int = 0o660,
          socket_uid: int | None = None, socket_gid: int | None = None,
          run_as: process.RunAs | None = None, max_blob: int | None = None,
          closed: bool = False, timeout: float = 10.0) -> int:
    """Start the proxy for the swtpm ``swtpm_pid`` serving ``upstream``;
    QEMU connects to ``public``. ``closed``: it lets no state through.
    Returns the proxy's pid once its record is written (SwtpmError naming
    why not otherwise)."""
    vtpcm = upstream.parent.name
    try:
        listener = _bind(public, staging_dir, socket_mode, socket_uid, socket_gid)
    except OSError as exc:
        raise exception.SwtpmError(vtpcm_id=vtpcm, reason="cannot bind the proxy socket "
                                   "%s: %s" % (public, exc.strerror)) from None
    record.unlink(missing_ok=True)
    cmd = [sys.executable, "-I", "-S", *_bytecode_options(), "-c",
           _BOOT % str(_PACKAGE_ROOT),
           "--listen-fd", str(listener.fileno()),
           "--upstream", str(upstream), "--swtpm-pid", str(swtpm_pid),
           "--record", str(record), "--daemon"]
    if max_blob is not None:
        cmd += ["--max-blob", str(max_blob)]
    if closed:
        cmd.append("--closed")
    if run_as is not None:
        # it drops to the uid itself once its imports are done: the uid
        # need not read the interpreter's tree (``ctrlproxy.drop_to``)
        cmd += ["--run-as", str(run_as.uid), str(run_as.gid)]
    log = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        with listener:
            proc = subprocess.Popen(
                cmd, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                cwd="/")
            # a pidfd, not Popen.wait(timeout), whose polling sleeps up to
            # 50 ms at a time: this wait is on a migration's path
            if _wait_exit(proc, timeout):
                code = proc.wait()
            else:
                proc.kill()
                proc.wait()
                code = None
    finally:
        os.close(log)
    found = find(record)
    if code != 0 or found is None:
        if found is not None:
            stop(found, record, timeout=timeout)
        public.unlink(missing_ok=True)
        raise exception.SwtpmError(
            vtpcm_id=vtpcm, reason="the control-channel proxy did not start (%s); see %s"
            % ("timed out" if code is None else "exit %d" % code, log_file))
    return found


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the child exited within ``timeout`` seconds (an unreaped
    child keeps its pid, so its pidfd opens even after it exited)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # no descriptor left: Popen's slower wait, still bounded
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        waiter = select.poll()
        waiter.register(pidfd, select.POLLIN)
        return bool(waiter.poll(timeout * 1000))
    finally:
        os.close(pidfd)


def find(record: Path) -> int | None:
    """The pid of the proxy that wrote ``record``, if it still runs as that
    proxy (its command line names the record)."""
    running = find_with_record(record)
    return None if running is None else running[0]


def find_with_record(record: Path) -> tuple[int, dict[str, object]] | None:
    """``find``'s pid with the record it was read from (one read: the
    caller compares the record's swtpm pid with its own)."""
    try:
        data = ctrlproxy.read_record(record)
    except (OSError, ValueError):
        return None
    if data is None:
        return None
    pid = data["proxy_pid"]
    assert isinstance(pid, int)
    return (pid, data) if _is_proxy(pid, record) else None


def _is_proxy(pid: int, record: Path) -> bool:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            # bounded: the pid comes from a record the swtpm uid can write,
            # and any local process may carry megabytes of arguments
            argv = handle.read(process.CMDLINE_MAX).split(b"\0")
    except OSError:
        return False
    # the shape the agent gives it: "-c", the boot code naming the module,
    # then its own arguments from "--listen-fd" on; the interpreter's
    # options before may vary (-X pycache_prefix=...: review round 8)
    if b"--listen-fd" not in argv:
        return False
    at = argv.index(b"--listen-fd")
    return (at >= 2 and argv[at - 2] == b"-c" and ctrlproxy.MODULE.encode() in argv[at - 1]
            and str(record).encode() in argv[at:])


def stop(pid: int, record: Path, timeout: float = 10.0) -> None:
    """Stop the proxy ``pid`` (it exits with its swtpm by itself; this is
    for a swtpm that stays, or a proxy that did not notice)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # checked through the pidfd: a pid reused after the check is not
        # the process signalled
        if not _is_proxy(pid, record):
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            return
        # poll, not select: the agent's descriptors may be above 1023
        waiter = select.poll()
        waiter.register(pidfd, select.POLLIN)
        if not waiter.poll(timeout * 1000):
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            waiter.poll(timeout * 1000)
    finally:
        os.close(pidfd)
