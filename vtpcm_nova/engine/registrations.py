"""Enrollment of agents that announced themselves, off the RPC threads.

Why: ``register_agent`` is an unsigned cast any broker client can send with
any host name. Enrolling inline made each cast for an unknown name hold an
engine RPC thread in the agent's ``get_identity`` for the whole RPC timeout,
so about one cast a second starved ``begin``/``commit``/``abort`` for all of
Nova. Here a cast costs a schema check and a queue insert: each name is
accepted at most once per interval, the queue is bounded (a full queue drops
the name, the agent announces itself again at its next start, or an operator
runs ``vtpcm-manage hosts enroll``), and a fixed number of worker threads
does the enrollments, so a flood delays other announced hosts' enrollment
only, never the signed migration calls.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_common.ratelimit import PerKeyInterval

LOG = logging.getLogger(__name__)


class Registrations:
    """A bounded queue of host names to enroll and its worker threads."""

    def __init__(self, enroll: Callable[[str], object], *, workers: int, backlog: int,
                 per_host_interval: float) -> None:
        """``enroll(host)``: enroll ``host`` unless it is known already
        (it runs on a worker thread; its VTPCMExceptions are logged)."""
        if workers < 1 or backlog < 1:
            raise exception.InvalidInput(reason="registrations need workers >= 1, backlog >= 1")
        self._enroll = enroll
        self._workers = workers
        self._queue: queue.Queue[str] = queue.Queue(maxsize=backlog)
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._recent = PerKeyInterval(per_host_interval)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.dropped = 0

    def submit(self, host: str) -> bool:
        """Queue ``host`` for enrollment; False (dropped) if it was queued or
        tried lately or the queue is full. Never blocks, never calls out."""
        with self._lock:
            if host in self._queued or not self._recent.allow(host):
                self.dropped += 1
                return False
            try:
                self._queue.put_nowait(host)
            except queue.Full:
                self.dropped += 1
                return False
            self._queued.add(host)
        return True

    def start(self) -> None:
        for i in range(self._workers):
            thread = threading.Thread(target=self._run, name="registrations-%d" % i,
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout)
        self._threads = []

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                host = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._lock:
                self._queued.discard(host)
            try:
                self._enroll(host)
            except exception.VTPCMException as err:
                LOG.warning("Enrollment on agent registration of %(host)s failed: %(err)s",
                            {"host": host, "err": err})
            except Exception:  # noqa: BLE001 - logged with its traceback, worker lives on
                LOG.exception("Enrollment on agent registration of %(host)s failed",
                              {"host": host})
