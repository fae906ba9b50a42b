"""The swtpm watchdog's pass: restart what crashed, back off on failures."""

import dataclasses
from pathlib import Path

from vtpcm_agent.instances import AgentSettings, Restarted
from vtpcm_agent.watchdog import MAX_BACKOFF, SwtpmWatchdog
from vtpcm_common import exception


@dataclasses.dataclass
class FakeInstances:
    crashed_now: list[str]
    fail: set[str]
    settings: AgentSettings = dataclasses.field(default_factory=lambda: AgentSettings(
        host="h", state_root=Path("/nonexistent"), run_dir=Path("/nonexistent")))
    attempts: list[str] = dataclasses.field(default_factory=list)

    def crashed(self) -> list[str]:
        return list(self.crashed_now)

    def restart_if_crashed(self, instance_uuid: str) -> Restarted | None:
        self.attempts.append(instance_uuid)
        if instance_uuid in self.fail:
            raise exception.SwtpmError(vtpcm_id="v-" + instance_uuid, reason="no state")
        self.crashed_now.remove(instance_uuid)
        return Restarted(instance_uuid, "v-" + instance_uuid, "ACTIVE", 10, 11, True)


def test_restarts_each_crashed_one_and_backs_off_on_failure(caplog):
    fake = FakeInstances(["ok", "bad"], {"bad"})
    dog = SwtpmWatchdog(fake, interval=2.0)  # type: ignore[arg-type]
    done = dog.run_once(now=100.0)
    assert [r.instance_uuid for r in done] == ["ok"]
    assert fake.attempts == ["ok", "bad"]
    assert ("could not be restarted (attempt 1, next in 4s): swtpm error for vTPCM v-bad: "
            "no state") in caplog.text
    assert dog.run_once(now=103.0) == [] and fake.attempts == ["ok", "bad"]  # pausing
    dog.run_once(now=104.0)
    assert fake.attempts == ["ok", "bad", "bad"]  # retried, next pause 8 s
    for step in range(20):
        dog.run_once(now=1000.0 + step * MAX_BACKOFF)
    assert dog._failures["bad"][1] - (1000.0 + 19 * MAX_BACKOFF) == MAX_BACKOFF
    fake.fail.clear()
    assert [r.instance_uuid for r in dog.run_once(now=10**6)] == ["bad"]
    assert "bad" not in dog._failures


def test_an_interval_of_zero_starts_no_thread():
    dog = SwtpmWatchdog(FakeInstances([], set()), interval=0)  # type: ignore[arg-type]
    dog.start()
    assert dog._thread is None
    dog.stop()
