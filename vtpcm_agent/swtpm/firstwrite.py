"""Capture of the first ``tpm2-00.permall`` an incoming swtpm writes.

Why: the post-import check compares the source's permanent state with what
the destination's swtpm imported (QEMU's SET_STATEBLOB + INIT, which the
agent never sees). swtpm writes its permanent state once for the import
(``TMP2-00.permall`` renamed to ``tpm2-00.permall``), and again, each time
renamed over the last, on every NV write of the guest, which may run as soon
as the import is done (with Clock and DRBG changes after a few seconds). So
what is there at commit time proves nothing: the file must be read as the
swtpm FIRST wrote it.

How: an inotify watch on the (empty) state dir, armed before the incoming
swtpm starts. A thread waits for the first IN_MOVED_TO (or IN_CLOSE_WRITE)
naming the file, reads it (O_NOFOLLOW, at most ``permall.MAX_FILE_SIZE``),
and only THEN drains the queue without blocking. inotify queues an event
when the rename happens, so a second write that landed before our read is
in the queue by the time we drain it: the read is certainly the first write
only if exactly one write event for the name was seen in total and the
queue did not overflow. Otherwise the capture is ambiguous, with a reason.
The bytes are swtpm's at-rest ciphertext, as read (the caller decrypts).

A second import after the capture (QEMU sets the blobs and INITs again
for a duplicated tpm-emulator section of the stream, or QEMU on the
control socket does) would go unseen if the watch ended there, so it goes
on until its vTPCM is committed or goes away. swtpm 0.7.1 opens (and
writes) its storage's ``.lock`` on every SET_STATEBLOB and INIT, an
import's own opens all before its first write of the state, while a
guest's NV write never touches it: an open or write of ``.lock`` after
the captured write supersedes the capture (``SUPERSEDED``). ``sync``
takes in what the queue holds at once, so a check that asks after the
stream was loaded sees every import that ran before it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from oslo_log import log as logging

from vtpcm_agent.swtpm import permall

LOG = logging.getLogger(__name__)

PERMANENT_STATE_FILE = "tpm2-00.permall"
LOCK_FILE = ".lock"  # swtpm's storage lock
SUPERSEDED = ("the swtpm's storage was opened again after the import: a second import, "
              "or a TPM reset, before the check")
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_OPEN = 0x00000020
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
WRITE_EVENTS = IN_CLOSE_WRITE | IN_MOVED_TO
STORAGE_OPENS = IN_OPEN | IN_MODIFY  # of LOCK_FILE: swtpm opened its storage
WATCHED = WRITE_EVENTS | STORAGE_OPENS | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
# bounds a watch whose stop never came: a migration is normally committed
# or aborted within the engine's [migration] timeout (3 h by default), but
# one whose deadline passed after the import waits IN_DOUBT for a signed
# word or an operator, possibly longer than this; its watch then ends and
# the capture is marked as no longer excluding a later import, so a
# commit after it is refused as unverified (fail closed; resolve settles
# it). Before a capture: "no write seen within ..."
WATCH_LIFETIME = 24 * 3600.0
_POLL = 5.0  # seconds between checks of the lifetime (stop wakes the thread at once)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


@dataclasses.dataclass(frozen=True)
class Capture:
    """The first write as read (``data``), or None and why not (``reason``):
    ambiguous, or superseded after it was captured."""

    data: bytes | None
    reason: str = ""

    def __repr__(self) -> str:  # never the state bytes
        return ("Capture(%d bytes)" % len(self.data) if self.data is not None
                else "Capture(ambiguous: %s)" % self.reason)


def ambiguous(reason: str) -> Capture:
    return Capture(None, reason)


Opener = Callable[[Path], bytes]


def read_state_file(path: Path) -> bytes:
    """The file at ``path``: a regular file (no symlink followed) of at most
    ``permall.MAX_FILE_SIZE`` bytes. OSError or ValueError naming what was
    wrong otherwise (the swtpm's uid owns the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("%s is not a regular file" % path.name)
        if info.st_size > permall.MAX_FILE_SIZE:
            raise ValueError("%s has %d bytes, more than the %d a state file may have"
                             % (path.name, info.st_size, permall.MAX_FILE_SIZE))
        chunks = []
        left = permall.MAX_FILE_SIZE + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > permall.MAX_FILE_SIZE:
            raise ValueError("%s grew past %d bytes while read"
                             % (path.name, permall.MAX_FILE_SIZE))
        return data
    finally:
        os.close(fd)


class Tally:
    """The events seen so far for the watched name: pure, unit-testable."""

    def __init__(self, name: str = PERMANENT_STATE_FILE, lock: str = LOCK_FILE) -> None:
        self.name = name
        self.lock = lock
        self.writes = 0
        self.overflow = False
        self.dir_gone = False
        self.reopened = False  # the storage opened after the first write

    def add(self, mask: int, name: str) -> None:
        """One event, in the queue's order (an open of the lock counts only
        after a write)."""
        if mask & IN_Q_OVERFLOW:
            self.overflow = True
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
            self.dir_gone = True
        if name == self.lock and mask & STORAGE_OPENS and self.writes:
            self.reopened = True
        if name == self.name and mask & WRITE_EVENTS:
            self.writes += 1

    def verdict(self, data: bytes) -> Capture:
        """``data``, read after the first write event and before the drain."""
        if self.overflow:
            return ambiguous("the inotify queue overflowed: writes may have been missed")
        if self.reopened:
            return ambiguous(SUPERSEDED)
        if self.writes != 1:
            return ambiguous("%d writes of %s before the first could be read"
                             % (self.writes, self.name))
        return Capture(data)

    def later(self) -> str:
        """After a capture: why it no longer stands, or "" (guest writes
        of the state file leave it)."""
        if self.overflow:
            return ("the inotify queue overflowed after the capture: a later import "
                    "cannot be excluded")
        if self.reopened:
            return SUPERSEDED
        if self.dir_gone:
            return ("the state dir was removed or moved after the capture: a later import "
                    "cannot be excluded")
        return ""


def _parse(buf: bytes) -> list[tuple[int, str]]:
    events = []
    offset = 0
    while offset + _EVENT.size <= len(buf):
        _wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
        raw = buf[offset + _EVENT.size:offset + _EVENT.size + length]
        events.append((mask, raw.split(b"\0", 1)[0].decode("utf-8", "replace")))
        offset += _EVENT.size + length
    return events


class FirstWriteWatch:
    """One incoming vTPCM's watch: ``arm`` (before its swtpm starts),
    ``start`` the thread, ``sync`` before an answer (or ``settle`` after an
    import that no other may follow), ``stop``. ``on_done``
    gets the first outcome, and after a capture at most one later mark
    that supersedes it (``Tally.later``; nothing once stopped); ``opener``
    reads the file (tests inject a slow one)."""

    def __init__(self, state_dir: Path, on_done: Callable[[Capture], None], *,
                 name: str = PERMANENT_STATE_FILE, lifetime: float = WATCH_LIFETIME,
                 opener: Opener = read_state_file) -> None:
        self.state_dir = state_dir
        self.name = name
        self.lifetime = lifetime
        self._on_done = on_done
        self._opener = opener
        self._stop = threading.Event()
        self.done = threading.Event()  # the first outcome is known (or the watch ended)
        self.outcome: Capture | None = None  # the last one given to on_done
        self.failed = ""  # why on_done raised (that outcome was not kept)
        # one reader of the queue at a time (the thread or a sync), in the
        # queue's order; guards _fd, _tally and _finished
        self._lock = threading.Lock()
        self._tally = Tally(name)
        self._finished = False  # nothing more to tell (ambiguous, superseded, settled)
        self.settled = False  # ended at its capture by ``settle``: the capture stands
        self._fd = -1
        self._wake: tuple[int, int] | None = None  # a pipe: stop() wakes the poll
        self._wake_guard = threading.Lock()  # never a write to a closed (reused) fd
        self._thread: threading.Thread | None = None

    def arm(self) -> FirstWriteWatch:
        """Watch the directory now: every later write is queued. OSError if
        it cannot be watched (the caller must not go on unwatched); nothing
        is left open then."""
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, "inotify_init1: %s" % os.strerror(err))
        try:
            wd = _libc.inotify_add_watch(fd, os.fsencode(self.state_dir),
                                         WATCHED | IN_ONLYDIR | IN_DONT_FOLLOW)
            if wd < 0:
                err = ctypes.get_errno()
                raise OSError(err, "inotify_add_watch %s: %s" % (self.state_dir,
                                                                os.strerror(err)))
            wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._wake = wake
        return self

    def start(self) -> FirstWriteWatch:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="firstwrite-%s" % self.state_dir.name)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread; whether it ended within ``timeout``."""
        self._stop.set()
        with self._wake_guard:
            if self._wake is not None:
                try:
                    os.write(self._wake[1], b"x")
                except BlockingIOError:
                    pass  # already woken
        if self._thread is None:  # armed (or not even that), never started
            self._close()
            return True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def sync(self, timeout: float) -> bool:
        """Take in every event queued by now, at once: the kernel queued
        each when its syscall ran, so the outcome (``outcome``, given to
        ``on_done``) covers every import that finished before this call.
        False if the thread held the queue longer than ``timeout`` (a
        slow read of the first write)."""
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            self._step_safely()
        finally:
            self._lock.release()
        return True

    def settle(self, timeout: float) -> bool:
        """The import is over and no other may follow (the agent's own
        ``import_state``, which refuses a second one; the guest's QEMU then
        starts on it, and its CMD_INIT opens the storage as an import does):
        take in what is queued, and if that gave the capture, end the watch
        with it standing. Whether it settled."""
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            self._step_safely()
            if self._finished or self.outcome is None or self.outcome.data is None:
                return False
            self.settled = self._finished = True
        finally:
            self._lock.release()
        with self._wake_guard:  # the thread ends now
            if self._wake is not None:
                try:
                    os.write(self._wake[1], b"x")
                except BlockingIOError:
                    pass
        return True

    def _close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        with self._wake_guard:
            if self._wake is not None:
                for end in self._wake:
                    os.close(end)
                self._wake = None

    def _events(self) -> list[tuple[int, str]]:
        """What the queue holds now, without blocking."""
        events: list[tuple[int, str]] = []
        while True:
            try:
                buf = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            events.extend(_parse(buf))

    def _deliver(self, capture: Capture) -> None:
        """Under ``_lock``: the first outcome, or a later mark."""
        if capture.data is None:
            self._finished = True  # nothing it could learn later would help
        if self._stop.is_set():
            self._finished = True  # its vTPCM went live or away: nothing to tell
            return
        self.outcome = capture
        try:
            self._on_done(capture)
        except Exception as exc:
            self.failed = "%s" % exc
            self._finished = True
            LOG.error("The outcome of the watch of %s could not be kept: %s",
                      self.state_dir, exc)
        finally:
            self.done.set()

    def _step_safely(self) -> None:
        """Under ``_lock``: ``_step``, any error an ambiguous outcome (a bug
        or an I/O error: never a crash, never a capture left standing)."""
        if self._fd < 0 or self._finished:
            return
        try:
            self._step()
        except Exception as exc:
            LOG.error("Watch of %s failed: %s", self.state_dir, exc)
            self._deliver(ambiguous("the watch of the state dir failed%s: %s"
                                    % (" after the capture" if self.done.is_set() else "",
                                       exc)))

    def _step(self) -> None:
        """Under ``_lock``: the events queued now, in order; before a
        capture, the first write read and the queue drained again."""
        tally = self._tally
        for mask, name in self._events():
            tally.add(mask, name)
        if self.done.is_set():  # captured: does it still stand?
            reason = tally.later()
            if reason:
                self._deliver(ambiguous(reason))
            return
        if tally.overflow:
            self._deliver(tally.verdict(b""))
        elif tally.writes:
            try:
                data = self._opener(self.state_dir / self.name)
            except (OSError, ValueError) as exc:
                self._deliver(ambiguous("the first write could not be read: %s"
                                        % (exc if isinstance(exc, ValueError)
                                           else os.strerror(exc.errno or 0))))
                return
            for mask, name in self._events():  # the drain: a second write is queued by now
                tally.add(mask, name)
            self._deliver(tally.verdict(data))
        elif tally.dir_gone:
            self._deliver(ambiguous("the state dir was removed or moved before a write"))

    def _expire(self) -> None:
        """Under ``_lock``: the lifetime is over; what is queued still counts."""
        self._step_safely()
        if self._finished:
            return
        if self.done.is_set():
            self._deliver(ambiguous("the watch ended after the capture (its lifetime of %d s "
                                    "was over): a later import cannot be excluded"
                                    % self.lifetime))
        else:
            self._deliver(ambiguous("no write seen within the watch's lifetime of %d s"
                                    % self.lifetime))

    def _run(self) -> None:
        deadline = time.monotonic() + self.lifetime
        try:
            poller = select.poll()  # not select(): an agent's fds go past 1024
            poller.register(self._fd, select.POLLIN)
            with self._wake_guard:  # only this thread closes it
                if self._wake is not None:
                    poller.register(self._wake[0], select.POLLIN)
            while not self._stop.is_set() and not self._finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    with self._lock:
                        self._expire()
                    break
                poller.poll(int(min(_POLL, left) * 1000) + 1)
                with self._lock:
                    self._step_safely()
        except Exception as exc:  # poll itself failed: the watch cannot go on
            LOG.error("Watch of %s failed: %s", self.state_dir, exc)
            with self._lock:
                if not self._finished:
                    self._deliver(ambiguous(
                        "the watch of the state dir failed%s: %s"
                        % (" after the capture" if self.done.is_set() else "", exc)))
        finally:
            self._close()
            self.done.set()
