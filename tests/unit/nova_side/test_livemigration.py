import pytest

from tests.unit.nova_side.fakes import FakeAgents, FakeEngine
from vtpcm_common import exception
from vtpcm_nova.virt import livemigration as lm

MIG = "00000000-0000-0000-0000-0000000000bb"
INSTANCE = "00000000-0000-0000-0000-000000000001"


def _no_sleep(_s: float) -> None:
    pass


def test_failed_begin_is_aborted_at_once_and_its_error_raised() -> None:
    engine = FakeEngine()
    engine._mig(MIG, "PREPARING")  # the engine recorded it before failing
    engine.fail["begin"] = [exception.ServiceUnreachable(service="e", method="begin",
                                                         reason="MessagingTimeout")]
    with pytest.raises(exception.ServiceUnreachable, match="did not answer begin"):
        lm.begin(engine, MIG, INSTANCE, "src", "dst")
    assert engine.methods() == ["begin", "abort"]
    assert engine.migrations[MIG].state == "ABORTED"


def test_refused_begin_keeps_its_own_error_even_if_abort_fails() -> None:
    engine = FakeEngine()
    engine.fail["begin"] = [exception.HostNotTrusted(host="dst", reason="PCR 7 differs")]
    engine.fail["abort"] = [exception.InvalidTransition(what="migration", key=MIG,
                                                        current="REFUSED", target="ABORTING")]
    with pytest.raises(exception.HostNotTrusted, match="PCR 7 differs"):
        lm.begin(engine, MIG, INSTANCE, "src", "dst")


def test_begin_that_answers_something_else_than_prepared_is_aborted() -> None:
    engine = FakeEngine()
    engine.begin = lambda *a: engine._mig(MIG, "COMMITTED")  # type: ignore[method-assign]
    with pytest.raises(exception.MigrationError, match="begin answered COMMITTED"):
        lm.begin(engine, MIG, INSTANCE, "src", "dst")


def test_commit_whose_answer_was_lost_is_success() -> None:
    engine = FakeEngine()
    engine._mig(MIG, "COMMITTED")  # reconcile (or the lost call) finished it
    engine.fail["commit"] = [exception.ServiceUnreachable(service="e", method="commit",
                                                          reason="MessagingTimeout")]
    assert lm.commit(engine, MIG, sleep=_no_sleep).state == "COMMITTED"
    assert engine.methods() == ["commit", "get_migration"]


def test_commit_asks_the_shred_after_the_answer_and_takes_shredding_as_done() -> None:
    """Engine API 1.11: the engine answers once the destination committed
    (SHREDDING) and shreds the source's copy after its answer; the driver
    takes that as the commit done, without retrying or polling."""
    engine = FakeEngine()
    engine._mig(MIG, "PREPARED")
    engine.commit_answer = "SHREDDING"
    assert lm.commit(engine, MIG, sleep=_no_sleep).state == "SHREDDING"
    assert engine.shred_later is True
    assert engine.methods() == ["commit"]


def test_commit_retries_a_busy_record_then_succeeds() -> None:
    engine = FakeEngine()
    engine._mig(MIG, "PREPARED")
    engine.fail["commit"] = [exception.VTPCMBusy(instance_uuid=INSTANCE, reason="x")] * 2
    assert lm.commit(engine, MIG, sleep=_no_sleep).state == "COMMITTED"
    assert engine.methods().count("commit") == 3


def test_commit_gives_up_after_bounded_attempts() -> None:
    engine = FakeEngine()
    engine._mig(MIG, "PREPARED")
    down = exception.ServiceUnreachable(service="e", method="commit", reason="down")
    engine.fail["commit"] = [down] * 10
    slept: list[float] = []
    with pytest.raises(exception.ServiceUnreachable):
        lm.commit(engine, MIG, attempts=3, sleep=slept.append)
    assert engine.methods().count("commit") == 3
    assert slept == [1.0, 2.0]


def test_commit_of_an_aborted_migration_stops_retrying() -> None:
    engine = FakeEngine()
    engine._mig(MIG, "ABORTED")
    engine.fail["commit"] = [exception.InvalidTransition(what="migration", key=MIG,
                                                         current="ABORTED",
                                                         target="COMMITTING")]
    with pytest.raises(exception.InvalidTransition):
        lm.commit(engine, MIG, sleep=_no_sleep)
    assert engine.methods().count("commit") == 1


def test_abort_of_an_unrecorded_migration_is_none() -> None:
    assert lm.abort(FakeEngine(), MIG, "x") is None


def test_settle_commits_when_the_guest_made_it_and_aborts_otherwise() -> None:
    engine = FakeEngine()
    engine._mig(MIG, "PREPARED")
    assert lm.settle(engine, MIG, running_on_dest=True, reason="timeout").state == "COMMITTED"
    engine2 = FakeEngine()
    engine2._mig(MIG, "PREPARED")
    assert lm.settle(engine2, MIG, running_on_dest=False, reason="x").state == "ABORTED"


def test_destination_socket_must_be_incoming_and_this_instances() -> None:
    path = lm.destination_socket(FakeAgents(state="MIGRATING_IN", socket_dir="/b"), "dst",
                                 INSTANCE, ["/a", "/b"])
    assert path == "/b/%s.ctrl" % INSTANCE
    with pytest.raises(exception.MigrationError, match="is ACTIVE, not MIGRATING_IN"):
        lm.destination_socket(FakeAgents(state="ACTIVE"), "dst", INSTANCE,
                              ["/run/vtpcm", "/b"])
    with pytest.raises(exception.InvalidInput, match="socket_dirs"):
        lm.destination_socket(FakeAgents(state="MIGRATING_IN", socket_dir="/c"), "dst",
                              INSTANCE, ["/a", "/b"])


def test_abort_of_a_refused_or_aborted_migration_is_done() -> None:
    engine = FakeEngine()
    engine._mig(MIG, "REFUSED")
    engine.fail["abort"] = [exception.InvalidTransition(what="migration", key=MIG,
                                                        current="REFUSED",
                                                        target="AbortRequested")]
    info = lm.abort(engine, MIG, "x")
    assert info is not None and info.state == "REFUSED"


def test_abort_after_the_commit_point_is_raised() -> None:
    engine = FakeEngine()
    engine._mig(MIG, "COMMITTED")
    engine.fail["abort"] = [exception.InvalidTransition(what="migration", key=MIG,
                                                        current="COMMITTED",
                                                        target="AbortRequested")]
    with pytest.raises(exception.InvalidTransition, match="from COMMITTED"):
        lm.abort(engine, MIG, "x")


def _unanswered(method: str = "abort") -> exception.ServiceUnreachable:
    return exception.ServiceUnreachable(service="vtpcm-engine", method=method,
                                        reason="MessagingTimeout")


def test_an_unanswered_abort_is_retried_with_backoff_then_lands() -> None:
    """Issue 10 review: one lost abort left the migration to the deadline."""
    engine = FakeEngine()
    engine._mig(MIG, "PREPARED")
    engine.fail["abort"] = [_unanswered(), _unanswered()]
    slept: list[float] = []
    info = lm.abort(engine, MIG, "rolled back", instance_uuid=INSTANCE, sleep=slept.append)
    assert info is not None and info.state == "ABORTED"
    assert engine.methods() == ["abort", "abort", "abort"]
    assert slept == [1.0, 2.0]
    assert engine.abort_instances == [INSTANCE] * 3


def test_an_abort_unanswered_every_time_gives_up_bounded_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine()
    engine._mig(MIG, "PREPARED")
    engine.fail["abort"] = [_unanswered() for _ in range(lm.ABORT_ATTEMPTS + 1)]
    slept: list[float] = []
    with pytest.raises(exception.ServiceUnreachable, match="did not answer abort"):
        lm.abort(engine, MIG, "rolled back", sleep=slept.append)
    assert engine.methods() == ["abort"] * lm.ABORT_ATTEMPTS
    assert slept == [1.0, 2.0, 4.0]
    assert "gave up aborting after %d unanswered attempts" % lm.ABORT_ATTEMPTS in caplog.text
    assert "reconcile finishes the abort" in caplog.text


def test_every_abort_attempt_is_bounded_so_the_whole_retry_is_too() -> None:
    """Review of issue 10: each attempt waited the full engine_timeout
    (120 s), some 8 minutes inside Nova's rollback."""
    engine = FakeEngine()
    engine._mig(MIG, "PREPARED")
    engine.fail["abort"] = [_unanswered() for _ in range(lm.ABORT_ATTEMPTS)]
    with pytest.raises(exception.ServiceUnreachable):
        lm.abort(engine, MIG, "rolled back", instance_uuid=INSTANCE, sleep=lambda _s: None)
    assert engine.abort_timeouts == [lm.ABORT_ATTEMPT_TIMEOUT] * lm.ABORT_ATTEMPTS
    assert lm.ABORT_BOUND == lm.ABORT_ATTEMPTS * lm.ABORT_ATTEMPT_TIMEOUT + 7.0 <= 130.0


def test_an_abort_to_an_engine_older_than_1_10_is_sent_without_the_instance() -> None:
    """A 1.9 engine in a rolling update cannot take ``instance_uuid``: the
    abort falls back to the form it serves instead of failing every
    rollback."""
    engine = FakeEngine()
    engine._mig(MIG, "PREPARED")
    engine.fail["abort"] = [exception.RPCVersionUnsupported(
        service="vtpcm-engine", method="abort", version="1.10",
        reason="it runs an older API version")]
    info = lm.abort(engine, MIG, "rolled back", instance_uuid=INSTANCE,
                    sleep=lambda _s: None)
    assert info is not None and info.state == "ABORTED"
    assert engine.abort_instances == [INSTANCE, None]


def test_a_refused_abort_is_not_retried() -> None:
    engine = FakeEngine()
    engine._mig(MIG, "COMMITTING")
    engine.fail["abort"] = [exception.InvalidTransition(what="migration", key=MIG,
                                                        current="COMMITTING",
                                                        target="AbortRequested")]
    with pytest.raises(exception.InvalidTransition):
        lm.abort(engine, MIG, "x", sleep=_no_sleep)
    assert engine.methods() == ["abort", "get_migration"]


def test_a_failed_begin_is_aborted_naming_its_instance_for_the_tombstone() -> None:
    """The engine may not have recorded the begin yet: with the instance,
    the abort leaves a tombstone that refuses the begin if it lands late."""
    engine = FakeEngine()
    engine.fail["begin"] = [_unanswered("begin")]
    with pytest.raises(exception.ServiceUnreachable, match="did not answer begin"):
        lm.begin(engine, MIG, INSTANCE, "src", "dst")
    assert engine.abort_instances == [INSTANCE]
    assert engine.migrations[MIG].state == "ABORTED"


def test_timed_logs_each_step_and_its_duration_even_when_it_raises(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="vtpcm_nova.virt.livemigration")
    with lm.timed("begin", MIG, INSTANCE):
        pass
    with pytest.raises(exception.HostNotTrusted, match="PCR 7"), \
            lm.timed("check destination", "-", INSTANCE):
        raise exception.HostNotTrusted(host="dst", reason="PCR 7 differs")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("vTPCM begin of migration %s took " % MIG)
    assert lines[0].endswith(" ms (instance %s)" % INSTANCE)
    assert lines[1].startswith("vTPCM check destination of migration - took ")


class _NoAgent:
    def get(self, host: str, instance_uuid: str) -> None:
        raise AssertionError("the destination's agent was asked")


def test_destination_socket_with_one_socket_dir_asks_no_agent() -> None:
    # one dir: <dir>/<instance>.ctrl is the only path the check accepts
    for dirs in (["/run/vtpcm"], ["/run/vtpcm/", "/run/vtpcm", ""]):
        path = lm.destination_socket(_NoAgent(), "dst", INSTANCE, dirs)  # type: ignore[arg-type]
        assert path == "/run/vtpcm/%s.ctrl" % INSTANCE
    # still checked: a path over sun_path's limit is refused before libvirt
    with pytest.raises(exception.InvalidInput, match="socket_dirs"):
        lm.destination_socket(_NoAgent(), "dst", INSTANCE, ["/" + "d" * 90])  # type: ignore[arg-type]


@pytest.mark.parametrize("refusal", [
    exception.ImportedStateMismatch(migration_id=MIG, reason="not the source's"),
    exception.ImportedStateUnverified(migration_id=MIG, reason="no write seen")])
def test_commit_refused_by_the_post_import_check_is_not_retried(
        refusal: exception.MigrationError) -> None:
    """The engine refuses (and audits) each retry again: raised at once,
    the migration waits for an operator."""
    engine = FakeEngine()
    engine._mig(MIG, "PREPARED")
    engine.fail["commit"] = [refusal] * 10
    slept: list[float] = []
    with pytest.raises(type(refusal)) as err:
        lm.commit(engine, MIG, sleep=slept.append)
    assert err.value is refusal
    assert engine.methods() == ["commit"] and slept == []
