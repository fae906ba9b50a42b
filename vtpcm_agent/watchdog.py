"""Restart a vTPCM's swtpm that died, within seconds and without an operator.

swtpm runs detached from the agent (so an agent restart never touches a
guest's TPM), so nobody reaps or notices its death but this thread: every
``interval`` seconds it looks for vTPCMs that should run (ACTIVE, migrating
out, migrating in) and do not, and starts each again from its persisted
state under its own keys at the same socket path
(``InstanceManager.restart_if_crashed``). That keeps the only good copy of a
tenant's TPM usable: an incoming one can be committed, an outgoing one can
be aborted back, and a running guest gets its TPM back at its next hard
reboot. Each restart is logged for the operator with what the guest kept
and lost. A restart that fails is retried with a growing pause (a state that
cannot start keeps failing; the log should not flood).
"""

from __future__ import annotations

import threading
import time

from oslo_log import log as logging

from vtpcm_agent.instances import RESTART_OUTCOME, InstanceManager, Restarted
from vtpcm_common import exception

LOG = logging.getLogger(__name__)
MAX_BACKOFF = 300.0


class SwtpmWatchdog:
    """One daemon thread per agent; ``run_once`` is the whole logic."""

    def __init__(self, instances: InstanceManager, interval: float) -> None:
        self.instances = instances
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures: dict[str, tuple[int, float]] = {}  # uuid -> (count, retry at)

    def start(self) -> None:
        """Start polling; an interval of 0 disables the watchdog."""
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="swtpm-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.interval, 1.0) + self.instances.settings.timeout)
            self._thread = None

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
                continue
            self._failures.pop(instance_uuid, None)
            if done is not None:
                restarted.append(done)
                _report(done)
        return restarted


def _report(done: Restarted) -> None:
    if done.with_state:
        LOG.error("AUDIT swtpm of instance %(instance)s (vTPCM %(vtpcm)s, %(state)s) died "
                  "(pid %(old)s); restarted as pid %(pid)d from its persisted state under "
                  "its at-rest key: %(outcome)s",
                  {"instance": done.instance_uuid, "vtpcm": done.vtpcm_id,
                   "state": done.state, "old": done.old_pid, "pid": done.pid,
                   "outcome": RESTART_OUTCOME})
    else:
        LOG.warning("AUDIT swtpm of incoming instance %(instance)s (vTPCM %(vtpcm)s) died "
                    "before it received any state (pid %(old)s); restarted empty as pid "
                    "%(pid)d for the migration to go on or be aborted",
                    {"instance": done.instance_uuid, "vtpcm": done.vtpcm_id,
                     "old": done.old_pid, "pid": done.pid})
