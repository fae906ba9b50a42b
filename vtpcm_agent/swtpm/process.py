"""swtpm process management, detached from the agent.

Why detached: the agent may be restarted or SIGTERMed while guests run; a
guest's TPM must not notice. swtpm is started with ``--daemon`` (it forks,
calls setsid and forks again; the launched process exits only once the
grandchild wrote its pid file, opened its sockets and read its keys, with
the grandchild's exit status on failure). So the agent never owns the
running swtpm as a child: no zombies to reap, no signal propagation, and
``find_running`` re-adopts it after an agent restart.

Keys reach swtpm through pipes (``fd=N``, pass_fds), never argv or files.
The swtpm log level stays at 1: level 2 and above hex-dump control channel
commands (state blobs) and higher levels TPM commands.

Privilege separation: with ``run_as`` the agent starts swtpm as that
unprivileged uid and gid, without supplementary groups (the uid is the
instance's own, ``[agent] swtpm_uid_range``), then gives its sockets to the
configured owner and group as root. swtpm 0.7.1's ``--runas`` cannot do this:
it needs a passwd entry (a bare number fails without a message) and drops
privileges before it binds its sockets. ``--seccomp action=kill`` is
always passed (libseccomp also sets no_new_privs, checked in /proc).

Data socket: optional, for tests/tools that speak TPM commands through
tpm2-tss's ``swtpm:path=<data_socket>`` TCTI, which requires the control
socket at ``<data_socket>.ctrl``; so when a data socket is wanted the caller
sets ``ctrl_socket = data_socket + ".ctrl"`` (``SwtpmPaths.for_data_socket``).
QEMU needs no data socket: it passes its own through SET_DATAFD.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from oslo_log import log as logging

from vtpcm_agent.swtpm import ctrl, fstree, uidprocs
from vtpcm_agent.swtpm.keypipe import key_pipe
from vtpcm_common import exception, spans

LOG = logging.getLogger(__name__)

KEY_SIZE = 32  # aes-256-cbc, binary
MAX_UNIX_PATH = 107
LOG_LEVEL = 1
_POLL = 0.02


@dataclasses.dataclass(frozen=True)
class SwtpmPaths:
    """Where one vTPCM's swtpm keeps its state and sockets (absolute paths)."""

    state_dir: Path
    ctrl_socket: Path
    pid_file: Path
    log_file: Path
    data_socket: Path | None = None

    @classmethod
    def for_data_socket(cls, state_dir: Path, data_socket: Path, pid_file: Path,
                        log_file: Path) -> SwtpmPaths:
        """Paths usable with the ``swtpm:path=<data_socket>`` TCTI."""
        return cls(Path(state_dir), Path(str(data_socket) + ".ctrl"), Path(pid_file),
                   Path(log_file), Path(data_socket))

    def validate(self) -> None:
        for name in ("state_dir", "ctrl_socket", "pid_file", "log_file", "data_socket"):
            value = getattr(self, name)
            if value is None:
                continue
            if not Path(value).is_absolute():
                raise exception.InvalidInput(reason="%s %s must be absolute" % (name, value))
            if "," in str(value):
                raise exception.InvalidInput(reason="%s %s must not contain ','" % (name, value))
        for name in ("ctrl_socket", "data_socket"):
            value = getattr(self, name)
            if value is not None and len(os.fsencode(str(value))) > MAX_UNIX_PATH:
                raise exception.InvalidInput(reason="%s %s is longer than %d bytes"
                                             % (name, value, MAX_UNIX_PATH))




def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise exception.InvalidInput(reason="%s must be %d bytes" % (what, KEY_SIZE))


def build_command(paths: SwtpmPaths, key_fd: int, migration_key_fd: int, *,
                  socket_mode: int = 0o660, socket_uid: int | None = None,
                  socket_gid: int | None = None, swtpm_binary: str = "swtpm",
                  startup_clear: bool = False) -> list[str]:
    """The swtpm argv: paths and fd numbers only, never a key.

    ``socket_uid``/``socket_gid`` go to swtpm's own chown (it runs as root);
    an unprivileged swtpm gets neither, the agent chowns after the start."""
    ctrl_opt = "type=unixio,path=%s,mode=0%o" % (paths.ctrl_socket, socket_mode)
    if socket_uid is not None:
        ctrl_opt += ",uid=%d" % socket_uid
    if socket_gid is not None:
        ctrl_opt += ",gid=%d" % socket_gid
    cmd = [swtpm_binary, "socket", "--tpm2", "--daemon",
           "--tpmstate", "dir=%s,mode=0600" % paths.state_dir,
           "--ctrl", ctrl_opt,
           "--key", "fd=%d,mode=aes-256-cbc,format=binary" % key_fd,
           "--migration-key", "fd=%d,mode=aes-256-cbc,format=binary" % migration_key_fd,
           "--pid", "file=%s" % paths.pid_file,
           "--log", "file=%s,level=%d" % (paths.log_file, LOG_LEVEL),
           "--seccomp", "action=kill"]
    if paths.data_socket is not None:
        server_opt = "type=unixio,path=%s,mode=0%o" % (paths.data_socket, socket_mode)
        if socket_uid is not None:
            server_opt += ",uid=%d" % socket_uid
        if socket_gid is not None:
            server_opt += ",gid=%d" % socket_gid
        cmd += ["--server", server_opt]
    if startup_clear:
        cmd += ["--flags", "startup-clear"]
    return cmd


# --------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------

PID_FILE_MAX = 32  # bytes: a pid and a newline, with room to spare


def owner(paths: SwtpmPaths) -> int:
    """The uid that swtpm of ``paths`` runs as: its state dir's owner (the
    VM's uid after ``isolation.hand_over``, else the agent's)."""
    try:
        return os.lstat(paths.state_dir).st_uid
    except FileNotFoundError:
        return os.geteuid()


def _read_pid(paths: SwtpmPaths) -> int | None:
    """The pid in swtpm's pid file, read without trusting the file.

    The file sits in a directory of the VM's uid: a symlink to /dev/zero or
    a FIFO there must neither exhaust the agent's memory nor block it. So:
    no links followed, no blocking open, a regular file of the swtpm's
    owner only, at most PID_FILE_MAX bytes."""
    try:
        fd = os.open(paths.pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        LOG.warning("swtpm pid file %(file)s not read: %(err)s",
                    {"file": str(paths.pid_file), "err": exc.strerror})
        return None
    try:
        st = os.fstat(fd)
        want = owner(paths)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != want:
            LOG.warning("swtpm pid file %(file)s is not a regular file of uid %(uid)d; "
                        "ignored", {"file": str(paths.pid_file), "uid": want})
            return None
        raw = os.read(fd, PID_FILE_MAX)
    finally:
        os.close(fd)
    text = raw.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() and int(text) > 1 else None


def _proc_state(pid: int) -> str | None:
    """Process state letter from /proc, None if the pid does not exist."""
    try:
        with open("/proc/%d/stat" % pid, encoding="ascii", errors="replace") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data.rpartition(")")[2].split()
    return fields[0] if fields else None


CMDLINE_MAX = 64 * 1024  # swtpm's own argv is under 2 KiB


def _cmdline(pid: int) -> list[str]:
    """pid's argv, read up to CMDLINE_MAX: any local user's process may
    carry megabytes of arguments, and reading them costs the reader."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            raw = fh.read(CMDLINE_MAX)
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [os.fsdecode(arg) for arg in raw.split(b"\0") if arg]


def _is_our_swtpm(pid: int, paths: SwtpmPaths) -> bool:
    """pid runs swtpm on this state dir and control socket, as the state
    dir's owner (guards pid reuse and a pid file pointing elsewhere)."""
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    uids = uidprocs.uids_of(pid)
    if uids is None or set(uids) != {owner(paths)}:
        return False  # not the swtpm of this state dir's owner (a planted pid)
    # the argv last, and bounded: only the owner's processes get that far
    argv = _cmdline(pid)
    if not argv or os.path.basename(argv[0]) != "swtpm" or "socket" not in argv:
        return False
    want_state = "dir=%s," % paths.state_dir
    want_ctrl = "path=%s," % paths.ctrl_socket
    return (any(arg.startswith(want_state) for arg in argv)
            and any(want_ctrl in arg + "," for arg in argv))


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def is_alive(pid: int, paths: SwtpmPaths) -> bool:
    """The swtpm of ``paths`` runs as ``pid`` and its control socket exists.

    A crashed swtpm (process gone or zombie, socket left stale) is not alive.
    Does not connect: QEMU may hold the single control connection.
    """
    return _is_our_swtpm(pid, paths) and _is_socket(paths.ctrl_socket)


def owns(pid: int, paths: SwtpmPaths) -> bool:
    """pid is a swtpm process on ``paths`` (alive or not reachable by its socket)."""
    return _is_our_swtpm(pid, paths)


def left_behind(paths: SwtpmPaths) -> bool:
    """A swtpm that is not running left its pid file or socket: it crashed.

    swtpm removes both when it exits cleanly (CMD_SHUTDOWN, SIGTERM); a
    SIGKILL or a crash leaves them (checked with swtpm 0.7.1)."""
    return paths.pid_file.exists() or _is_socket(paths.ctrl_socket)


def socket_in_use(path: Path) -> bool:
    """Something accepts connections on the unix socket ``path``.

    For a swtpm that died, its socket file is left behind but nobody
    listens (connection refused). A process listening there is someone
    else's: its socket must not be unlinked under it. See ``socket_server``."""
    return socket_server(path) is not None


def socket_server(path: Path) -> tuple[int, int] | None:
    """(pid, uid) of the process that accepts connections on the unix
    socket at ``path`` itself (SO_PEERCRED), None if nobody does.

    ``path`` may sit in a swtpm uid's own directory, so (as the agent's
    other root connects) it is checked with lstat and never followed: a
    symlink or anything else that is not a socket is served by nobody here
    (the root agent must not connect to whatever socket a uid points it at),
    and the answer names who serves it."""
    try:
        # O_PATH|O_NOFOLLOW pins the entry itself; connecting through its
        # /proc/self/fd link reaches that very inode, so a swap after the
        # check cannot redirect the connect
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        sock.settimeout(1.0)
        try:
            sock.connect("/proc/self/fd/%d" % fd)
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                   struct.calcsize("3i"))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError:
            return (0, -1)  # e.g. a full backlog: someone listens, unknown who
    finally:
        sock.close()
        os.close(fd)
    pid, uid, _gid = struct.unpack("3i", cred)
    return pid, uid


def find_running(paths: SwtpmPaths) -> int | None:
    """Pid of a live swtpm serving ``paths``, for re-adoption after a restart."""
    pid = _read_pid(paths)
    if pid is None or not is_alive(pid, paths):
        return None
    return pid


# --------------------------------------------------------------------------
# Start / stop
# --------------------------------------------------------------------------

def _remove_runtime_files(paths: SwtpmPaths) -> None:
    for path in (paths.ctrl_socket, paths.data_socket, paths.pid_file):
        if path is None:
            continue
        try:
            if path.is_symlink() or path.exists():
                path.unlink()
        except FileNotFoundError:
            pass


def _log_tail(paths: SwtpmPaths, limit: int = 600) -> str:
    """The last ``limit`` bytes of swtpm's log, for an error message.

    The log is the swtpm uid's file: it may be a symlink, a FIFO or a
    sparse file of any size, so only a regular file is read and only its
    tail (review round 2 of isofix, MEDIUM 2)."""
    try:
        fd = os.open(paths.log_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"(swtpm log unreadable: {exc.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "(swtpm log is not a regular file)"
        data = os.pread(fd, limit, max(0, st.st_size - limit))
    except OSError as exc:
        return f"(swtpm log unreadable: {exc.strerror})"
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace").strip()


_UNCHANGED_IDS = frozenset({4294967295, 65535})


@dataclasses.dataclass(frozen=True)
class RunAs:
    """The unprivileged identity one swtpm runs as (no supplementary groups)."""

    uid: int
    gid: int

    def __post_init__(self) -> None:
        if self.uid <= 0 or self.gid <= 0:
            raise exception.InvalidInput(reason="swtpm must not run as uid or gid 0")
        if {self.uid, self.gid} & _UNCHANGED_IDS:
            # setresuid/setgroups/fchown read -1 as "leave unchanged": root
            raise exception.InvalidInput(reason="swtpm must not run as uid or gid "
                                                "4294967295 or 65535 ((uid_t)-1)")


@spans.timed("swtpm:start")
def start(paths: SwtpmPaths, at_rest_key: bytes, migration_key: bytes, *,
          socket_mode: int = 0o660, socket_uid: int | None = None,
          socket_gid: int | None = None, swtpm_binary: str = "swtpm",
          startup_clear: bool = False, timeout: float = 10.0,
          run_as: RunAs | None = None) -> int:
    """Start a detached swtpm for ``paths``; return its pid once it is usable.

    Usable = pid file and control socket exist and GET_CONFIG reports both
    keys active. Refuses to start a second swtpm on the same paths.
    Without ``startup_clear`` the TPM waits for INIT (QEMU sends it).
    With ``run_as`` swtpm runs as that uid/gid: its state dir, log file and
    socket directory must be its own (the caller prepares them); its sockets
    then go to ``socket_uid``/``socket_gid`` (unset: ``run_as``'s).
    """
    _check_key(at_rest_key, "at-rest key")
    _check_key(migration_key, "migration key")
    if at_rest_key == migration_key:
        raise exception.InvalidInput(reason="at-rest and migration keys must differ")
    paths.validate()
    if timeout <= 0:
        raise exception.InvalidInput(reason="timeout must be positive")
    if not paths.state_dir.is_dir():
        raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                   reason="state dir %s does not exist" % paths.state_dir)
    running = find_running(paths)
    if running is not None:
        raise exception.AlreadyExists(what="swtpm for state dir", key="%s (pid %d)"
                                      % (paths.state_dir, running))
    _remove_runtime_files(paths)  # stale leftovers of a crashed swtpm

    deadline = time.monotonic() + timeout
    started = time.monotonic()
    key_fd = key_pipe(at_rest_key)
    try:
        mig_fd = key_pipe(migration_key)
        try:
            own = run_as is None
            cmd = build_command(paths, key_fd, mig_fd, socket_mode=socket_mode,
                                socket_uid=socket_uid if own else None,
                                socket_gid=socket_gid if own else None,
                                swtpm_binary=swtpm_binary, startup_clear=startup_clear)
            _launch(cmd, (key_fd, mig_fd), paths, deadline, run_as)
        finally:
            os.close(mig_fd)
    finally:
        os.close(key_fd)

    pid = _read_pid(paths)
    if pid is None or not is_alive(pid, paths):
        raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                   reason="swtpm reported ready but is not running: %s"
                                   % _log_tail(paths))
    try:
        if run_as is not None:
            _give_sockets(paths, run_as.uid if socket_uid is None else socket_uid,
                          run_as.gid if socket_gid is None else socket_gid)
        _wait_config(paths, deadline)
    except exception.SwtpmError:
        stop(pid, paths, timeout=max(deadline - time.monotonic(), 2.0))
        raise
    LOG.info("Started swtpm pid %(pid)d for %(dir)s in %(t).3fs",
             {"pid": pid, "dir": str(paths.state_dir), "t": time.monotonic() - started})
    return pid


def _give_sockets(paths: SwtpmPaths, uid: int, gid: int) -> None:
    """Hand an unprivileged swtpm's sockets to their client's owner/group.

    Until then they belong to the swtpm's own uid and gid only (swtpm set
    ``mode`` itself), so the moment between bind and chown opens nothing.
    lchown: a symlink put in a socket's place changes only the link."""
    for path in (paths.ctrl_socket, paths.data_socket):
        if path is None:
            continue
        if not _is_socket(path):
            raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                       reason="%s is not a socket" % path)
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except OSError as exc:
            raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                       reason="cannot chown %s: %s"
                                       % (path, exc.strerror)) from None


def _launch(cmd: list[str], fds: tuple[int, int], paths: SwtpmPaths, deadline: float,
            run_as: RunAs | None = None) -> None:
    identity: dict[str, object] = {}
    if run_as is not None:
        identity = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
    try:
        proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL,  # type: ignore[call-overload]
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, **identity)
    except OSError as exc:
        raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                   reason="cannot run %s: %s" % (cmd[0], exc.strerror)) from None
    try:
        _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        _give_up(proc, paths)
        raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                   reason="swtpm did not become ready in time") from None
    if proc.returncode != 0:
        detail = (err.decode("utf-8", "replace").strip() + " " + _log_tail(paths)).strip()
        _remove_runtime_files(paths)
        raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                   reason="swtpm exited with %d: %s"
                                   % (proc.returncode, detail[-600:]))


def _give_up(proc: subprocess.Popen[bytes], paths: SwtpmPaths) -> None:
    """A launcher past its deadline, and every swtpm it forked, gone within
    ~10 s, with what they wrote.

    Its daemon may not have written its pid file yet (swtpm writes it late),
    and holds stderr: so the daemon is found by what it runs (this state dir
    and control socket), once now and once after the launcher's end, and
    the launcher's own end is waited for within a bound (an unbounded
    communicate() kept the RPC worker for as long as the daemon lived)."""
    with contextlib.suppress(ProcessLookupError):
        # the launcher's group (start_new_session): a child not yet setsid'd;
        # the pid is not reused while the launcher is not waited for
        os.killpg(proc.pid, signal.SIGKILL)
    # each step on its own: one that fails (EMFILE, a directory where a
    # runtime file should be) must not skip the others; the caller gets
    # the timeout, not these
    _cleanup_step(paths, "sweep", lambda: _kill_ours(paths))
    end_killed(proc, "swtpm launcher for %s" % paths.state_dir)
    _cleanup_step(paths, "second sweep", lambda: _kill_ours(paths))
    _cleanup_step(paths, "runtime files", lambda: _remove_runtime_files(paths))


def end_killed(proc: subprocess.Popen[bytes] | subprocess.Popen[str], what: str) -> None:
    """The end of a process just SIGKILLed, waited for within ~10 s: a child
    that left its session may hold its output pipe for as long as it lives,
    so after 5 s the pipes are closed and only the process is waited for."""
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            LOG.warning("%(what)s (pid %(pid)d) did not end after SIGKILL",
                        {"what": what, "pid": proc.pid})


def _cleanup_step(paths: SwtpmPaths, what: str, step: Callable[[], None]) -> None:
    try:
        step()
    except OSError as exc:
        LOG.warning("swtpm start for %(dir)s: %(what)s after its timeout failed: %(err)s",
                    {"dir": str(paths.state_dir), "what": what,
                     "err": exc.strerror or type(exc).__name__})


def _kill_ours(paths: SwtpmPaths) -> None:
    """SIGKILL every process that runs swtpm on ``paths`` (pidfd-pinned)."""
    for name in os.listdir("/proc"):
        if name.isdigit() and _is_our_swtpm(int(name), paths):
            LOG.warning("swtpm pid %(pid)s for %(dir)s missed its start's deadline; killed",
                        {"pid": name, "dir": str(paths.state_dir)})
            _signal(int(name), paths, signal.SIGKILL)


def _wait_config(paths: SwtpmPaths, deadline: float) -> None:
    want = ctrl.CONFIG_FLAG_FILE_KEY | ctrl.CONFIG_FLAG_MIGRATION_KEY
    last = "control socket never answered"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                       reason="swtpm not ready: %s" % last)
        try:
            with ctrl.CtrlClient(paths.ctrl_socket, timeout=min(remaining, 2.0),
                                 peer_uid=owner(paths)) as client:
                flags = client.get_config()
        except exception.CtrlChannelError as exc:
            last = exc.message
            time.sleep(_POLL)
            continue
        if flags != want:
            raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                       reason="swtpm config flags 0x%x, expected 0x%x (keys "
                                       "not active)" % (flags, want))
        return


def _exiting(pid: int, paths: SwtpmPaths) -> bool:
    """pid is past its last instruction but not yet a zombie: its command
    line is already gone (its memory was released), its uids are still the
    swtpm's. Waited for, so that nothing of the uid is left after stop()."""
    state = _proc_state(pid)
    return (state is not None and state not in ("Z", "X")
            and uidprocs.uids_of(pid) == (owner(paths),) * 4 and not _cmdline(pid))


def _wait_gone(pid: int, paths: SwtpmPaths, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_our_swtpm(pid, paths) or _exiting(pid, paths):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _signal(pid: int, paths: SwtpmPaths, signum: signal.Signals) -> None:
    """Signal pid only if it is still our swtpm (pidfd: no reuse race)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if _is_our_swtpm(pid, paths):
            signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def stop(pid: int, paths: SwtpmPaths, timeout: float = 10.0) -> None:
    """Stop the swtpm: CMD_SHUTDOWN, then SIGTERM, then SIGKILL.

    Each step gets a third of ``timeout``. Stale socket and pid files are
    removed. Raises SwtpmError if the process survives SIGKILL.
    """
    step = max(timeout / 3.0, 0.1)
    if _is_our_swtpm(pid, paths):
        if _is_socket(paths.ctrl_socket):
            try:
                with ctrl.CtrlClient(paths.ctrl_socket, timeout=min(step, 2.0),
                                     peer_uid=owner(paths)) as client:
                    client.shutdown()
            except exception.CtrlChannelError as exc:
                LOG.warning("swtpm pid %(pid)d: CMD_SHUTDOWN failed (%(err)s); signalling",
                            {"pid": pid, "err": exc.message})
        for signum in (None, signal.SIGTERM, signal.SIGKILL):
            if signum is not None:
                LOG.warning("swtpm pid %(pid)d still running; sending %(sig)s",
                            {"pid": pid, "sig": signum.name})
                _signal(pid, paths, signum)
            if _wait_gone(pid, paths, step):
                break
        else:
            raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                       reason="swtpm pid %d survived SIGKILL" % pid)
    _remove_runtime_files(paths)
    LOG.info("Stopped swtpm pid %(pid)d for %(dir)s", {"pid": pid, "dir": str(paths.state_dir)})


def remove_state(paths: SwtpmPaths) -> None:
    """Delete the state directory (key destruction is the key store's job).

    The caller stopped the swtpm it started (``InstanceManager._kill``).
    Whatever else runs as the swtpm uid is a survivor, not a reason to
    refuse: a pid file, socket or argv it fakes is not looked at (review
    round 3 of the sweep, MEDIUM 1). Each directory is taken from the uid
    (root's, 0700) before it is emptied, so a survivor cannot refill it
    (MEDIUM 2); a failure is a SwtpmError naming the path."""
    _remove_runtime_files(paths)
    if paths.state_dir.is_symlink():
        raise exception.InvalidInput(reason="state dir %s is a symlink" % paths.state_dir)
    try:
        # iterative: a deep tree the uid built must not stop it
        fstree.remove(paths.state_dir, seize=True)
    except OSError as exc:
        raise exception.SwtpmError(
            vtpcm_id=paths.state_dir.name,
            reason="state dir %s not removed (%s)" % (paths.state_dir, exc.strerror or exc),
        ) from None
    remove_log(paths)
    LOG.info("Removed swtpm state %(dir)s", {"dir": str(paths.state_dir)})


def remove_log(paths: SwtpmPaths) -> None:
    """Remove the vTPCM's swtpm log: it is owned by the swtpm's uid, and a
    uid is given to another VM once freed, which could then read it, or
    keep writing through it (a link is removed as a link)."""
    fstree.remove(paths.log_file)
