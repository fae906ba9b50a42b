"""Threads a test left running: named at the end of the run, and not
allowed to keep the finished run alive.

Python joins every non-daemon thread before the interpreter exits, and
futurist (oslo.messaging's executor) joins its busy workers, daemon or not,
from an atexit hook. One that never returns (a TPM call to an swtpm that
stopped answering never comes back to Python) keeps a finished pytest run
alive with its summary printed and nothing after it: CI saw a timeout and
no cause (stop 22). At the very end this waits a little for such threads,
then prints each one's name and stack to stderr and exits with the run's
own status at once. Registered by tests/conftest.py when
``VTPCM_THREADGUARD=1`` (tools/run-tests.sh sets it).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import pytest

GRACE = 10.0  # seconds a thread may take to finish after the last test

_status: list[int] = []


def _busy_futurist_workers() -> list[threading.Thread]:
    try:
        from futurist import _thread as futurist_threads
    except ImportError:
        return []
    workers = list(getattr(futurist_threads, "_to_be_cleaned", {}).keys())
    return [w for w in workers if w.is_alive() and not getattr(w, "idle", True)]


def _idle_executor_worker(thread: threading.Thread) -> bool:
    """A concurrent.futures worker waiting for work: exit ends it at once.

    A sample of its innermost frame: a worker stuck in a C initializer, or
    given blocking work right after the sample, passes for idle."""
    frame = sys._current_frames().get(thread.ident or -1)  # noqa: SLF001
    return (frame is not None and frame.f_code.co_name == "_worker"
            and frame.f_code.co_filename.endswith(os.path.join("concurrent", "futures",
                                                               "thread.py")))


def _blocking() -> list[threading.Thread]:
    """Threads the interpreter's exit would wait for."""
    mine = threading.current_thread()
    alive = [t for t in threading.enumerate()
             if t is not mine and not t.daemon and t.is_alive()
             and not _idle_executor_worker(t)]
    return alive + [w for w in _busy_futurist_workers() if w not in alive]


def lingering(grace: float = GRACE) -> list[threading.Thread]:
    """The threads exit would wait for, still there after ``grace``."""
    deadline = time.monotonic() + grace
    while True:
        alive = _blocking()
        if not alive or time.monotonic() >= deadline:
            return alive
        alive[0].join(timeout=min(0.5, max(0.0, deadline - time.monotonic())))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _status[:] = [int(session.exitstatus)]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure() -> None:
    alive = lingering()
    if not alive:
        return
    frames = sys._current_frames()  # noqa: SLF001 - the only way to a thread's stack
    out = sys.__stderr__ or sys.stderr
    out.write("threadguard: %d thread(s) still running %ss after the last test; the "
              "interpreter's exit would wait for them, so the run exits now:\n"
              % (len(alive), GRACE))
    for thread in alive:
        frame = frames.get(thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "  (no stack)\n"
        out.write("--- thread %r (ident %s)\n%s" % (thread.name, thread.ident, stack))
    out.flush()
    sys.stdout.flush()
    os._exit(_status[0] if _status else 1)
