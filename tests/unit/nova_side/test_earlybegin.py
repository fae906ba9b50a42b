"""EarlyBegins with the in-memory engine: who begins under which id, and
when an early begin nobody takes over is aborted."""

import threading

from tests.unit.nova_side.fakes import FakeEngine
from vtpcm_common import exception
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
    assert engine.methods() == ["begin"]
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
    assert engine.methods() == ["begin", "abort"]


def test_no_early_begin_when_the_timeout_is_zero() -> None:
    engine, nova = FakeEngine(), _Nova()
    early = _early(engine, nova, timeout=0)
    early.start(INSTANCE, "dst")
    assert early.join(INSTANCE, NOVA, "dst", timeout=1) == NOVA
    assert engine.methods() == []


def test_join_waits_for_an_early_begin_still_running() -> None:
    engine, nova = FakeEngine(), _Nova()
    release = threading.Event()
    inner = engine.begin

    def slow_begin(*args: str) -> object:
        release.wait(10)
        return inner(*args)
    engine.begin = slow_begin  # type: ignore[method-assign,assignment]
    early = _early(engine, nova)
    early.start(INSTANCE, "dst")
    threading.Timer(0.2, release.set).start()
    assert early.join(INSTANCE, NOVA, "dst", timeout=10) == NOVA
    assert _state(engine, NOVA) == "PREPARED"
