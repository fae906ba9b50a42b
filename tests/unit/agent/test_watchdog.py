"""The swtpm watchdog's pass: restart what crashed, back off on failures,
report both to the engine from its own thread."""

import dataclasses
from pathlib import Path
from typing import Any

from vtpcm_agent.association import VTPCMState
from vtpcm_agent.instances import AgentSettings, Restarted
from vtpcm_agent.watchdog import MAX_BACKOFF, SwtpmWatchdog
from vtpcm_common import exception

OK, BAD = "00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"
VTPCM = "00000000-0000-4000-8000-0000000000ff"


@dataclasses.dataclass
class FakeAssoc:
    vtpcm_id: str = VTPCM
    state: VTPCMState = VTPCMState.ACTIVE


class FakeAssociations:
    def find(self, instance_uuid: str) -> FakeAssoc:
        return FakeAssoc()


@dataclasses.dataclass
class FakeInstances:
    crashed_now: list[str]
    fail: set[str]
    settings: AgentSettings = dataclasses.field(default_factory=lambda: AgentSettings(
        host="h", state_root=Path("/nonexistent"), run_dir=Path("/nonexistent")))
    attempts: list[str] = dataclasses.field(default_factory=list)
    associations: FakeAssociations = dataclasses.field(default_factory=FakeAssociations)
    on_restart: Any = None

    def crashed(self) -> list[str]:
        return list(self.crashed_now)

    def restart_if_crashed(self, instance_uuid: str) -> Restarted | None:
        self.attempts.append(instance_uuid)
        if instance_uuid in self.fail:
            raise exception.SwtpmError(vtpcm_id=VTPCM, reason="no state")
        self.crashed_now.remove(instance_uuid)
        done = Restarted(instance_uuid, VTPCM, "ACTIVE", 10, 11, True)
        self.on_restart(done)
        return done


def test_restarts_each_crashed_one_and_backs_off_on_failure(caplog):
    fake = FakeInstances([OK, BAD], {BAD})
    reports: list[Any] = []
    dog = SwtpmWatchdog(fake, interval=2.0, host="cmp-1",  # type: ignore[arg-type]
                        reporter=reports.append)
    done = dog.run_once(now=100.0)
    assert [r.instance_uuid for r in done] == [OK]
    assert fake.attempts == [OK, BAD]
    assert ("could not be restarted (attempt 1, next in 4s): swtpm error for vTPCM "
            + VTPCM + ": no state") in caplog.text
    assert "AUDIT swtpm of instance %s" % OK in caplog.text
    assert dog.run_once(now=103.0) == [] and fake.attempts == [OK, BAD]  # pausing
    dog.run_once(now=104.0)
    assert fake.attempts == [OK, BAD, BAD]  # retried, next pause 8 s
    for step in range(20):
        dog.run_once(now=1000.0 + step * MAX_BACKOFF)
    assert dog._failures[BAD][1] - (1000.0 + 19 * MAX_BACKOFF) == MAX_BACKOFF
    assert reports == []  # sent by the sender thread, not by the pass
    dog.send_pending()
    assert [(r.instance_uuid, r.outcome, r.host) for r in reports] == [
        (OK, "restarted", "cmp-1"), (BAD, "not-restarted", "cmp-1")]  # a failure once
    assert "nova reboot --hard" in reports[0].detail
    fake.fail.clear()
    assert [r.instance_uuid for r in dog.run_once(now=10**6)] == [BAD]
    assert BAD not in dog._failures


def test_a_report_the_engine_refuses_is_logged_and_dropped(caplog):
    def refuse(report: Any) -> None:
        raise exception.ServiceUnreachable(service="vtpcm-engine", method="report",
                                           reason="MessagingTimeout")
    fake = FakeInstances([OK], set())
    dog = SwtpmWatchdog(fake, interval=2.0, host="cmp-1", reporter=refuse)  # type: ignore[arg-type]
    dog.run_once(now=1.0)
    dog.send_pending()
    assert "Could not report the swtpm restart of instance %s" % OK in caplog.text


def test_an_interval_of_zero_starts_no_watchdog_thread():
    dog = SwtpmWatchdog(FakeInstances([], set()), interval=0)  # type: ignore[arg-type]
    dog.start()
    assert dog._thread is None and dog._sender is None
    dog.stop()
