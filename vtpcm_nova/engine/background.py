"""Bounded background jobs: the sources' shreds a commit leaves to run
after its answer. Whatever they drop, reconcile finishes."""

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from oslo_log import log as logging

LOG = logging.getLogger(__name__)


class BackgroundJobs:
    """A few daemon threads running jobs from a bounded queue: a job that
    finds the queue full, or the jobs stopped, is not run (``submit``
    returns False) and its caller leaves the work to reconcile. Daemon
    threads: a job never holds the interpreter's exit (each is bounded by
    its RPC timeouts anyway)."""

    def __init__(self, workers: int, limit: int) -> None:
        self._workers = workers
        self._queue: queue.Queue[tuple[Callable[..., object], tuple[Any, ...]] | None] = \
            queue.Queue(maxsize=limit)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopped = False

    def submit(self, fn: Callable[..., object], *args: Any) -> bool:
        with self._lock:
            if self._stopped:
                return False
            try:
                self._queue.put_nowait((fn, args))
            except queue.Full:
                return False
            if not self._threads:  # started at the first job
                self._threads = [threading.Thread(target=self._work, daemon=True,
                                                  name="vtpcm-shred-%d" % i)
                                 for i in range(self._workers)]
                for thread in self._threads:
                    thread.start()
            return True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - its own logging missed it
                LOG.exception("A background job failed")

    def stop(self, timeout: float) -> None:
        """Drop the queued jobs (reconcile does their work), let the running
        ones end, waiting at most ``timeout`` seconds in all."""
        with self._lock:
            self._stopped = True
            threads = list(self._threads)
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            for _ in threads:
                self._queue.put_nowait(None)  # emptied above, none added since
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
