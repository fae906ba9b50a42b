"""EarlyBegins with the in-memory engine: who begins under which id, and
when an early begin nobody takes over is aborted."""

import sys
import threading
import time

import pytest

from tests.unit.nova_side.fakes import FakeEngine
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em
from vtpcm_lab import daemons
from vtpcm_nova.virt import earlybegin

NOVA = "00000000-0000-0000-0000-0000000000cc"
INSTANCE = "00000000-0000-0000-0000-000000000001"


class _Nova:
    def __init__(self, status: str = "accepted") -> None:
        self.status = status
        self.migration: str | None = NOVA

    def find(self, instance_uuid: str) -> str | None:
        return self.migration

    def status_of(self, nova_id: str) -> str | None:
        return self.status


def _held_aborts(engine: FakeEngine) -> tuple[threading.Event, threading.Event]:
    """The engine's aborts signal the first event when called and answer
    only once the second is set (at most 10 s)."""
    started, release = threading.Event(), threading.Event()
    inner_abort = engine.abort

    def slow_abort(*args: str, **kwargs: str) -> object:
        started.set()
        release.wait(10)
        return inner_abort(*args, **kwargs)
    engine.abort = slow_abort  # type: ignore[method-assign,assignment]
    return started, release


def _early(engine: FakeEngine, nova: _Nova, timeout: float = 60.0) -> earlybegin.EarlyBegins:
    return earlybegin.EarlyBegins(lambda: engine, lambda: "src", nova.find, nova.status_of,
                                  lambda: timeout, poll=0.02, wait_previous=lambda: 10.0)


def _state(engine: FakeEngine, migration_id: str) -> str | None:
    info = engine.migrations.get(migration_id)
    return info.state if info else None


def test_live_migration_takes_the_prepared_early_begin_over() -> None:
    engine, nova = FakeEngine(), _Nova()
    early = _early(engine, nova)
    early.start(INSTANCE, "dst")
    assert early.join(INSTANCE, NOVA, "dst", timeout=10) == NOVA
    assert early.migration_id(NOVA) == NOVA
    # the early begin asked the engine which ids of Nova's migration it knows
    assert engine.methods() == ["get_migration", "begin"]
    assert _state(engine, NOVA) == "PREPARED"


def test_an_early_begin_nobody_takes_over_is_aborted_after_the_timeout() -> None:
    engine, nova = FakeEngine(), _Nova()  # Nova's record stays "accepted"
    early = _early(engine, nova, timeout=0.2)
    early.start(INSTANCE, "dst")
    daemons.wait_for("abort", lambda: _state(engine, NOVA) == "ABORTED", timeout=10)
    assert engine.abort_instances == [INSTANCE]
    # live_migration coming after all begins under a fresh id
    fresh = early.join(INSTANCE, NOVA, "dst", timeout=10)
    assert fresh == earlybegin.attempt_id(NOVA, "dst", 1) != NOVA


def test_an_early_begin_for_another_destination_is_aborted_not_used() -> None:
    engine, nova = FakeEngine(), _Nova()
    early = _early(engine, nova)
    early.start(INSTANCE, "dst")
    daemons.wait_for("early begin", lambda: _state(engine, NOVA) == "PREPARED", timeout=10)
    chosen = early.join(INSTANCE, NOVA, "other", timeout=10)
    assert chosen == earlybegin.attempt_id(NOVA, "other", 1)
    assert _state(engine, NOVA) == "ABORTED"  # before live_migration begins


def test_a_failed_early_begin_leaves_the_decision_to_live_migrations_begin() -> None:
    engine, nova = FakeEngine(), _Nova()
    engine.fail["begin"] = [exception.HostNotTrusted(host="dst", reason="PCR 7 differs")]
    early = _early(engine, nova)
    early.start(INSTANCE, "dst")
    chosen = early.join(INSTANCE, NOVA, "dst", timeout=10)
    # the refused id is spent; live_migration's begin runs under a new one
    assert chosen == earlybegin.attempt_id(NOVA, "dst", 1)
    assert [m for m in engine.methods() if m != "get_migration"] == ["begin", "abort"]


def test_no_early_begin_when_the_timeout_is_zero() -> None:
    engine, nova = FakeEngine(), _Nova()
    early = _early(engine, nova, timeout=0)
    early.start(INSTANCE, "dst")
    assert early.join(INSTANCE, NOVA, "dst", timeout=1) == NOVA
    assert engine.methods() == ["get_migration"]  # unknown: Nova's uuid is free


def _held_begins(engine: FakeEngine) -> threading.Event:
    """The engine's begins wait (at most 10 s) until the returned event is set."""
    release = threading.Event()
    inner = engine.begin

    def held_begin(*args: str) -> object:
        release.wait(10)
        return inner(*args)
    engine.begin = held_begin  # type: ignore[method-assign,assignment]
    return release


def test_join_waits_for_an_early_begin_still_running() -> None:
    engine, nova = FakeEngine(), _Nova()
    release = _held_begins(engine)
    early = _early(engine, nova)
    early.start(INSTANCE, "dst")
    threading.Timer(0.2, release.set).start()
    assert early.join(INSTANCE, NOVA, "dst", timeout=10) == NOVA
    assert _state(engine, NOVA) == "PREPARED"


class _GapLock:
    """The EarlyBegins lock, pausing its holder right after it leaves the
    critical section of a given method: forces one interleaving of the
    watchdog and live_migration's join."""

    def __init__(self, pauses: dict[str, tuple[threading.Event, threading.Event]]) -> None:
        self._lock = threading.Lock()
        self._pauses = dict(pauses)  # method -> (signal when left, wait for)

    def __enter__(self) -> "_GapLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        name = sys._getframe(1).f_code.co_name
        self._lock.release()
        pause = self._pauses.pop(name, None)
        if pause is not None:
            left, resume = pause
            left.set()
            resume.wait(2)


def test_the_watchdog_never_aborts_an_early_begin_live_migration_takes_over() -> None:
    """The deadline passes just as live_migration joins: either the watchdog
    gives the begin up (and join begins under a fresh id, after the abort) or
    join takes it over (and nothing aborts it), never both."""
    engine, nova = FakeEngine(), _Nova()
    watched, joined, aborting = threading.Event(), threading.Event(), threading.Event()
    early = _early(engine, nova, timeout=0.05)
    early._poll = 0.1
    early._lock = _GapLock({"_watch": (watched, joined),  # type: ignore[assignment]
                            "join": (joined, aborting)})
    inner_abort = engine.abort

    def abort(*args: str, **kwargs: str) -> object:
        aborting.set()
        return inner_abort(*args, **kwargs)
    engine.abort = abort  # type: ignore[method-assign,assignment]
    early.start(INSTANCE, "dst")
    assert watched.wait(10)  # the watchdog decided (deadline passed)
    chosen = early.join(INSTANCE, NOVA, "dst", timeout=10)
    time.sleep(0.3)  # a late abort would come now
    aborted = [c[1] for c in engine.calls if c[0] == "abort"]
    assert chosen not in aborted, "live_migration begins with %s, aborted by the watchdog" % chosen


def test_live_migration_joining_while_the_watchdog_reads_a_terminal_status_decides() -> None:
    """Nova's status read terminal while live_migration joins: join decides
    (takes the begin over), the watchdog does not abort it."""
    engine, nova = FakeEngine(), _Nova()
    reading, joined = threading.Event(), threading.Event()

    def status_of(nova_id: str) -> str:
        reading.set()
        joined.wait(5)
        return "failed"
    early = earlybegin.EarlyBegins(lambda: engine, lambda: "src", nova.find, status_of,
                                   lambda: 60.0, poll=0.02, wait_previous=lambda: 10.0)
    early._lock = _GapLock({"join": (joined, threading.Event())})  # type: ignore[assignment]
    early.start(INSTANCE, "dst")
    assert reading.wait(10)
    assert early.join(INSTANCE, NOVA, "dst", timeout=10) == NOVA
    time.sleep(0.3)
    assert "abort" not in engine.methods()
    assert _state(engine, NOVA) == "PREPARED"


def test_an_early_begin_is_aborted_when_novas_migration_is_terminal() -> None:
    engine, nova = FakeEngine(), _Nova(status="error")
    early = _early(engine, nova, timeout=600)
    early.start(INSTANCE, "dst")
    daemons.wait_for("abort", lambda: _state(engine, NOVA) == "ABORTED", timeout=10)


def test_join_waits_for_the_abort_of_an_early_begin_given_up() -> None:
    """The early begin holds the vTPCM until its abort is through; a begin
    under a fresh id before that would be refused."""
    engine, nova = FakeEngine(), _Nova()
    started, release = _held_aborts(engine)
    early = _early(engine, nova, timeout=0.05)
    early.start(INSTANCE, "dst")
    assert started.wait(10)
    threading.Timer(0.3, release.set).start()
    fresh = early.join(INSTANCE, NOVA, "dst", timeout=10)
    assert _state(engine, NOVA) == "ABORTED"  # before live_migration begins
    assert fresh == earlybegin.attempt_id(NOVA, "dst", 1)


def test_join_waits_at_most_its_timeout_in_all() -> None:
    """For the early begin's answer and then for its abort: one bound."""
    engine, nova = FakeEngine(), _Nova()
    release = threading.Event()
    inner_begin, inner_abort = engine.begin, engine.abort

    def slow_begin(*args: str) -> object:
        time.sleep(0.4)
        return inner_begin(*args)

    def stuck_abort(*args: str, **kwargs: str) -> object:
        release.wait(10)
        return inner_abort(*args, **kwargs)
    engine.begin = slow_begin  # type: ignore[method-assign,assignment]
    engine.abort = stuck_abort  # type: ignore[method-assign,assignment]
    early = _early(engine, nova)
    early.start(INSTANCE, "dst")
    began = time.monotonic()
    early.join(INSTANCE, NOVA, "other", timeout=0.5)  # another destination: aborted
    waited = time.monotonic() - began
    release.set()
    assert waited < 0.75


def test_after_a_restart_join_takes_over_the_derived_begin_the_engine_holds() -> None:
    """nova-compute restarted after an early begin under a derived id (a
    retry to another host): the engine's PREPARED begin is found, not a
    begin under Nova's uuid refused while it holds the vTPCM."""
    engine, nova = FakeEngine(), _Nova()
    derived = earlybegin.attempt_id(NOVA, "dst", 1)
    engine.migrations[NOVA] = em.MigrationInfo(NOVA, INSTANCE, "src", "first", 0,
                                               "ABORTED", "superseded")
    engine.migrations[derived] = em.MigrationInfo(derived, INSTANCE, "src", "dst", 0,
                                                  "PREPARED", None)
    restarted = _early(engine, nova)
    assert restarted.join(INSTANCE, NOVA, "dst", timeout=1) == derived
    assert restarted.migration_id(NOVA) == derived
    assert "abort" not in engine.methods()


def test_after_a_restart_a_begin_prepared_for_another_host_is_aborted() -> None:
    engine, nova = FakeEngine(), _Nova()
    engine.migrations[NOVA] = em.MigrationInfo(NOVA, INSTANCE, "src", "first", 0,
                                               "PREPARED", None)
    restarted = _early(engine, nova)
    chosen = restarted.join(INSTANCE, NOVA, "dst", timeout=1)
    assert chosen == earlybegin.attempt_id(NOVA, "dst", 1)
    assert _state(engine, NOVA) == "ABORTED"


def test_early_begins_beyond_the_bound_begin_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(earlybegin, "MAX_THREADS", 1)
    engine, nova = FakeEngine(), _Nova()
    release = _held_begins(engine)
    early = _early(engine, nova)
    early.start(INSTANCE, "dst")
    early.start("00000000-0000-0000-0000-000000000002", "dst")  # no thread left
    release.set()
    daemons.wait_for("early begin", lambda: _state(engine, NOVA) == "PREPARED", timeout=10)
    assert engine.methods().count("begin") == 1
    assert early.join("00000000-0000-0000-0000-000000000002", NOVA, "dst", 1) != NOVA


def _slow_lookups(engine: FakeEngine, delay: float) -> None:
    """The engine answers the early threads' lookups slowly."""
    inner = engine.get_migration

    def get_migration(migration_id: str) -> em.MigrationInfo:
        if threading.current_thread().name.startswith("vtpcm-early-begin"):
            time.sleep(delay)
        return inner(migration_id)
    engine.get_migration = get_migration  # type: ignore[method-assign]


def test_a_slow_early_lookup_never_aborts_what_live_migration_takes_over() -> None:
    """Review round 2, MEDIUM: after a restart a check to another destination
    (forged, or slow) looks up Nova's uuid, PREPARED to the destination
    live_migration then goes to; join gives up waiting for it. Neither may
    the early thread abort Nova's uuid nor join begin under it meanwhile:
    join rolls back, and the early thread gives up without aborting."""
    engine, nova = FakeEngine(), _Nova()
    engine.migrations[NOVA] = em.MigrationInfo(NOVA, INSTANCE, "src", "dst", 0,
                                               "PREPARED", None)
    _slow_lookups(engine, 0.5)
    restarted = _early(engine, nova)
    restarted.start(INSTANCE, "elsewhere")
    time.sleep(0.05)
    with pytest.raises(exception.MigrationError, match="did not answer"):
        restarted.join(INSTANCE, NOVA, "dst", timeout=0.2)
    time.sleep(1.0)  # the early thread's late lookup answers now
    assert "abort" not in engine.methods()
    assert _state(engine, NOVA) == "PREPARED"


def test_an_early_lookup_finding_the_begin_to_its_destination_hands_it_to_join() -> None:
    """Review round 2, LOW: the early thread found Nova's uuid PREPARED to
    its destination (a restart) while live_migration joined: join takes it
    over instead of beginning under a derived id the engine refuses."""
    engine, nova = FakeEngine(), _Nova()
    engine.migrations[NOVA] = em.MigrationInfo(NOVA, INSTANCE, "src", "dst", 0,
                                               "PREPARED", None)
    _slow_lookups(engine, 0.3)
    restarted = _early(engine, nova)
    restarted.start(INSTANCE, "dst")
    time.sleep(0.05)
    assert restarted.join(INSTANCE, NOVA, "dst", timeout=10) == NOVA
    time.sleep(0.3)
    assert "abort" not in engine.methods()


def test_one_choice_of_an_id_per_nova_migration_at_a_time() -> None:
    """Two lookups of one Nova migration never run at once (a superseded
    early thread and join): the second waits, or gives up after its wait."""
    engine, nova = FakeEngine(), _Nova()
    inside, release = threading.Event(), threading.Event()
    inner = engine.get_migration

    def get_migration(migration_id: str) -> em.MigrationInfo:
        inside.set()
        release.wait(10)
        return inner(migration_id)
    engine.get_migration = get_migration  # type: ignore[method-assign]
    early = _early(engine, nova)
    first = threading.Thread(target=early._choose, args=(INSTANCE, NOVA, "dst"),
                             kwargs={"wait": 10})
    first.start()
    assert inside.wait(10)
    assert early._choose(INSTANCE, NOVA, "dst", wait=0.2) is None
    release.set()
    first.join(10)
    assert early._choose(INSTANCE, NOVA, "dst", wait=1) == earlybegin.attempt_id(NOVA, "dst", 1)


def test_an_id_whose_abort_was_sent_from_here_is_never_taken_over() -> None:
    """An abort that failed or timed out here may still be carried out at the
    engine later (a queued RPC), so its id must never be taken over by
    live_migration's lookup, PREPARED as the engine may still answer: libvirt
    would run on a destination vTPCM the late abort destroys (review round 2
    of the early begin, the edge left out)."""
    engine, nova = FakeEngine(), _Nova()
    engine.fail["abort"] = [exception.MigrationError(migration_id=NOVA, reason="timed out")
                            for _ in range(10)]
    early = _early(engine, nova, timeout=0.2)
    early.start(INSTANCE, "dst")
    daemons.wait_for("abort sent", lambda: "abort" in engine.methods(), timeout=10)
    time.sleep(0.3)  # the abort's retries end; the engine still says PREPARED
    assert _state(engine, NOVA) == "PREPARED"  # control: the lookup would find it
    chosen = early.join(INSTANCE, NOVA, "dst", timeout=5)
    assert chosen != NOVA
    assert chosen == earlybegin.attempt_id(NOVA, "dst", 1)


def test_an_id_aborted_from_here_is_never_chosen_when_the_lookup_fails() -> None:
    """Review round 3, F1 (MEDIUM): the watchdog's abort failed (the engine
    may still carry it out) and its end forgot the migration's ids; then
    live_migration's lookup at the engine fails too. The next id must skip
    the one aborted from here, not hand Nova's uuid back to libvirt."""
    engine, nova = FakeEngine(), _Nova()
    engine.fail["abort"] = [exception.MigrationError(migration_id=NOVA, reason="timed out")]
    early = _early(engine, nova, timeout=0.2)
    early.start(INSTANCE, "dst")
    daemons.wait_for("the watchdog's abort ended", lambda: (
        "abort" in engine.methods() and not early._aborting and NOVA not in early._used),
        timeout=10)
    assert _state(engine, NOVA) == "PREPARED"  # the abort may still land there
    engine.fail["get_migration"] = [exception.ServiceUnreachable(
        service="engine", method="get_migration", reason="timed out")]
    chosen = early.join(INSTANCE, NOVA, "dst", timeout=5)
    assert chosen == earlybegin.attempt_id(NOVA, "dst", 1) != NOVA
    assert engine.methods().count("get_migration") == 2  # the failed lookup: control


def test_the_next_id_is_chosen_in_one_critical_section_with_the_test_for_it() -> None:
    """Review round 3, F1 (second route): join's wait for the watchdog's
    abort times out; the abort's end forgets the migration's ids between
    join's test (ids known) and its choice. Not one choice: the ids known
    when tested are the ones skipped. After a restart, Nova's uuid ended
    under the old process (the engine refuses it), the early begin ran
    under the first derived id and was given up."""
    engine, nova = FakeEngine(), _Nova()
    engine.migrations[NOVA] = em.MigrationInfo(NOVA, INSTANCE, "src", "first", 0,
                                               "ABORTED", "superseded")
    first = earlybegin.attempt_id(NOVA, "dst", 1)
    aborting, release = _held_aborts(engine)
    chose, resume = threading.Event(), threading.Event()
    gap = _GapLock({})
    restarted = _early(engine, nova, timeout=0.2)
    restarted._lock = gap  # type: ignore[assignment]
    restarted.start(INSTANCE, "dst")
    assert aborting.wait(10)  # the watchdog gave the derived begin up
    assert _state(engine, first) == "PREPARED"
    # join pauses right after its first critical section in _choose_alone ...
    gap._pauses["_choose_alone"] = (chose, resume)

    def abort_ends() -> None:
        # ... until the abort's end forgot the migration's ids
        assert chose.wait(10)
        release.set()
        daemons.wait_for("ids forgotten", lambda: NOVA not in restarted._used, timeout=10)
        resume.set()
    helper = threading.Thread(target=abort_ends)
    helper.start()
    chosen = restarted.join(INSTANCE, NOVA, "dst", timeout=0.3)
    helper.join(10)
    assert chosen == earlybegin.attempt_id(NOVA, "dst", 2), chosen


def test_a_slow_status_read_never_keeps_the_begin_past_the_timeout() -> None:
    """Review round 3, L1: Nova's status read (a conductor call, up to
    rpc_response_timeout) is not waited for past [vtpcm]
    early_begin_timeout: the begin nobody takes over is aborted on time."""
    engine = FakeEngine()
    reads: list[float] = []

    def slow_status(nova_id: str) -> str:
        reads.append(time.monotonic())
        time.sleep(2.0)  # the conductor is slow
        return "accepted"
    early = earlybegin.EarlyBegins(lambda: engine, lambda: "src", _Nova().find, slow_status,
                                   lambda: 0.3, poll=0.02, wait_previous=lambda: 10.0)
    early.start(INSTANCE, "dst")
    daemons.wait_for("prepared", lambda: _state(engine, NOVA) == "PREPARED", timeout=10)
    prepared = time.monotonic()
    daemons.wait_for("abort", lambda: _state(engine, NOVA) == "ABORTED", timeout=10)
    late = time.monotonic() - prepared
    assert reads  # control: a read was under way
    assert late < 0.3 + 0.5, "PREPARED %.1f s, with a timeout of 0.3 s" % late


def test_the_id_of_a_failed_early_begin_is_never_taken_over() -> None:
    """A begin that failed (its answer lost: the engine may hold it
    PREPARED) was aborted by begin itself, maybe in vain: remembered like
    the watchdog's aborts, so that a lookup after its ids were forgotten
    (Nova's rollback) skips it."""
    engine, nova = FakeEngine(), _Nova()
    inner_begin = engine.begin

    def lost_begin(*args: str) -> object:
        inner_begin(*args)  # PREPARED at the engine, the answer lost
        raise exception.ServiceUnreachable(service="engine", method="begin",
                                           reason="timed out")
    engine.begin = lost_begin  # type: ignore[method-assign,assignment]
    engine.fail["abort"] = [exception.MigrationError(migration_id=NOVA, reason="timed out")]
    early = _early(engine, nova)
    early.start(INSTANCE, "dst")
    daemons.wait_for("begin failed", lambda: "abort" in engine.methods(), timeout=10)
    early.forget(NOVA)  # Nova rolled back; a retry of the same migration looks up
    engine.begin = inner_begin  # type: ignore[method-assign]
    chosen = early.join(INSTANCE, NOVA, "dst", timeout=5)
    assert _state(engine, NOVA) == "PREPARED"  # control: the lookup would take it
    assert chosen == earlybegin.attempt_id(NOVA, "dst", 1)


def _hung_status(gate: threading.Event, reads: list[float]):
    def status(nova_id: str) -> str:
        reads.append(time.monotonic())
        gate.wait(30)  # the conductor does not answer (rpc_response_timeout)
        return "accepted"
    return status


def _hung_early(engine: FakeEngine, gate: threading.Event, reads: list[float],
                timeout: float, wait_previous: float = 10.0) -> earlybegin.EarlyBegins:
    return earlybegin.EarlyBegins(lambda: engine, lambda: "src", _Nova().find,
                                  _hung_status(gate, reads), lambda: timeout, poll=0.02,
                                  wait_previous=lambda: wait_previous)


def test_a_join_for_another_destination_wakes_a_watchdog_inside_its_status_read() -> None:
    """Review round 4 (LOW 2): the watchdog in a hung status read heeded
    neither a join nor a superseding check until early_begin_timeout, so a
    join for another destination whose wait (engine_timeout) ran out first
    handed live_migration a fresh id while the early begin still held the
    vTPCM (the engine refuses that begin: Nova rolls back)."""
    engine, gate, reads = FakeEngine(), threading.Event(), []
    early = _hung_early(engine, gate, reads, timeout=3.0)
    try:
        early.start(INSTANCE, "dst")
        daemons.wait_for("a read under way", lambda: reads, timeout=10)
        early.join(INSTANCE, NOVA, "other", timeout=1.0)
        assert _state(engine, NOVA) != "PREPARED"
    finally:
        gate.set()


def test_a_taken_early_begin_frees_its_slot_while_the_status_read_hangs() -> None:
    """Same cause: a begin taken over kept its thread slot until the
    deadline when the conductor was slow."""
    engine, gate, reads = FakeEngine(), threading.Event(), []
    early = _hung_early(engine, gate, reads, timeout=3.0)
    try:
        early.start(INSTANCE, "dst")
        daemons.wait_for("a read under way", lambda: reads, timeout=10)
        assert early.join(INSTANCE, NOVA, "dst", timeout=5) == NOVA
        daemons.wait_for("the slot back", lambda: early._slots._value == earlybegin.MAX_THREADS,
                         timeout=1.5)
    finally:
        gate.set()


def test_hung_status_reads_left_behind_are_bounded_too() -> None:
    """Review round 4 (LOW 1): each early begin given up at its deadline
    left its status read running and freed its slot, so the status threads
    grew past MAX_THREADS (48 alive after three waves of 16)."""
    engine, gate, reads = FakeEngine(), threading.Event(), []
    nova = _Nova()
    early = earlybegin.EarlyBegins(lambda: engine, lambda: "src", nova.find,
                                   _hung_status(gate, reads), lambda: 0.2, poll=0.02,
                                   wait_previous=lambda: 10.0)
    try:
        for wave in range(3):
            for i in range(earlybegin.MAX_THREADS):
                nova.migration = "00000000-0000-0000-%04d-%012d" % (wave, i)
                early.start("11111111-0000-0000-%04d-%012d" % (wave, i), "dst")
            daemons.wait_for("the wave given up",
                             lambda: early._slots._value == earlybegin.MAX_THREADS, timeout=20)
        status = [t for t in threading.enumerate()
                  if t.name.startswith("vtpcm-early-status-11111111")]
        assert len(status) <= earlybegin.MAX_THREADS
    finally:
        gate.set()


def test_a_superseded_early_begin_in_a_status_read_is_aborted_before_the_next_begins() -> None:
    """The conductor's retry to another host supersedes the early begin;
    its watchdog sat in the status read until the deadline, so the next
    early begin ran out of its wait and began while the superseded one
    still held the vTPCM."""
    engine, gate, reads = FakeEngine(), threading.Event(), []
    early = _hung_early(engine, gate, reads, timeout=4.0, wait_previous=1.0)
    try:
        early.start(INSTANCE, "dst")
        daemons.wait_for("a read under way", lambda: reads, timeout=10)
        early.start(INSTANCE, "other")
        second = earlybegin.attempt_id(NOVA, "other", 1)
        daemons.wait_for("the second begin", lambda: ("begin", second) in engine.calls,
                         timeout=10)
        assert _state(engine, NOVA) != "PREPARED"
    finally:
        gate.set()


def _read_only_early(status) -> earlybegin.EarlyBegins:
    return earlybegin.EarlyBegins(lambda: None, lambda: "src", lambda i: None, status,
                                  lambda: 30.0, poll=0.01)


def _reading(i: int) -> "earlybegin._Early":
    early = earlybegin._Early("inst-%d" % i, "dst", None)
    early.nova_id = "nova-%d" % i
    return early


def test_status_reads_that_end_give_their_slot_back() -> None:
    """Review of the read slots (LOW, test gap): without the release in the
    read's finally, after MAX_THREADS reads in nova-compute's life no early
    begin read Nova's status again."""
    early = _read_only_early(lambda nova_id: "error")
    for i in range(3 * earlybegin.MAX_THREADS):
        assert early._read_status(_reading(i), time.monotonic() + 5) == "error", i


def test_a_status_read_that_cannot_start_gives_its_slot_back(monkeypatch) -> None:
    early = _read_only_early(lambda nova_id: "error")

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    for i in range(earlybegin.MAX_THREADS + 1):
        assert early._read_status(_reading(i), time.monotonic() + 1) is None
    monkeypatch.undo()
    assert early._read_status(_reading(99), time.monotonic() + 5) == "error"
