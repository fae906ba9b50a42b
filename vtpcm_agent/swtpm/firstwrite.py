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
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
WRITE_EVENTS = IN_CLOSE_WRITE | IN_MOVED_TO
WATCHED = WRITE_EVENTS | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
# an incoming migration lasts at most the engine's [migration] timeout
# (3 h by default) before it is aborted, which stops the watch; this bounds
# a watch whose stop never came (then: "no write seen within ...")
WATCH_LIFETIME = 24 * 3600.0
_POLL = 5.0  # seconds between checks of the lifetime (stop wakes the thread at once)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


@dataclasses.dataclass(frozen=True)
class Capture:
    """The first write as read (``data``), or None and why not (``reason``)."""

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

    def __init__(self, name: str = PERMANENT_STATE_FILE) -> None:
        self.name = name
        self.writes = 0
        self.overflow = False
        self.dir_gone = False

    def add(self, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self.overflow = True
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
            self.dir_gone = True
        if name == self.name and mask & WRITE_EVENTS:
            self.writes += 1

    def verdict(self, data: bytes) -> Capture:
        """``data``, read after the first write event and before the drain."""
        if self.overflow:
            return ambiguous("the inotify queue overflowed: writes may have been missed")
        if self.writes != 1:
            return ambiguous("%d writes of %s before the first could be read"
                             % (self.writes, self.name))
        return Capture(data)


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
    ``start`` the thread, ``stop``. ``on_done`` gets the one outcome (not
    called when stopped first); ``opener`` reads the file (tests inject a
    slow one)."""

    def __init__(self, state_dir: Path, on_done: Callable[[Capture], None], *,
                 name: str = PERMANENT_STATE_FILE, lifetime: float = WATCH_LIFETIME,
                 opener: Opener = read_state_file) -> None:
        self.state_dir = state_dir
        self.name = name
        self.lifetime = lifetime
        self._on_done = on_done
        self._opener = opener
        self._stop = threading.Event()
        self.done = threading.Event()
        self.outcome: Capture | None = None
        self.failed = ""  # why on_done raised (the outcome was not kept)
        self._fd = -1
        self._wake: tuple[int, int] | None = None  # a pipe: stop() wakes the select
        self._wake_guard = threading.Lock()  # never a write to a closed (reused) fd
        self._thread: threading.Thread | None = None

    def arm(self) -> FirstWriteWatch:
        """Watch the directory now: every later write is queued. OSError if
        it cannot be watched (the caller must not go on unwatched)."""
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, "inotify_init1: %s" % os.strerror(err))
        wd = _libc.inotify_add_watch(fd, os.fsencode(self.state_dir),
                                     WATCHED | IN_ONLYDIR | IN_DONT_FOLLOW)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, "inotify_add_watch %s: %s" % (self.state_dir,
                                                            os.strerror(err)))
        self._fd = fd
        self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
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
        if self._thread is None and self._fd >= 0:  # armed, never started
            os.close(self._fd)
            self._fd = -1
            with self._wake_guard:
                if self._wake is not None:
                    for end in self._wake:
                        os.close(end)
                    self._wake = None
            return True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

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

    def _run(self) -> None:
        try:
            try:
                outcome = self._watch()
            except Exception as exc:  # a bug or an I/O error: ambiguous, never a crash
                LOG.error("Watch of %s failed: %s", self.state_dir, exc)
                outcome = ambiguous("the watch of the state dir failed: %s" % exc)
            finally:
                os.close(self._fd)
                with self._wake_guard:
                    if self._wake is not None:
                        for end in self._wake:
                            os.close(end)
                        self._wake = None
            if outcome is None or self._stop.is_set():
                return  # stopped: its vTPCM went live or away
            self.outcome = outcome
            self._on_done(outcome)
        except Exception as exc:
            self.failed = "%s" % exc
            LOG.error("The outcome of the watch of %s could not be kept: %s",
                      self.state_dir, exc)
        finally:
            self.done.set()

    def _watch(self) -> Capture | None:
        tally = Tally(self.name)
        deadline = time.monotonic() + self.lifetime
        while not self._stop.is_set():
            if time.monotonic() >= deadline:
                return ambiguous("no write seen within the watch's lifetime of %d s"
                                 % self.lifetime)
            wake = [] if self._wake is None else [self._wake[0]]  # only this thread closes it
            ready, _, _ = select.select([self._fd, *wake], [], [],
                                        min(_POLL, max(0.0, deadline - time.monotonic())))
            if self._fd not in ready:
                continue
            for mask, name in self._events():
                tally.add(mask, name)
            if tally.overflow:
                return tally.verdict(b"")
            if tally.writes:
                break
            if tally.dir_gone:
                return ambiguous("the state dir was removed or moved before a write")
        else:
            return None
        try:
            data = self._opener(self.state_dir / self.name)
        except (OSError, ValueError) as exc:
            return ambiguous("the first write could not be read: %s"
                             % (exc if isinstance(exc, ValueError)
                                else os.strerror(exc.errno or 0)))
        for mask, name in self._events():  # the drain: a second write is queued by now
            tally.add(mask, name)
        return tally.verdict(data)
