"""Restart a vTPCM's swtpm that died, within seconds and without an operator.

swtpm runs detached from the agent (so an agent restart never touches a
guest's TPM), so nobody reaps or notices its death but this thread: every
``interval`` seconds it looks for vTPCMs that should run (ACTIVE, migrating
out, migrating in) and crashed (a clean exit, QEMU's CMD_SHUTDOWN when its
guest stops, is not a crash), and starts each again from its persisted
state under its own keys at the same socket path
(``InstanceManager.restart_if_crashed``). That keeps the only good copy of a
tenant's TPM usable: an incoming one can be committed, an outgoing one can
be aborted back, and a running guest gets its TPM back at its next hard
reboot. Every restart (also one ``commit_incoming`` makes) is logged for the
operator with what the guest kept and lost, and reported to the engine's
audit log through ``reporter`` by a sender thread of its own (never from
the RPC thread holding the instance's lock, and a slow engine never delays
a restart). A restart that fails is reported once and
retried with a growing pause (a state that cannot start keeps failing; the
log should not flood).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import oslo_messaging as messaging
from oslo_log import log as logging

from vtpcm_agent.instances import RESTART_OUTCOME, InstanceManager, Restarted
from vtpcm_common import exception
from vtpcm_common.api.engine.messages import SwtpmRestartReport

LOG = logging.getLogger(__name__)
MAX_BACKOFF = 300.0
Reporter = Callable[[SwtpmRestartReport], object]


class SwtpmWatchdog:
    """One daemon thread per agent; ``run_once`` is the whole logic."""

    def __init__(self, instances: InstanceManager, interval: float, host: str = "",
                 reporter: Reporter | None = None) -> None:
        self.instances = instances
        self.interval = interval
        self.host = host
        self.reporter = reporter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sender: threading.Thread | None = None
        self._failures: dict[str, tuple[int, float]] = {}  # uuid -> (count, retry at)
        self._reports: queue.SimpleQueue[SwtpmRestartReport] = queue.SimpleQueue()
        instances.on_restart = self.record

    def start(self) -> None:
        """Start polling (an interval of 0 disables the restarts) and reporting."""
        if self.reporter is not None and self._sender is None:
            self._sender = threading.Thread(target=self._send_loop,
                                            name="swtpm-restart-reports", daemon=True)
            self._sender.start()
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="swtpm-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop both threads; reports not sent by then stay in the agent log only."""
        self._stop.set()
        if self._thread is not None:  # a restart under way finishes
            self._thread.join(timeout=max(self.interval, 1.0) + self.instances.settings.timeout)
        if self._sender is not None:  # a daemon thread: a report in flight is not waited for
            self._sender.join(timeout=1.0)
        self._thread = self._sender = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one error
                LOG.exception("swtpm watchdog pass failed; retrying in %(s).1fs",
                              {"s": self.interval})
            self._stop.wait(self.interval)

    def run_once(self, now: float | None = None) -> list[Restarted]:
        """Restart every crashed swtpm that is not in its back-off pause."""
        now = time.monotonic() if now is None else now
        restarted = []
        for instance_uuid in self.instances.crashed():
            count, retry_at = self._failures.get(instance_uuid, (0, 0.0))
            if now < retry_at:
                continue
            try:
                done = self.instances.restart_if_crashed(instance_uuid)
            except exception.VTPCMException as err:
                count += 1
                pause = min(self.interval * 2 ** count, MAX_BACKOFF)
                self._failures[instance_uuid] = (count, now + pause)
                LOG.error("swtpm of instance %(instance)s died and could not be restarted "
                          "(attempt %(n)d, next in %(p).0fs): %(err)s",
                          {"instance": instance_uuid, "n": count, "p": pause,
                           "err": err.message})
                if count == 1:
                    self._queue_failure(instance_uuid, err.message)
                continue
            self._failures.pop(instance_uuid, None)
            if done is not None:
                restarted.append(done)
        return restarted

    def record(self, done: Restarted) -> None:
        """Log a restart and queue its report (``InstanceManager.on_restart``)."""
        if done.with_state:
            detail = ("died (pid %s); restarted as pid %d from its persisted state under "
                      "its at-rest key: %s" % (done.old_pid, done.pid, RESTART_OUTCOME))
            LOG.error("AUDIT swtpm of instance %(instance)s (vTPCM %(vtpcm)s, %(state)s) "
                      "%(detail)s", {"instance": done.instance_uuid, "vtpcm": done.vtpcm_id,
                                     "state": done.state, "detail": detail})
        else:
            detail = ("died before it received any state (pid %s); restarted empty as pid "
                      "%d for the migration to go on or be aborted" % (done.old_pid, done.pid))
            LOG.warning("AUDIT swtpm of incoming instance %(instance)s (vTPCM %(vtpcm)s) "
                        "%(detail)s", {"instance": done.instance_uuid,
                                       "vtpcm": done.vtpcm_id, "detail": detail})
        self._queue(done.instance_uuid, done.vtpcm_id, done.state, "restarted", detail)

    def _queue_failure(self, instance_uuid: str, reason: str) -> None:
        assoc = self.instances.associations.find(instance_uuid)
        if assoc is not None:
            self._queue(instance_uuid, assoc.vtpcm_id, assoc.state.value, "not-restarted",
                        "died and could not be restarted (retried with a growing pause): "
                        + reason)

    def _queue(self, instance_uuid: str, vtpcm_id: str, state: str, outcome: str,
               detail: str) -> None:
        if self.reporter is not None and self.host:
            self._reports.put(SwtpmRestartReport(
                host=self.host, instance_uuid=instance_uuid, vtpcm_id=vtpcm_id,
                state=state, outcome=outcome, detail=detail[:1000]))

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            try:
                report = self._reports.get(timeout=0.5)
            except queue.Empty:
                continue
            self.send(report)

    def send_pending(self) -> None:
        """Send what is queued now, in this thread (tests; the sender does it)."""
        while True:
            try:
                self.send(self._reports.get_nowait())
            except queue.Empty:
                return

    def send(self, report: SwtpmRestartReport) -> None:
        if self.reporter is None:
            return
        try:
            self.reporter(report)
        except (exception.VTPCMException, messaging.MessagingException) as err:
            LOG.warning("Could not report the swtpm restart of instance %(instance)s "
                        "to the engine (the agent log has it): %(err)s",
                        {"instance": report.instance_uuid, "err": err})
