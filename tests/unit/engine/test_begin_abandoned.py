"""Which begins reconcile aborts (issue 10): the rule of
``coordinator.begin_abandoned``, checked case by case. A begin of a live
engine run is left alone, whatever its host name and however slow its
step; one of a run without a live lease is aborted at once."""

import datetime

from vtpcm_nova.engine.coordinator import begin_abandoned, worker_id
from vtpcm_nova.engine.db.records import MigrationRecord

NOW = datetime.datetime(2026, 11, 30, 12, 0, 0, tzinfo=datetime.UTC)
BOUND = 90.0


def _rec(begun_by: str | None, idle: float) -> MigrationRecord:
    at = NOW - datetime.timedelta(seconds=idle)
    return MigrationRecord("m", "i", "a", "b", 0, "PREPARING", at, at,
                           NOW + datetime.timedelta(hours=3), None, "ACTIVE", begun_by)


def _live(*workers: str):  # noqa: ANN202 - a tiny fake
    return lambda: frozenset(workers)


def _nowhere(_mid: str) -> bool:
    return False


def test_two_live_runs_sharing_a_host_name_leave_each_others_begins_alone() -> None:
    """Found by review: the name rule aborted the begin of the other live
    run of ``engine-1`` at every reconcile."""
    mine, other = worker_id("engine-1"), worker_id("engine-1")
    assert mine != other
    assert begin_abandoned(_rec(other, 0.5), mine, _live(mine, other), _nowhere,
                           NOW, BOUND) is None


def test_a_slow_step_of_a_live_run_is_never_aborted() -> None:
    mine, other = worker_id("engine-1"), worker_id("engine-2")
    assert begin_abandoned(_rec(other, 10 * BOUND), mine, _live(mine, other), _nowhere,
                           NOW, BOUND) is None
    assert begin_abandoned(_rec(mine, 10 * BOUND), mine, _live(mine),
                           lambda mid: mid == "m", NOW, BOUND) is None


def test_a_begin_of_a_run_without_a_live_lease_is_abandoned_at_once() -> None:
    mine, gone = worker_id("engine-1"), worker_id("engine-1")
    why = begin_abandoned(_rec(gone, 0.5), mine, _live(mine), _nowhere, NOW, BOUND)
    assert why == ("its begin never returned: the engine run that ran it (%s) holds no "
                   "live lease (stopped, or killed and its lease lapsed)" % gone)


def test_a_begin_this_run_recorded_but_no_longer_runs_is_abandoned() -> None:
    """Its thread ended without moving the state (an error between two
    writes): the lease is live, but this run knows it runs no such begin."""
    mine = worker_id("engine-1")
    why = begin_abandoned(_rec(mine, 0.5), mine, _live(mine), _nowhere, NOW, BOUND)
    assert why == ("its begin never returned: this engine run (%s) recorded it and no "
                   "longer runs it" % mine)


def test_the_lease_table_is_read_only_for_other_runs_begins() -> None:
    def unread() -> frozenset[str]:
        raise AssertionError("live workers read for a begin of this run")
    mine = worker_id("engine-1")
    assert begin_abandoned(_rec(mine, 1), mine, unread, lambda _m: True, NOW, BOUND) is None


def test_a_begin_without_a_recorded_run_falls_back_to_the_step_bound() -> None:
    mine = worker_id("engine-1")
    assert begin_abandoned(_rec(None, BOUND - 1), mine, _live(mine), _nowhere,
                           NOW, BOUND) is None
    assert begin_abandoned(_rec(None, BOUND + 1), mine, _live(mine), _nowhere, NOW,
                           BOUND) == ("its begin never returned: no step for 91 s (one "
                                      "step takes at most 90 s)")
