import pytest

from tests.unit.nova_side.fakes import FakeAgents, FakeEngine
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em
from vtpcm_nova.virt import lifecycle

INSTANCE = "00000000-0000-0000-0000-000000000001"
DIRS = ["/run/vtpcm"]


def test_spawn_creates_then_starts_and_returns_the_checked_socket() -> None:
    engine = FakeEngine()
    path = lifecycle.ensure_running(engine, FakeAgents(), INSTANCE, "a", DIRS)
    assert path == "/run/vtpcm/%s.ctrl" % INSTANCE
    assert engine.methods() == ["get_vtpcm", "create_vtpcm", "start_vtpcm"]


def test_reboot_reuses_the_existing_vtpcm() -> None:
    engine = FakeEngine()
    engine.create_vtpcm(INSTANCE, "a")
    engine.calls.clear()
    lifecycle.ensure_running(engine, FakeAgents(), INSTANCE, "a", DIRS)
    assert "create_vtpcm" not in engine.methods()


def test_vtpcm_held_elsewhere_is_refused_without_starting() -> None:
    engine = FakeEngine()
    engine.create_vtpcm(INSTANCE, "b")
    engine.calls.clear()
    with pytest.raises(exception.VTPCMNotHere, match="lives on b, not on a"):
        lifecycle.ensure_running(engine, FakeAgents(), INSTANCE, "a", DIRS)
    assert engine.methods() == ["get_vtpcm"]


def test_migrating_vtpcm_is_busy() -> None:
    engine = FakeEngine()
    engine.vtpcms[INSTANCE] = em.VtpcmRecord(INSTANCE, "00000000-0000-0000-0000-0000000000aa",
                                             "a", 0, "MIGRATING",
                                             "00000000-0000-0000-0000-0000000000bb")
    with pytest.raises(exception.VTPCMBusy, match="migration .* holds it"):
        lifecycle.ensure_running(engine, FakeAgents(), INSTANCE, "a", DIRS)


@pytest.mark.parametrize("socket_dir", ["/run/vtpcm/../../tmp", "/home/attacker", "/tmp"])
def test_a_forged_socket_answer_is_refused(socket_dir: str) -> None:
    agents = FakeAgents(socket_dir=socket_dir)
    with pytest.raises(exception.InvalidInput, match="one of \\[vtpcm\\] socket_dirs"):
        lifecycle.ensure_running(FakeEngine(), agents, INSTANCE, "a", DIRS)


def test_not_running_after_start_is_an_error() -> None:
    with pytest.raises(exception.SwtpmError, match="stopped right after start"):
        lifecycle.ensure_running(FakeEngine(), FakeAgents(running=False), INSTANCE, "a", DIRS)


def test_delete_destroys_only_on_the_holder() -> None:
    engine = FakeEngine()
    engine.create_vtpcm(INSTANCE, "b")
    assert lifecycle.destroy_if_held(engine, INSTANCE, "a") is False
    assert "destroy_vtpcm" not in engine.methods()
    assert lifecycle.destroy_if_held(engine, INSTANCE, "b") is True
    assert engine.methods().count("destroy_vtpcm") == 1
    # a retried delete, or a VM that never got a vTPCM: nothing to do, no error
    assert lifecycle.destroy_if_held(engine, INSTANCE, "b") is False
    assert engine.methods().count("destroy_vtpcm") == 1


def test_delete_while_migrating_aborts_first() -> None:
    engine = FakeEngine()
    mig = "00000000-0000-0000-0000-0000000000bb"
    engine._mig(mig, "PREPARED")
    engine.vtpcms[INSTANCE] = em.VtpcmRecord(INSTANCE, "00000000-0000-0000-0000-0000000000aa",
                                             "a", 0, "MIGRATING", mig)
    assert lifecycle.destroy_if_held(engine, INSTANCE, "a") is True
    assert engine.methods()[-2:] == ["abort", "destroy_vtpcm"]


def test_an_evacuation_with_a_fresh_vtpcm_replaces_then_starts() -> None:
    engine = FakeEngine()
    engine.create_vtpcm(INSTANCE, "failed")

    def replace(instance_uuid: str, host: str) -> em.VtpcmRecord:
        engine.calls.append(("replace_vtpcm", instance_uuid, host))
        engine.vtpcms[instance_uuid] = em.VtpcmRecord(
            instance_uuid, "00000000-0000-0000-0000-0000000000cc", host, 0, "STOPPED", None)
        return engine.vtpcms[instance_uuid]
    engine.replace_vtpcm = replace  # type: ignore[method-assign]
    engine.calls.clear()
    path = lifecycle.fresh_after_evacuation(engine, FakeAgents(), INSTANCE, "a", DIRS)
    assert path == "/run/vtpcm/%s.ctrl" % INSTANCE
    assert engine.methods() == ["replace_vtpcm", "get_vtpcm", "start_vtpcm"]


def test_a_refused_replacement_starts_nothing() -> None:
    engine = FakeEngine()
    engine.create_vtpcm(INSTANCE, "failed")

    def replace(instance_uuid: str, host: str) -> em.VtpcmRecord:
        raise exception.CommandRefused(method="replace_vtpcm", reason="the agent answers")
    engine.replace_vtpcm = replace  # type: ignore[method-assign]
    engine.calls.clear()
    with pytest.raises(exception.CommandRefused, match="the agent answers"):
        lifecycle.fresh_after_evacuation(engine, FakeAgents(), INSTANCE, "a", DIRS)
    assert engine.methods() == []
