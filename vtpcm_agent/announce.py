"""Announce this agent to the engine until the engine has contacted it.

Why: ``register_agent`` is an unsigned cast that anyone on the broker can
send, so a flood of names can push an announcement out of the engine's
bounded registration queue, and a name announced by someone else before
this agent listened is not queued again for ``registration_interval``
(review finding 2). One announcement at start was then lost for good. The
agent repeats it with exponential backoff, a bounded number of times, until
the engine proves it took note: a verified engine-signed ``get_identity``,
``activate_credential`` or ``quote`` (``AgentManager.engine_contact``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from oslo_log import log as logging

LOG = logging.getLogger(__name__)

FIRST_DELAY = 15.0
MAX_DELAY = 900.0
MAX_ANNOUNCEMENTS = 10


def delays(first: float, cap: float, count: int) -> list[float]:
    """Seconds to wait before each announcement after the first: doubling
    from ``first`` up to ``cap`` (about an hour in all with the defaults)."""
    return [min(cap, first * 2 ** i) for i in range(max(0, count - 1))]


class Announcer:
    """A thread that calls ``announce`` now and then again after each of
    ``delays(...)`` until ``contacted`` is set or it is stopped."""

    def __init__(self, announce: Callable[[], None], contacted: threading.Event, *,
                 first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY,
                 max_announcements: int = MAX_ANNOUNCEMENTS) -> None:
        self._announce = announce
        self.contacted = contacted
        self._delays = delays(first_delay, max_delay, max_announcements)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="announce", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None

    def run(self) -> None:
        """Announce, then wait and announce again until contacted."""
        for delay in [0.0, *self._delays]:
            if delay and self._wait(delay):
                return
            if self.contacted.is_set():
                return
            try:
                self._announce()
                self.sent += 1
            except Exception as err:  # noqa: BLE001 - broker down: the next try may pass
                LOG.warning("Announcing this agent to the engine failed: %(err)s",
                            {"err": type(err).__name__})
        if not self.contacted.is_set() and not self._stop.is_set():
            LOG.warning("The engine did not contact this agent after %(n)d announcements; "
                        "enroll the host by hand (vtpcm-manage hosts enroll) if it is new",
                        {"n": self.sent})

    def _wait(self, delay: float) -> bool:
        """Wait ``delay`` s; True if stopped or contacted meanwhile."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            if self._stop.wait(min(left, 0.5)) or self.contacted.is_set():
                return True
        return self._stop.is_set() or self.contacted.is_set()
