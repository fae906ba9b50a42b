"""The control-channel proxy between one VM's QEMU and its swtpm.

Why a process of its own, run as the swtpm's uid: QEMU connects once for
the VM's life and never reconnects, so the proxy must outlive agent
restarts and upgrades, as swtpm does; and it parses what QEMU sends, so it
gets no more privilege than the swtpm it fronts. What passes is decided by
``ctrlpolicy`` (pure); this module only moves bytes and file descriptors
(QEMU hands swtpm its TPM data channel through SET_DATAFD with
SCM_RIGHTS; guest TPM commands then go straight to swtpm, never through
here) and writes the record the agent reads (``read_record``).

The agent binds the listening socket (owner and mode set before QEMU can
see it) and passes it in; the proxy exits when its swtpm does (a pidfd),
and tells the agent it is ready by exiting its first process once the
record exists (``--daemon``).

Run: ``python -m vtpcm_agent.swtpm.ctrlproxy --listen-fd N --upstream PATH
--swtpm-pid PID --record PATH [--daemon]``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vtpcm_agent.swtpm import ctrlpolicy
from vtpcm_agent.swtpm.framing import MAX_BLOB_SIZE

MODULE = "vtpcm_agent.swtpm.ctrlproxy"
MAX_RECORD_BYTES = 64 * 1024
_CHUNK = 65536
_MAX_FDS = 4


def _log(message: str) -> None:
    """One line to stderr (the swtpm's per-VM log): never blob bytes."""
    sys.stderr.write("%s ctrlproxy[%d]: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                  os.getpid(), message))
    sys.stderr.flush()


def write_record(path: Path, policy: ctrlpolicy.Policy, swtpm_pid: int) -> None:
    """Replace the record atomically (a reader sees the old or the new one)."""
    data = dict(policy.record(swtpm_pid), proxy_pid=os.getpid())
    tmp = path.with_name(".%s.%d.tmp" % (path.name, os.getpid()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(data, sort_keys=True).encode("ascii"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _SwtpmGone(Exception):
    pass


class Relay:
    """One client connection relayed to swtpm under ``policy``."""

    def __init__(self, client: socket.socket, upstream: socket.socket,
                 policy: ctrlpolicy.Policy, pidfd: int, on_change: Callable[[], None],
                 max_blob: int = MAX_BLOB_SIZE) -> None:
        self.client = client
        self.upstream = upstream
        self.policy = policy
        self.pidfd = pidfd
        self.on_change = on_change
        self.max_blob = max_blob
        self._buffer = bytearray()
        self._fds: list[int] = []

    def run(self) -> None:
        """Until either side closes; raises _SwtpmGone when swtpm exited."""
        try:
            while True:
                watched = [self.client.fileno(), self.upstream.fileno(), self.pidfd]
                ready, _, _ = select.select(watched, [], [])
                if self.pidfd in ready:
                    raise _SwtpmGone()
                if self.upstream.fileno() in ready:
                    chunk = self.upstream.recv(_CHUNK)
                    if not chunk:
                        _log("swtpm closed the control channel")
                        return
                    changes = self.policy.changes
                    self.policy.on_reply(chunk)
                    # recorded before the client sees the reply: by the time
                    # QEMU goes on (and Nova asks for the commit), the
                    # record holds what it did
                    if changes != self.policy.changes:
                        self.on_change()
                    self.client.sendall(chunk)
                    self._pump_requests()
                if self.client.fileno() in ready:
                    data, fds, _, _ = socket.recv_fds(self.client, _CHUNK, _MAX_FDS)
                    # at most the one SET_DATAFD passes on: close the rest at
                    # once (a client must not fill the proxy's fd table)
                    for fd in fds:
                        if self._fds:
                            os.close(fd)
                        else:
                            self._fds.append(fd)
                    if not data:
                        return
                    self._buffer += data
                    if len(self._buffer) > 2 * self.max_blob:
                        raise ctrlpolicy.Malformed("more than %d bytes sent ahead"
                                                   % (2 * self.max_blob))
                    self._pump_requests()
        finally:
            changes = self.policy.changes
            self.policy.disconnected()
            if changes != self.policy.changes:
                self.on_change()
            self._close_fds()

    def _pump_requests(self) -> None:
        """Forward or refuse complete requests, one in flight at a time."""
        while not self.policy.awaiting():
            request, used = ctrlpolicy.frame(self._buffer, max_blob=self.max_blob)
            if request is None:
                return
            del self._buffer[:used]
            changes = self.policy.changes
            decision = self.policy.decide(request)
            if isinstance(decision, ctrlpolicy.Refuse):
                _log("refused %s: %s" % (request.op.name, decision.reason))
                if changes != self.policy.changes:
                    self.on_change()
                self.client.sendall(decision.reply)
                self._close_fds()
                continue
            if request.op is ctrlpolicy.Op.SET_DATAFD and self._fds:
                socket.send_fds(self.upstream, [request.raw], self._fds[:1])
            else:
                self.upstream.sendall(request.raw)
            self._close_fds()
            if changes != self.policy.changes:  # the first INIT
                self.on_change()

    def _close_fds(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def serve(listener: socket.socket, upstream_path: str, swtpm_pid: int, pidfd: int,
          record: Path, policy: ctrlpolicy.Policy, max_blob: int = MAX_BLOB_SIZE) -> int:
    """Accept QEMU's connections until swtpm exits."""
    def changed() -> None:
        try:
            write_record(record, policy, swtpm_pid)
        except OSError as exc:
            _log("cannot write the record %s: %s" % (record, exc.strerror))

    while True:
        ready, _, _ = select.select([listener.fileno(), pidfd], [], [])
        if pidfd in ready:
            _log("swtpm pid %d exited; stopping" % swtpm_pid)
            return 0
        try:
            client, _ = listener.accept()
        except OSError as exc:
            _log("accept failed: %s" % exc.strerror)
            continue
        with client:
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(upstream_path)
            except OSError as exc:
                _log("cannot reach swtpm at %s: %s" % (upstream_path, exc.strerror))
                upstream.close()
                continue
            _log("client connected")
            try:
                with upstream:
                    Relay(client, upstream, policy, pidfd, changed, max_blob).run()
            except _SwtpmGone:
                _log("swtpm pid %d exited; stopping" % swtpm_pid)
                return 0
            except ctrlpolicy.Malformed as exc:
                _log("closing the client: %s" % exc)
            except OSError as exc:
                _log("connection ended: %s" % (exc.strerror or exc))
            _log("client disconnected")


def read_record(path: Path) -> dict[str, object] | None:
    """The proxy's record, or None if there is none. The file lives in the
    swtpm uid's directory: never followed if a link, bounded, and checked
    field by field (ValueError names what is wrong)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("the proxy record is not a regular file")
        data = os.read(fd, MAX_RECORD_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError("the proxy record is larger than %d bytes" % MAX_RECORD_BYTES)
    try:
        record = json.loads(data)
    except ValueError:
        raise ValueError("the proxy record is not JSON") from None
    _check_record(record)
    checked: dict[str, object] = record
    return checked


def _check_record(record: object) -> None:
    if not isinstance(record, dict) or record.get("version") != ctrlpolicy.RECORD_VERSION:
        raise ValueError("the proxy record has no known version")
    for key in ("swtpm_pid", "proxy_pid", "refused_count"):
        if not isinstance(record.get(key), int) or isinstance(record.get(key), bool):
            raise ValueError("the proxy record's %s is not a number" % key)
    for key in ("started", "closed"):
        if not isinstance(record.get(key), bool):
            raise ValueError("the proxy record's %s is not a boolean" % key)
    for key in ("refused", "failed"):
        value = record.get(key)
        if (not isinstance(value, list) or len(value) > ctrlpolicy.MAX_REASONS
                or not all(isinstance(v, str) and len(v) <= 300 and v.isprintable()
                           for v in value)):
            raise ValueError("the proxy record's %s is not a list of reasons" % key)
    for key in ("got", "set"):
        blobs = record.get(key)
        if not isinstance(blobs, dict):
            raise ValueError("the proxy record's %s is not a mapping" % key)
        for blob_type, seen in blobs.items():
            if blob_type not in ("1", "2", "3"):
                raise ValueError("the proxy record names blob type %r" % blob_type[:8])
            if (not isinstance(seen, list) or len(seen) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool)
                               and 0 <= v < 2**32 for v in seen[:2])
                    or not isinstance(seen[2], str) or len(seen[2]) != 64
                    or any(c not in "0123456789abcdef" for c in seen[2])):
                raise ValueError("the proxy record's %s entry for type %s is malformed"
                                 % (key, blob_type))


def drop_to(uid: int, gid: int) -> None:
    """Become ``uid``:``gid`` for good (no other groups) once everything is
    imported and the pidfd is open: the interpreter and the agent's code
    need not be readable by the swtpm uid (a venv under a private home)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(1, "the ids did not change")


class Args:
    """The proxy's command line (only the agent writes it: no argparse,
    whose import alone took a tenth of the proxy's start)."""

    def __init__(self, argv: list[str]) -> None:
        self.listen_fd = -1
        self.upstream = ""
        self.swtpm_pid = -1
        self.record = Path()
        self.max_blob = MAX_BLOB_SIZE
        self.run_as: tuple[int, int] | None = None
        self.closed = self.daemon = False
        words = iter(argv)
        for word in words:
            if word == "--listen-fd":
                self.listen_fd = int(next(words))
            elif word == "--upstream":
                self.upstream = next(words)
            elif word == "--swtpm-pid":
                self.swtpm_pid = int(next(words))
            elif word == "--record":
                self.record = Path(next(words))
            elif word == "--max-blob":
                self.max_blob = int(next(words))
            elif word == "--run-as":
                self.run_as = (int(next(words)), int(next(words)))
            elif word == "--closed":
                self.closed = True
            elif word == "--daemon":
                self.daemon = True
            else:
                raise ValueError("unknown argument %r" % word[:40])
        if self.listen_fd < 0 or not self.upstream or self.swtpm_pid <= 0 \
                or not str(self.record) or str(self.record) == ".":
            raise ValueError("--listen-fd, --upstream, --swtpm-pid and --record are needed")


def main(argv: list[str] | None = None) -> int:
    try:
        args = Args(sys.argv[1:] if argv is None else argv)
    except (ValueError, StopIteration) as exc:
        _log("bad command line: %s" % (str(exc) or "an option lacks its value"))
        return 2
    listener = socket.socket(fileno=args.listen_fd)
    try:
        pidfd = os.pidfd_open(args.swtpm_pid)
    except OSError as exc:
        _log("swtpm pid %d: %s" % (args.swtpm_pid, exc.strerror))
        return 1
    if args.run_as is not None:
        try:
            drop_to(*args.run_as)
        except OSError as exc:
            _log("cannot run as uid %d gid %d: %s" % (*args.run_as, exc.strerror))
            return 1
    policy = ctrlpolicy.Policy(closed=args.closed)
    ready_r, ready_w = os.pipe() if args.daemon else (-1, -1)
    if args.daemon and os.fork() != 0:
        # the first process exits once the proxy is ready (its record
        # written), so the agent's wait for it is the readiness check and
        # leaves no zombie behind
        os.close(ready_w)
        ok = os.read(ready_r, 1) == b"1"
        return 0 if ok else 1
    if args.daemon:
        os.close(ready_r)
        os.setsid()
    try:
        write_record(args.record, policy, args.swtpm_pid)
    except OSError as exc:
        _log("cannot write the record %s: %s" % (args.record, exc.strerror))
        return 1
    if args.daemon:
        os.write(ready_w, b"1")
        os.close(ready_w)
    return serve(listener, args.upstream, args.swtpm_pid, pidfd, args.record, policy,
                 args.max_blob)


if __name__ == "__main__":
    sys.exit(main())
