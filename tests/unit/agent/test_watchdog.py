"""The swtpm watchdog's pass: report each crash once (rate-limited, bounded
queue), restart nothing, survive a bad record; reports go to the engine
from the watchdog's own thread."""

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from vtpcm_agent import watchdog as wd
from vtpcm_agent.association import VTPCMState
from vtpcm_agent.instances import AgentSettings, FoundDead, Restarted
from vtpcm_agent.watchdog import SwtpmWatchdog
from vtpcm_common import exception

OK, BAD = "00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"
VTPCM = "00000000-0000-4000-8000-0000000000ff"


@dataclasses.dataclass
class FakeAssoc:
    vtpcm_id: str = VTPCM
    state: VTPCMState = VTPCMState.ACTIVE
    pid: int | None = 10


class FakeAssociations:
    def __init__(self) -> None:
        self.held: dict[str, FakeAssoc] = {}
        self.broken: set[str] = set()

    def find(self, instance_uuid: str) -> FakeAssoc | None:
        if instance_uuid in self.broken:
            raise ValueError("a record the agent cannot read")
        return self.held.get(instance_uuid)


@dataclasses.dataclass
class FakeInstances:
    crashed_now: list[str]
    settings: AgentSettings = dataclasses.field(default_factory=lambda: AgentSettings(
        host="h", state_root=Path("/nonexistent"), run_dir=Path("/nonexistent")))
    associations: FakeAssociations = dataclasses.field(default_factory=FakeAssociations)
    on_restart: Any = None
    on_found_dead: Any = None
    running_pids: set[int] = dataclasses.field(default_factory=set)
    held_by_an_operation: set[str] = dataclasses.field(default_factory=set)
    while_asked_busy: Any = None  # what an RPC thread does meanwhile

    def crashed(self) -> list[str]:
        return list(self.crashed_now)

    def swtpm_died(self, assoc: FakeAssoc) -> bool:
        return assoc.pid not in self.running_pids

    def busy(self, instance_uuid: str) -> bool:
        if self.while_asked_busy is not None:
            self.while_asked_busy()
        return instance_uuid in self.held_by_an_operation

    def __getattr__(self, name: str) -> Any:  # start, restart, ...: never called
        raise AssertionError("the watchdog called %s" % name)


def _dog(fake: FakeInstances, reports: list[Any]) -> SwtpmWatchdog:
    return SwtpmWatchdog(fake, interval=2.0, host="cmp-1",  # type: ignore[arg-type]
                         reporter=reports.append)


def _reported_by_a_pass(state: VTPCMState) -> tuple[FakeInstances, list[Any], SwtpmWatchdog]:
    """Instance OK in ``state`` whose crash (pid 10) a pass just reported."""
    fake = FakeInstances([OK])
    fake.associations.held[OK] = FakeAssoc(state=state, pid=10)
    reports: list[Any] = []
    dog = _dog(fake, reports)
    assert dog.run_once(now=1.0) == [OK]
    return fake, reports, dog


def _abort_steps(fake: FakeInstances, *outcomes: str) -> None:
    """The abort of m-1 found OK's crash (pid 10), once per outcome."""
    for outcome in outcomes:
        fake.on_found_dead(FoundDead(OK, VTPCM, "MIGRATING_IN", 10, "the abort of m-1",
                                     outcome=outcome))  # type: ignore[arg-type]


@pytest.mark.parametrize("state,says", [
    (VTPCMState.ACTIVE, "nova reboot --hard"),
    (VTPCMState.MIGRATING_OUT, "shredded at the commit"),
    (VTPCMState.MIGRATING_IN, "the commit restarts it"),
])
def test_a_crash_is_reported_once_and_nothing_is_restarted(caplog, state, says):
    """Review finding (issue 10): the watchdog restarted ACTIVE and
    MIGRATING_OUT swtpms, which QEMU never reconnects to (an old-generation
    source copy after the switchover came back with PCRs anyone on its
    socket could extend)."""
    fake = FakeInstances([OK])
    fake.associations.held[OK] = FakeAssoc(state=state)
    reports: list[Any] = []
    dog = _dog(fake, reports)
    assert dog.run_once(now=100.0) == [OK]
    assert dog.run_once(now=1000.0) == []  # the same crash: reported once
    assert "AUDIT swtpm of instance %s" % OK in caplog.text and says in caplog.text
    assert reports == []  # sent by the sender thread, not by the pass
    dog.send_pending()
    assert [(r.instance_uuid, r.outcome, r.state, r.host) for r in reports] == [
        (OK, "not-restarted", state.value, "cmp-1")]
    assert says in reports[0].detail


def test_a_crash_loop_is_reported_at_most_once_per_interval():
    fake = FakeInstances([OK])
    fake.associations.held[OK] = FakeAssoc(pid=10)
    dog = _dog(fake, [])
    assert dog.run_once(now=100.0) == [OK]
    fake.associations.held[OK] = FakeAssoc(pid=11)  # started again, died again
    assert dog.run_once(now=101.0) == []
    assert dog.run_once(now=100.0 + wd.REPORT_INTERVAL) == [OK]
    fake.crashed_now.clear()  # back (a hard reboot): forgotten after two passes
    assert dog.run_once(now=100.0 + wd.REPORT_INTERVAL + 1) == []
    assert dog.run_once(now=100.0 + wd.REPORT_INTERVAL + 2) == []
    fake.crashed_now.append(OK)  # the next crash counts
    fake.associations.held[OK] = FakeAssoc(pid=12)
    assert dog.run_once(now=100.0 + wd.REPORT_INTERVAL + 3) == [OK]


def test_a_crash_is_not_forgotten_while_an_operation_holds_its_instance():
    """Review round 4, LOW 1: a discard's (or shred's) tail, a uid sweep of
    up to 10 s, spanned two passes after the pid file went; the abort then
    reported the crash the first pass had reported already."""
    fake, reports, dog = _reported_by_a_pass(VTPCMState.MIGRATING_IN)
    fake.crashed_now.clear()
    fake.held_by_an_operation.add(OK)
    for now in (3.0, 5.0, 7.0):
        assert dog.run_once(now=now) == []
    fake.on_found_dead(FoundDead(OK, VTPCM, "MIGRATING_IN", 10, "the abort of m-1",
                                 outcome="discarded"))
    dog.send_pending()
    assert len(reports) == 1


def test_a_settled_pass_is_counted_again_after_the_instance_crashed_again():
    """Review round 4, LOW 3: settled once, crashed (listed) again, settled
    once more: still one settled pass, not two."""
    fake, reports, dog = _reported_by_a_pass(VTPCMState.MIGRATING_OUT)
    fake.crashed_now.clear()
    assert dog.run_once(now=3.0) == []
    fake.crashed_now.append(OK)
    assert dog.run_once(now=5.0) == []  # the same crash
    fake.crashed_now.clear()
    assert dog.run_once(now=7.0) == []
    fake.on_found_dead(FoundDead(OK, VTPCM, "MIGRATING_OUT", 10, "the abort of m-1"))
    dog.send_pending()
    assert len(reports) == 1


def test_with_no_passes_operations_report_and_old_entries_go():
    """Interval 0: no pass ever prunes; what operations reported is kept
    for REPORT_INTERVAL (review round 4, NIT 4)."""
    fake = FakeInstances([])
    reports: list[Any] = []
    dog = SwtpmWatchdog(fake, interval=0, host="cmp-1",  # type: ignore[arg-type]
                        reporter=reports.append)
    fake.on_found_dead(FoundDead(OK, VTPCM, "MIGRATING_OUT", 10, "the abort of m-1"))
    fake.on_found_dead(FoundDead(OK, VTPCM, "MIGRATING_OUT", 10, "the abort of m-1"))
    dog.send_pending()
    assert len(reports) == 1
    crash, when, failed = dog._reported[OK]
    dog._reported[OK] = (crash, when - wd.REPORT_INTERVAL - 1, failed)
    fake.on_found_dead(FoundDead(BAD, VTPCM, "MIGRATING_OUT", 11, "the abort of m-2"))
    assert set(dog._reported) == {BAD}


def test_with_passes_an_operation_forgets_no_other_instance_s_old_crash():
    """Review round 5, LOW 2: the interval-0 pruning is for interval 0
    only; a pass-reported crash older than REPORT_INTERVAL that stays
    crashed must not be reported again because another instance's abort
    reported one."""
    fake = FakeInstances([OK])
    fake.associations.held[OK] = FakeAssoc(pid=10)
    reports: list[Any] = []
    dog = _dog(fake, reports)
    assert dog.run_once(now=1.0) == [OK]
    crash, when, failed = dog._reported[OK]
    dog._reported[OK] = (crash, when - wd.REPORT_INTERVAL - 5, failed)
    fake.on_found_dead(FoundDead(BAD, VTPCM, "MIGRATING_OUT", 11, "the abort of m-1"))
    assert OK in dog._reported
    assert dog.run_once(now=3.0) == []


def test_a_failed_discard_s_retry_reports_its_outcome_once_more():
    """Review round 5, LOW 3: the retry of a discard that failed finds the
    same crash; its outcome (discarded) is reported, once."""
    fake = FakeInstances([])
    reports: list[Any] = []
    dog = _dog(fake, reports)
    # failing again reports nothing new (round 6)
    _abort_steps(fake, "discard-failed", "discard-failed", "discard-failed", "discarded",
                 "discarded")
    dog.send_pending()
    assert ["failed and is retried" in r.detail for r in reports] == [True, False]


def test_after_a_pass_s_report_failed_steps_and_their_outcome_add_nothing():
    """Review round 7: the pass reported the crash first; the discard's
    failures and its final outcome are the same crash."""
    fake, reports, dog = _reported_by_a_pass(VTPCMState.MIGRATING_IN)
    _abort_steps(fake, "discard-failed", "discard-failed", "discarded")
    dog.send_pending()
    assert len(reports) == 1


def test_a_pass_between_a_failed_step_and_its_retry_changes_nothing():
    fake = FakeInstances([])
    fake.associations.held[OK] = FakeAssoc(state=VTPCMState.MIGRATING_IN, pid=10)
    reports: list[Any] = []
    dog = _dog(fake, reports)
    fail = FoundDead(OK, VTPCM, "MIGRATING_IN", 10, "the abort of m-1", outcome="discard-failed")
    fake.on_found_dead(fail)
    fake.crashed_now.append(OK)  # still listed: the discard failed
    assert dog.run_once(now=1.0) == []
    fake.on_found_dead(fail)
    fake.on_found_dead(dataclasses.replace(fail, outcome="discarded"))
    dog.send_pending()
    assert ["failed and is retried" in r.detail for r in reports] == [True, False]


def test_with_no_passes_a_failure_still_retried_is_not_forgotten():
    fake = FakeInstances([])
    reports: list[Any] = []
    dog = SwtpmWatchdog(fake, interval=0, host="cmp-1",  # type: ignore[arg-type]
                        reporter=reports.append)
    fail = FoundDead(OK, VTPCM, "MIGRATING_IN", 10, "the abort of m-1", outcome="discard-failed")
    fake.on_found_dead(fail)
    crash, when, failed = dog._reported[OK]
    dog._reported[OK] = (crash, when - wd.REPORT_INTERVAL - 1, failed)
    fake.on_found_dead(FoundDead(BAD, VTPCM, "MIGRATING_OUT", 11, "the abort of m-2"))
    fake.on_found_dead(fail)  # failing again
    dog.send_pending()
    assert [r.instance_uuid for r in reports] == [OK, BAD]


def test_a_failed_commit_s_retry_logs_the_shred_once_more(caplog):
    fake = FakeInstances([])
    _dog(fake, [])  # it takes the hook
    for outcome in ("shred-failed", "shred-failed", "shredded", "shredded"):
        fake.on_found_dead(FoundDead(OK, VTPCM, "MIGRATING_OUT", 10, "the commit of m-1",
                                     outcome=outcome))  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records if "AUDIT swtpm" in r.getMessage()]
    assert ["failed before it recorded the shred" in x for x in said] == [True, False]


def test_the_pass_keeps_an_entry_an_operation_wrote_while_it_judged():
    """Review round 5, NIT 4 (pinned in round 6): an operation reported a
    new crash of the instance while the pass asked whether it is busy; the
    pass forgets only the entry it judged."""
    fake, reports, dog = _reported_by_a_pass(VTPCMState.MIGRATING_OUT)
    fake.crashed_now.clear()
    assert dog.run_once(now=3.0) == []  # settled once
    new = FoundDead(OK, VTPCM, "MIGRATING_IN", 20, "the abort of m-2", outcome="discarded")
    fake.while_asked_busy = lambda: fake.on_found_dead(new)
    assert dog.run_once(now=5.0) == []  # settled twice: the old entry would go
    fake.while_asked_busy = None
    fake.on_found_dead(new)  # the same crash again: already reported
    dog.send_pending()
    assert [r.detail.split(";")[0] for r in reports] == [
        "died (pid 10)", "died (pid 20) while MIGRATING_IN, found by the abort of m-2"]


def test_a_swtpm_restarted_after_the_pass_listed_it_is_not_reported():
    """Review round 3, LOW 1: a hard reboot started the swtpm again
    between the pass's list of crashes and its read of the record; the
    new pid runs. Reported as dead, it also hid its real crash later."""
    fake = FakeInstances([OK])
    fake.associations.held[OK] = FakeAssoc(pid=11)
    fake.running_pids.add(11)
    reports: list[Any] = []
    dog = _dog(fake, reports)
    assert dog.run_once(now=1.0) == []
    fake.running_pids.clear()  # now it crashed
    assert dog.run_once(now=3.0) == [OK]


def test_the_report_queue_is_capped(caplog):
    many = ["00000000-0000-4000-8000-%012d" % i for i in range(wd.MAX_QUEUED + 5)]
    fake = FakeInstances(many)
    for uuid in many:
        fake.associations.held[uuid] = FakeAssoc()
    reports: list[Any] = []
    dog = _dog(fake, reports)
    assert len(dog.run_once(now=1.0)) == len(many)  # all logged
    assert dog.dropped == 5 and "5 dropped so far" in caplog.text
    dog.send_pending()
    assert len(reports) == wd.MAX_QUEUED


def test_one_bad_record_does_not_block_the_others(caplog):
    fake = FakeInstances([BAD, OK])
    fake.associations.held[OK] = FakeAssoc()
    fake.associations.broken.add(BAD)
    dog = _dog(fake, [])
    assert dog.run_once(now=1.0) == [OK]
    assert "checking instance %s failed (ValueError)" % BAD in caplog.text
    assert "a record the agent cannot read" not in caplog.text  # the type only


def test_a_restart_commit_incoming_made_is_reported():
    fake = FakeInstances([])
    reports: list[Any] = []
    dog = _dog(fake, reports)
    fake.on_restart(Restarted(OK, VTPCM, "MIGRATING_IN", 10, 11, True))
    dog.send_pending()
    assert [(r.outcome, r.state) for r in reports] == [("restarted", "MIGRATING_IN")]
    assert "nova reboot --hard" in reports[0].detail


def test_a_crash_an_abort_found_is_reported_once_whoever_saw_it_first(caplog):
    """Found by the e2e lab cell under CI load: the source's swtpm killed
    during the copy, the abort (a second later) left the vTPCM STOPPED
    before the watchdog's next pass, which takes no STOPPED vTPCM for a
    crash: nothing reached the engine's audit."""
    fake = FakeInstances([])
    reports: list[Any] = []
    dog = _dog(fake, reports)
    dead = FoundDead(OK, VTPCM, "MIGRATING_OUT", 10, "the abort of migration m-1")
    fake.on_found_dead(dead)
    fake.on_found_dead(dead)  # told twice: one report
    fake.crashed_now.append(OK)  # a pass that read the list before the abort
    fake.associations.held[OK] = FakeAssoc(state=VTPCMState.MIGRATING_OUT, pid=10)
    assert dog.run_once(now=1.0) == []
    dog.send_pending()
    assert [(r.instance_uuid, r.outcome, r.state) for r in reports] == [
        (OK, "not-restarted", "MIGRATING_OUT")]
    assert "found by the abort of migration m-1" in reports[0].detail
    assert "nova reboot --hard" in reports[0].detail
    assert caplog.text.count("AUDIT swtpm of instance %s" % OK) == 1
    # the other order: the pass reported it, the abort finds the same crash
    other = FakeInstances([BAD])
    other.associations.held[BAD] = FakeAssoc(state=VTPCMState.MIGRATING_OUT, pid=12)
    later: list[Any] = []
    dog2 = _dog(other, later)
    assert dog2.run_once(now=1.0) == [BAD]
    other.on_found_dead(FoundDead(BAD, VTPCM, "MIGRATING_OUT", 12, "the abort of m-2"))
    other.on_found_dead(FoundDead(BAD, VTPCM, "MIGRATING_OUT", 13, "the abort of m-3"))
    dog2.send_pending()
    assert [r.detail.split(";")[0] for r in later] == [
        "died (pid 12)", "died (pid 13) while MIGRATING_OUT, found by the abort of m-3"]


def test_a_crashed_copy_shredded_is_logged_not_sent_one_discarded_is_sent(caplog):
    """The engine no longer places a copy a commit shredded (the source's,
    after the switchover: the authority moved before the shred) and would
    refuse its report: the agent's log is its record. An incoming copy an
    abort discarded is reported (the engine's abort discards it before it
    restores the source, so the migration is still on record)."""
    fake = FakeInstances([])
    reports: list[Any] = []
    dog = _dog(fake, reports)
    fake.on_found_dead(FoundDead(OK, VTPCM, "MIGRATING_OUT", 10, "the commit of m-1",
                                 outcome="shredded"))
    fake.on_found_dead(FoundDead("00000000-0000-4000-8000-00000000000c", VTPCM,
                                 "MIGRATING_OUT", 12, "the commit of m-3",
                                 outcome="shred-failed"))
    fake.on_found_dead(FoundDead(BAD, VTPCM, "MIGRATING_IN", 11, "the abort of m-2",
                                 outcome="discarded"))
    dog.send_pending()
    assert [(r.instance_uuid, r.state) for r in reports] == [(BAD, "MIGRATING_IN")]
    assert "died (pid 10) while MIGRATING_OUT, found by the commit of m-1; this copy " \
           "was stale" in caplog.text
    assert "died (pid 11) while MIGRATING_IN, found by the abort of m-2; the abort " \
           "discarded this incoming copy" in caplog.text


def test_a_crash_a_pass_reported_and_then_pruned_is_not_reported_again_by_the_abort():
    """Review of 291bf9c, LOW 1: a pass reported the crash while the vTPCM
    was MIGRATING_OUT; the abort wrote STOPPED, a pass then pruned its rate
    limit entry (no longer crashed), and only then did the abort report."""
    fake, reports, dog = _reported_by_a_pass(VTPCMState.MIGRATING_OUT)
    fake.associations.held[OK] = FakeAssoc(state=VTPCMState.STOPPED, pid=None)
    fake.crashed_now.clear()
    assert dog.run_once(now=3.0) == []  # marks it settled once
    fake.on_found_dead(FoundDead(OK, VTPCM, "MIGRATING_OUT", 10, "the abort of m-1"))
    dog.send_pending()
    assert len(reports) == 1


def test_the_sender_outlives_a_report_that_fails_in_any_way(caplog):
    """Review round 3 (outside the change): an error other than the RPC
    layer's ended the sender thread, silently, for every later report."""
    sent: list[Any] = []

    def flaky(report: Any) -> None:
        if not sent and report.instance_uuid == OK:
            sent.append(None)
            raise OSError("signer unavailable")
        sent.append(report)
    fake = FakeInstances([OK, BAD])
    fake.associations.held[OK] = FakeAssoc()
    fake.associations.held[BAD] = FakeAssoc(pid=12)
    dog = SwtpmWatchdog(fake, interval=2.0, host="cmp-1", reporter=flaky)  # type: ignore[arg-type]
    dog.run_once(now=1.0)
    dog.send_pending()
    assert [r.instance_uuid for r in sent if r is not None] == [BAD]
    assert "Could not report the swtpm restart of instance %s to the engine (the agent " \
           "log has it): OSError" % OK in caplog.text


def test_a_report_the_engine_refuses_is_logged_and_dropped(caplog):
    def refuse(report: Any) -> None:
        raise exception.ServiceUnreachable(service="vtpcm-engine", method="report",
                                           reason="MessagingTimeout")
    fake = FakeInstances([OK])
    fake.associations.held[OK] = FakeAssoc()
    dog = SwtpmWatchdog(fake, interval=2.0, host="cmp-1", reporter=refuse)  # type: ignore[arg-type]
    dog.run_once(now=1.0)
    dog.send_pending()
    assert "Could not report the swtpm restart of instance %s" % OK in caplog.text


def test_an_interval_of_zero_starts_no_watchdog_thread():
    dog = SwtpmWatchdog(FakeInstances([]), interval=0)  # type: ignore[arg-type]
    dog.start()
    assert dog._thread is None and dog._sender is None
    dog.stop()


def test_the_kept_uids_are_swept_again_periodically_and_a_failure_never_stops_it(
        monkeypatch, caplog):
    """Review of the sweep, MEDIUM 2: a uid kept aside by a destroy (a
    segment another user keeps attached) is swept again by the watchdog
    every KEPT_SWEEP_INTERVAL seconds, not only at the agent's start."""
    calls: list[float] = []

    class Sweeping(FakeInstances):
        def sweep_kept(self) -> int:
            calls.append(now[0])
            if len(calls) == 1:
                raise OSError("one failed pass")
            return 0

    now = [1000.0]
    fake = Sweeping(crashed_now=[])
    dog = SwtpmWatchdog(fake, interval=1.0, host="cmp-1")  # type: ignore[arg-type]
    monkeypatch.setattr(wd, "KEPT_SWEEP_INTERVAL", 60)
    monkeypatch.setattr(wd.time, "monotonic", lambda: now[0])

    def wait(_seconds: float) -> bool:
        now[0] += 30.0
        if now[0] > 1200.0:
            dog._stop.set()
        return dog._stop.is_set()

    monkeypatch.setattr(dog._stop, "wait", wait)
    dog._loop()
    assert calls == [1060.0, 1120.0, 1180.0]  # not at once (the start swept), then each 60 s
    assert "Sweep of the kept swtpm uids failed" in caplog.text
