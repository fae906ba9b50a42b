"""Which begins reconcile aborts at once (issue 10): the ownership rule of
``coordinator.begin_abandoned``, checked case by case against a live
begin of another worker, which must be left alone."""

import datetime

from vtpcm_nova.engine.coordinator import begin_abandoned, worker_id
from vtpcm_nova.engine.db.records import MigrationRecord

NOW = datetime.datetime(2026, 11, 30, 12, 0, 0)
BOUND = 90.0


def _rec(begun_by: str | None, idle: float) -> MigrationRecord:
    at = NOW - datetime.timedelta(seconds=idle)
    return MigrationRecord("m", "i", "a", "b", 0, "PREPARING", at, at,
                           NOW + datetime.timedelta(hours=3), None, "ACTIVE", begun_by)


def test_a_begin_of_this_workers_previous_run_is_abandoned_at_once() -> None:
    before, now = worker_id("engine-1"), worker_id("engine-1")
    assert before != now
    why = begin_abandoned(_rec(before, 0.5), now, NOW, BOUND)
    assert why == ("its begin never returned: the engine worker that ran it (%s) "
                   "restarted" % before)


def test_a_live_begin_of_this_run_or_another_worker_is_left_alone() -> None:
    me = worker_id("engine-1")
    assert begin_abandoned(_rec(me, BOUND), me, NOW, BOUND) is None
    # engine-10 shares a prefix with engine-1: not the same worker
    assert begin_abandoned(_rec(worker_id("engine-10"), BOUND), me, NOW, BOUND) is None
    assert begin_abandoned(_rec(None, 1), me, NOW, BOUND) is None


def test_a_begin_idle_past_one_steps_bound_is_abandoned_whoever_ran_it() -> None:
    me = worker_id("engine-1")
    for owner in (worker_id("engine-2"), None, me):
        assert begin_abandoned(_rec(owner, BOUND + 1), me, NOW, BOUND) == (
            "its begin never returned: no step for 91 s (one step takes at most 90 s)")


def test_host_names_with_slashes_compare_whole() -> None:
    me = worker_id("site/engine-1")
    assert begin_abandoned(_rec(worker_id("engine-1"), 1), me, NOW, BOUND) is None
    assert begin_abandoned(_rec(worker_id("site/engine-1"), 1), me, NOW, BOUND) is not None
