"""Threads a test left running, named at the end of the run.

Python joins every non-daemon thread before the interpreter exits, so one
that never returns keeps a finished pytest run alive with its summary
printed and nothing after it: CI sees a timeout and no cause. At
unconfigure this waits a little for such threads, then prints each one's
name and stack to stderr; tools/run-tests.sh's bound stops the run after.
Loaded by tests/conftest.py.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback

GRACE = 10.0  # seconds a thread may take to finish after the last test


def lingering(grace: float = GRACE) -> list[threading.Thread]:
    """The non-daemon threads other than this one still alive after ``grace``."""
    deadline = time.monotonic() + grace
    while True:
        alive = [t for t in threading.enumerate()
                 if t is not threading.current_thread() and not t.daemon and t.is_alive()]
        if not alive or time.monotonic() >= deadline:
            return alive
        alive[0].join(timeout=min(0.5, max(0.0, deadline - time.monotonic())))


def pytest_unconfigure() -> None:
    alive = lingering()
    if not alive:
        return
    frames = sys._current_frames()  # noqa: SLF001 - the only way to a thread's stack
    out = sys.__stderr__ or sys.stderr
    out.write("threadguard: %d non-daemon thread(s) still running after the last test "
              "(%ss); the interpreter waits for them at exit:\n" % (len(alive), GRACE))
    for thread in alive:
        frame = frames.get(thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "  (no stack)\n"
        out.write("--- thread %r (ident %s)\n%s" % (thread.name, thread.ident, stack))
    out.flush()
