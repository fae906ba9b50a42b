"""Notice a vTPCM's swtpm that died, within seconds, and tell the operator.

swtpm runs detached from the agent (so an agent restart never touches a
guest's TPM), so nobody reaps or notices its death but this thread: every
``interval`` seconds it looks for vTPCMs that should run (ACTIVE, migrating
out, migrating in) and crashed (a clean exit, QEMU's CMD_SHUTDOWN when its
guest stops, is not a crash). It does NOT start them again: QEMU never
reconnects to a restarted swtpm, so a restarted one would serve no guest,
only whoever can open its socket, with reset PCRs anyone there could extend
(an old-generation source copy after the switchover included). Nothing
needs it running: ``start`` (the guest's next boot or hard reboot) spawns a
dead ACTIVE vTPCM from its persisted state, ``abort_outgoing`` works
without a running swtpm, and ``commit_incoming`` restarts a dead incoming
one after the commit point (``InstanceManager.commit_incoming``).

Each crash is logged once for the operator with what the guest sees and
what to do, and reported to the engine's audit log through ``reporter`` by a
sender thread of its own (never from the RPC thread holding the instance's
lock; a slow engine delays nothing). Reports are rate-limited per instance
(``REPORT_INTERVAL``) and the queue is capped (``MAX_QUEUED``): a crash loop
or a silent engine costs bounded memory and log. Restarts ``commit_incoming``
makes are logged and reported the same way (``record``), and so are crashes
an operation finds before a pass saw them (``found``: an abort leaves the
source's vTPCM STOPPED, which no pass takes for a crash); one crash is
reported at most once (and once more for the outcome of an operation's
retry after it failed, when the failure was its first report): a pass
forgets a crash only after two passes in a row found its vTPCM no longer
crashed and no operation holding it, so an operation that reports once its
settled state is written still finds the pass's own report of it. A
crashed copy a commit shredded (or failed to) is only logged: the authority
moved before the shred, so the engine would refuse its report. With no
passes (interval 0) operations still report.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import oslo_messaging as messaging
from oslo_log import log as logging

from vtpcm_agent.association import VTPCMState as S
from vtpcm_agent.instances import (
    KEPT_SWEEP_INTERVAL,
    RESTART_OUTCOME,
    FoundDead,
    InstanceManager,
    Restarted,
)
from vtpcm_common import exception
from vtpcm_common.api.engine.messages import SwtpmRestartReport

LOG = logging.getLogger(__name__)
REPORT_INTERVAL = 300.0  # seconds between two crash reports of one instance
MAX_QUEUED = 100  # reports waiting for the engine; more are dropped (logged)
Reporter = Callable[[SwtpmRestartReport], object]
# the crash last reported of an instance (vTPCM, pid), when, and whether an
# operation reported it as failed (its retry reports the crash once more)
Reported = tuple[tuple[str, int | None], float, bool]

# What the guest sees and what the operator does, per state of the vTPCM.
CRASH_OUTCOME = {
    S.ACTIVE: (
        "the guest's TPM answers every command with a failure (QEMU does not reconnect "
        "to a swtpm); it is not restarted. A hard reboot of the guest (nova reboot "
        "--hard) starts it from its persisted state: the guest keeps its permanent TPM "
        "state and gets fresh PCRs"),
    S.MIGRATING_OUT: (
        "not restarted: before the switchover the live migration fails and Nova's "
        "rollback aborts it (that needs no running swtpm), after it this copy is stale "
        "and is shredded at the commit. If the guest stays here, hard-reboot it "
        "(nova reboot --hard) once the migration is aborted"),
    S.MIGRATING_IN: (
        "not restarted now: the commit restarts it from the state it received (then "
        "hard-reboot the guest, nova reboot --hard: QEMU does not reconnect), an abort "
        "discards it"),
}

# What a crash an operation found means, by what the operation made of the vTPCM.
FOUND_OUTCOME = {
    "stopped": (
        "the vTPCM is STOPPED and not restarted (QEMU does not reconnect to a swtpm): a "
        "guest running here gets a failure for every TPM command until a hard reboot "
        "(nova reboot --hard), which starts the vTPCM from its persisted state: the "
        "guest keeps its permanent TPM state and gets fresh PCRs"),
    "shredded": (
        "this copy was stale (the guest runs on the destination with its TPM) and the "
        "commit shredded it"),
    "discarded": (
        "the abort discarded this incoming copy; the guest stays on the source, its "
        "vTPCM intact there"),
    "shred-failed": (
        "this copy is stale (the guest runs on the destination with its TPM); the "
        "commit failed before it recorded the shred and is retried"),
    "discard-failed": (
        "the abort's discard of this incoming copy failed and is retried; the guest "
        "stays on the source, its vTPCM intact there"),
}


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
        # instance -> ``Reported`` (the crash last reported, when, whether
        # by an operation that failed); an entry goes at the second pass in
        # a row that finds the instance no longer crashed and held by no
        # operation (``_absent`` holds those the last pass found so): an
        # abort reports a crash just after its STOPPED is written, when a
        # pass may already have found it gone once
        self._reported: dict[str, Reported] = {}
        self._absent: set[str] = set()
        self._reported_guard = threading.Lock()  # the pass and ``found`` (an RPC thread)
        self._reports: queue.Queue[SwtpmRestartReport] = queue.Queue(maxsize=MAX_QUEUED)
        self.dropped = 0
        instances.on_restart = self.record
        instances.on_found_dead = self.found

    def start(self) -> None:
        """Start polling (an interval of 0 disables it) and reporting."""
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
        if self._thread is not None:
            self._thread.join(timeout=max(self.interval, 1.0) + self.instances.settings.timeout)
        if self._sender is not None:  # a daemon thread: a report in flight is not waited for
            self._sender.join(timeout=1.0)
        self._thread = self._sender = None

    def _loop(self) -> None:
        next_kept = time.monotonic() + KEPT_SWEEP_INTERVAL  # the start swept them
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one error
                LOG.exception("swtpm watchdog pass failed; retrying in %(s).1fs",
                              {"s": self.interval})
            if time.monotonic() >= next_kept:
                next_kept = time.monotonic() + KEPT_SWEEP_INTERVAL
                try:
                    self.instances.sweep_kept()
                except Exception:  # noqa: BLE001 - the watchdog must outlive any one error
                    LOG.exception("Sweep of the kept swtpm uids failed; retried in "
                                  "%(s)d s", {"s": KEPT_SWEEP_INTERVAL})
            self._stop.wait(self.interval)

    def run_once(self, now: float | None = None) -> list[str]:
        """Report every vTPCM whose swtpm died (each crash once, an instance at
        most once per ``REPORT_INTERVAL``); returns the instances reported.
        One bad record is logged and skipped, never blocks the others."""
        now = time.monotonic() if now is None else now
        # the entries judged are read first, then ``crashed``, then ``busy``:
        # an operation settling one writes its state and reports while it
        # holds the instance, so a settled instance not busy now has
        # reported whatever it found, and an entry written after the first
        # read is not the one judged (kept)
        with self._reported_guard:
            entries = dict(self._reported)
        crashed = self.instances.crashed()
        judged = {uuid: entry for uuid, entry in entries.items() if uuid not in crashed}
        gone = {uuid for uuid in judged if not self.instances.busy(uuid)}
        with self._reported_guard:
            for instance_uuid in gone & self._absent:
                if self._reported.get(instance_uuid) is judged[instance_uuid]:
                    del self._reported[instance_uuid]  # not one found meanwhile
            self._absent = gone - self._absent
        reported = []
        for instance_uuid in crashed:
            try:
                if self._report_crash(instance_uuid, now):
                    reported.append(instance_uuid)
            except Exception as err:  # noqa: BLE001 - one record must not stop the pass
                LOG.error("swtpm watchdog: checking instance %(instance)s failed "
                          "(%(err)s); the others are checked", {
                              "instance": instance_uuid, "err": type(err).__name__})
        return reported

    def _report_crash(self, instance_uuid: str, now: float) -> bool:
        assoc = self.instances.associations.find(instance_uuid)
        if assoc is None or assoc.state not in CRASH_OUTCOME \
                or not self.instances.swtpm_died(assoc):  # restarted since the list
            return False
        crash = (assoc.vtpcm_id, assoc.pid)
        with self._reported_guard:
            last = self._reported.get(instance_uuid)
            if last is not None and (last[0] == crash or now - last[1] < REPORT_INTERVAL):
                return False
            self._reported[instance_uuid] = (crash, now, False)
        detail = "died (pid %s); %s" % (assoc.pid, CRASH_OUTCOME[assoc.state])
        LOG.error("AUDIT swtpm of instance %(instance)s (vTPCM %(vtpcm)s, %(state)s) "
                  "%(detail)s", {"instance": instance_uuid, "vtpcm": assoc.vtpcm_id,
                                 "state": assoc.state.value, "detail": detail})
        self._queue(instance_uuid, assoc.vtpcm_id, assoc.state.value, "not-restarted", detail)
        return True

    def record(self, done: Restarted) -> None:
        """Log a restart ``commit_incoming`` made and queue its report
        (``InstanceManager.on_restart``)."""
        detail = ("died (pid %s); restarted by the commit as pid %d from the state it "
                  "received, under its at-rest key: %s" % (done.old_pid, done.pid,
                                                           RESTART_OUTCOME))
        LOG.error("AUDIT swtpm of instance %(instance)s (vTPCM %(vtpcm)s, %(state)s) "
                  "%(detail)s", {"instance": done.instance_uuid, "vtpcm": done.vtpcm_id,
                                 "state": done.state, "detail": detail})
        self._queue(done.instance_uuid, done.vtpcm_id, done.state, "restarted", detail)

    def found(self, dead: FoundDead) -> None:
        """Log the crash an operation found (``InstanceManager.on_found_dead``)
        unless this very crash was reported already (once more after a
        failed operation's report: its retry's outcome, not its repeated
        failures; after a pass's report, nothing more),
        and queue its report for the engine unless the copy was shredded
        (the engine no longer places it here). Not rate-limited: each one
        settles a migration."""
        crash: tuple[str, int | None] = (dead.vtpcm_id, dead.pid)
        failed = dead.outcome in ("shred-failed", "discard-failed")
        now = time.monotonic()
        with self._reported_guard:
            last = self._reported.get(dead.instance_uuid)
            if last is not None and last[0] == crash and (failed or not last[2]):
                return
            self._reported[dead.instance_uuid] = (crash, now, failed)
            if self.interval <= 0:  # no pass prunes: what no operation can still find
                for old in [k for k, v in self._reported.items()  # a failure: retried
                            if now - v[1] > REPORT_INTERVAL and not v[2]]:
                    del self._reported[old]
        detail = "died (pid %d) while %s, found by %s; %s" % (
            dead.pid, dead.state, dead.found_by, FOUND_OUTCOME[dead.outcome])
        LOG.error("AUDIT swtpm of instance %(instance)s (vTPCM %(vtpcm)s, %(state)s) "
                  "%(detail)s", {"instance": dead.instance_uuid, "vtpcm": dead.vtpcm_id,
                                 "state": dead.state, "detail": detail})
        if dead.outcome not in ("shredded", "shred-failed"):
            self._queue(dead.instance_uuid, dead.vtpcm_id, dead.state, "not-restarted",
                        detail)

    def _queue(self, instance_uuid: str, vtpcm_id: str, state: str, outcome: str,
               detail: str) -> None:
        if self.reporter is None or not self.host:
            return
        try:
            self._reports.put_nowait(SwtpmRestartReport(
                host=self.host, instance_uuid=instance_uuid, vtpcm_id=vtpcm_id,
                state=state, outcome=outcome, detail=detail[:1000]))
        except queue.Full:
            with self._reported_guard:  # RPC threads queue too (``found``)
                self.dropped += 1
            LOG.warning("swtpm report of instance %(instance)s not queued for the engine "
                        "(%(n)d waiting; %(d)d dropped so far): the agent log has it",
                        {"instance": instance_uuid, "n": MAX_QUEUED, "d": self.dropped})

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
        except Exception as err:  # noqa: BLE001 - the sender must outlive any one report
            # ours and the RPC layer's name what failed; any other by its type only
            said = err if isinstance(err, (exception.VTPCMException,
                                           messaging.MessagingException)) \
                else type(err).__name__
            LOG.warning("Could not report the swtpm restart of instance %(instance)s "
                        "to the engine (the agent log has it): %(err)s",
                        {"instance": report.instance_uuid, "err": said})
