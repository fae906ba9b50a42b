"""The vTPCM's part of a cold migration or resize (plain functions, fake engine)."""

import pytest

from tests.unit.nova_side.fakes import VTPCM_ID, FakeAgents, FakeEngine
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em
from vtpcm_nova.virt import coldmigration

INSTANCE = "00000000-0000-0000-0000-000000000001"
MIG = "00000000-0000-0000-0000-0000000000bb"
DIRS = ["/run/vtpcm"]


def test_move_begins_then_transfers() -> None:
    engine = FakeEngine()
    info = coldmigration.move(engine, MIG, INSTANCE, "src", "dst")
    assert info.state == "TRANSFERRED"
    assert engine.methods() == ["begin", "transfer_state"]


@pytest.mark.parametrize("step", ["begin", "transfer_state"])
def test_a_failed_step_is_aborted_then_raised(step: str) -> None:
    engine = FakeEngine()
    engine.fail[step] = [exception.HostNotTrusted(host="dst", reason="PCR 7 differs")]
    with pytest.raises(exception.HostNotTrusted, match="PCR 7 differs"):
        coldmigration.move(engine, MIG, INSTANCE, "src", "dst")
    assert "abort" in engine.methods()


def test_a_transfer_answered_otherwise_is_aborted() -> None:
    engine = FakeEngine()
    engine.transfer_state = lambda mid: engine._mig(mid, "ABORTING")  # type: ignore
    with pytest.raises(exception.MigrationError, match="answered ABORTING"):
        coldmigration.move(engine, MIG, INSTANCE, "src", "dst")
    assert engine.methods()[-1] == "abort"


def _resized(engine: FakeEngine, state: str = "TRANSFERRED", dest: str = "dst") -> None:
    engine.vtpcms[INSTANCE] = em.VtpcmRecord(INSTANCE, VTPCM_ID, "src", 0, "MIGRATING", MIG)
    engine.migrations[MIG] = em.MigrationInfo(MIG, INSTANCE, "src", dest, 0, state, None)


@pytest.mark.parametrize("state", ["TRANSFERRED", "IN_DOUBT"])
def test_the_destination_runs_the_guest_on_the_incoming_vtpcm(state: str) -> None:
    engine = FakeEngine()
    _resized(engine, state)
    agents = FakeAgents(state="MIGRATING_IN", migration_id=MIG)
    path = coldmigration.guest_socket(engine, agents, INSTANCE, "dst", DIRS)
    assert path == "/run/vtpcm/%s.ctrl" % INSTANCE
    assert "start_vtpcm" not in engine.methods() and "create_vtpcm" not in engine.methods()


@pytest.mark.parametrize("state", ["TRANSFERRED", "IN_DOUBT"])
def test_a_stopped_incoming_vtpcm_is_started_again_through_the_engine(state: str) -> None:
    """Review finding F2: the guest stopped on the destination before the
    confirm (its QEMU stopped the swtpm); starting it again needs its vTPCM."""
    engine = FakeEngine()
    _resized(engine, state)
    agents = FakeAgents(state="MIGRATING_IN", migration_id=MIG, running=False)
    path = coldmigration.guest_socket(engine, agents, INSTANCE, "dst", DIRS)
    assert path == "/run/vtpcm/%s.ctrl" % INSTANCE
    assert ("start_incoming", MIG) in engine.calls
    assert "start_vtpcm" not in engine.methods()


def test_a_refused_start_of_the_incoming_vtpcm_is_raised() -> None:
    engine = FakeEngine()
    _resized(engine)
    engine.fail["start_incoming"] = [exception.CommandRefused(
        method="start_incoming", reason="migration is COMMITTED")]
    agents = FakeAgents(state="MIGRATING_IN", migration_id=MIG, running=False)
    with pytest.raises(exception.CommandRefused, match="migration is COMMITTED"):
        coldmigration.guest_socket(engine, agents, INSTANCE, "dst", DIRS)


@pytest.mark.parametrize(("agents", "why"), [
    (FakeAgents(state="MIGRATING_IN", migration_id=VTPCM_ID), "MIGRATING_IN"),
    (FakeAgents(state="ACTIVE"), "ACTIVE"),
])
def test_no_guest_on_anything_but_this_migrations_running_incoming(agents: FakeAgents,
                                                                   why: str) -> None:
    engine = FakeEngine()
    _resized(engine)
    with pytest.raises(exception.MigrationError, match=why):
        coldmigration.guest_socket(engine, agents, INSTANCE, "dst", DIRS)


@pytest.mark.parametrize("state", ["PREPARED", "TRANSFERRING", "ABORTED"])
def test_before_the_transfer_the_destination_is_refused_as_before(state: str) -> None:
    """A live migration's destination (PREPARED) never builds a guest here."""
    engine = FakeEngine()
    _resized(engine, state)
    with pytest.raises(exception.VTPCMNotHere, match="lives on src"):
        coldmigration.guest_socket(engine, FakeAgents(state="MIGRATING_IN",
                                                      migration_id=MIG),
                                   INSTANCE, "dst", DIRS)


def test_a_third_host_is_refused() -> None:
    engine = FakeEngine()
    _resized(engine, dest="dst")
    with pytest.raises(exception.VTPCMNotHere):
        coldmigration.guest_socket(engine, FakeAgents(), INSTANCE, "other", DIRS)


def test_elsewhere_the_held_vtpcm_is_created_or_started() -> None:
    engine = FakeEngine()
    assert coldmigration.guest_socket(engine, FakeAgents(), INSTANCE, "a", DIRS) == \
        "/run/vtpcm/%s.ctrl" % INSTANCE
    assert engine.methods()[-2:] == ["create_vtpcm", "start_vtpcm"]


def test_confirm_commits_and_revert_aborts() -> None:
    engine = FakeEngine()
    _resized(engine)
    assert coldmigration.confirm(engine, MIG).state == "COMMITTED"
    engine = FakeEngine()
    _resized(engine)
    info = coldmigration.revert(engine, MIG, "reverted")
    assert info is not None and info.state == "ABORTED"
