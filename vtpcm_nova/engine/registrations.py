"""Enrollment of agents that announced themselves, off the RPC threads.

Why: ``register_agent`` is an unsigned cast any broker client can send with
any host name. Enrolling inline made each cast for an unknown name hold an
engine RPC thread in the agent's ``get_identity`` for the whole RPC timeout,
so about one cast a second starved ``begin``/``commit``/``abort`` for all of
Nova. Here a cast costs a schema check and a queue insert, and a fixed
number of worker threads does the enrollments, so a flood of names never
delays the signed migration calls.

What a flood can still do is crowd out a real new host's announcement, so
(review finding 2): a name's per-name interval is taken only when the name
is queued; a full queue drops its *oldest* name (and forgets that name's
interval), so a steady stream of fresh names cannot keep newcomers out for
good; each worker first asks the name's agent for ``health`` with a short
timeout, so a name nobody serves costs seconds, not ``rpc_timeout``; and
the agent announces itself again, with backoff, until the engine has
contacted it (``vtpcm_agent/announce.py``). Drops are logged at DEBUG each
and at WARNING as a count at most once a minute.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_common.ratelimit import PerKeyInterval, Summary

LOG = logging.getLogger(__name__)

DROP_SUMMARY_PERIOD = 60.0


class Registrations:
    """A bounded queue of host names to enroll and its worker threads."""

    def __init__(self, enroll: Callable[[str], object], *, workers: int, backlog: int,
                 per_host_interval: float,
                 answers: Callable[[str], bool] | None = None) -> None:
        """``enroll(host)``: enroll ``host`` unless it is known already
        (it runs on a worker thread; its VTPCMExceptions are logged).
        ``answers(host)``: whether the host's agent answers at all, asked
        with a short timeout before ``enroll`` (None: not asked)."""
        if workers < 1 or backlog < 1:
            raise exception.InvalidInput(reason="registrations need workers >= 1, backlog >= 1")
        self._enroll = enroll
        self._answers = answers
        self._workers = workers
        self.backlog = backlog
        self._queue: collections.deque[str] = collections.deque()
        self._lock = threading.Condition()
        self._recent = PerKeyInterval(per_host_interval)
        self._drops = Summary(DROP_SUMMARY_PERIOD)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.dropped = 0

    def pending(self) -> int:
        """Names waiting for a worker."""
        with self._lock:
            return len(self._queue)

    def submit(self, host: str) -> bool:
        """Queue ``host`` for enrollment; False if it is queued already or
        was queued lately. A full queue drops its oldest name to make room.
        Never blocks, never calls out."""
        with self._lock:
            if host in self._queue or not self._recent.allow(host):
                return False
            if len(self._queue) >= self.backlog:
                oldest = self._queue.popleft()
                self._recent.forget(oldest)  # its agent's next announcement counts
                self._dropped(oldest)
            self._queue.append(host)
            self._lock.notify()
        return True

    def _dropped(self, host: str) -> None:
        self.dropped += 1
        LOG.debug("Registration of host %(host)s dropped: the registration queue is full",
                  {"host": host})
        count = self._drops.add()
        if count:
            LOG.warning("%(n)d agent registrations dropped from a full registration "
                        "queue (a flood of register_agent casts?); their agents "
                        "announce themselves again", {"n": count})

    def start(self) -> None:
        for i in range(self._workers):
            thread = threading.Thread(target=self._run, name="registrations-%d" % i,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=timeout)
        self._threads = []

    def _next(self) -> str | None:
        with self._lock:
            while not self._queue:
                if self._stop.is_set():
                    return None
                self._lock.wait(timeout=0.5)
            return self._queue.popleft()

    def _run(self) -> None:
        while not self._stop.is_set():
            host = self._next()
            if host is None:
                return
            try:
                if self._answers is not None and not self._answers(host):
                    LOG.info("Agent of announced host %(host)s does not answer; not "
                             "enrolled (it announces itself again)", {"host": host})
                    continue
                self._enroll(host)
            except exception.VTPCMException as err:
                LOG.warning("Enrollment on agent registration of %(host)s failed: %(err)s",
                            {"host": host, "err": err})
            except Exception:  # noqa: BLE001 - logged with its traceback, worker lives on
                LOG.exception("Enrollment on agent registration of %(host)s failed",
                              {"host": host})
