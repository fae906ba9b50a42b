"""Issue 8's shelved-vTPCM holes in the coordinator (fake agents and Nova,
real SQLite): an unshelve moves a SHELVED vTPCM only onto the host Nova
itself unshelves the instance onto, and a SHELVED vTPCM whose instance Nova
deleted (``_local_delete`` never reaches the driver) is destroyed on its
holder only after consecutive 404s, never on an error."""

import re

import pytest

from tests.unit.engine.test_coordinator import INSTANCE, FakeVerdict, env, trusted_in_db  # noqa: F401
from tests.unit.engine.test_coordinator_cold import _shelved
from vtpcm_common import exception
from vtpcm_common.api.agent import messages as am
from vtpcm_nova.engine import coordinator, shelved
from vtpcm_nova.engine.shelved import Observed, Presence, ServerView


def _third_trusted_host(db, trust, agents):
    sealed_to = []

    def seal(host, context, dest_kem_public):
        agents._record("seal", host)
        sealed_to.append(dest_kem_public)
        return am.SealedKey(b"envelope")
    agents.seal_migration_key = seal
    db.enroll_host("host-c", ak_public=b"ak-c", ak_name=b"n-c", kem_public=b"kem-of-c",
                   kem_name=b"kc", ek_certificate=None, approved=True)
    db.assign_policy("host-c", "golden")
    trusted_in_db(db, "host-c")
    trust.verdicts["host-c"] = FakeVerdict("TRUSTED")
    return sealed_to


def _unreachable():
    return exception.ServiceUnreachable(service="Nova's compute API",
                                        method="GET /servers/x", reason="HTTP 503")


NOT_ONTO_C = [
    ("unshelving onto host-b", lambda nova: nova.unshelving(INSTANCE, "host-b"),
     "Nova is unshelving the instance onto host-b, not onto host-c"),
    ("still shelved, no task", lambda nova: nova.servers.__setitem__(
        INSTANCE, ServerView(None, "shelved_offloaded", None)),
     "Nova is not unshelving the instance (task_state None)"),
    ("active elsewhere", lambda nova: nova.servers.__setitem__(
        INSTANCE, ServerView("host-c", "active", None)),
     "Nova shows the instance active, not shelved_offloaded"),
    ("deleted (404)", lambda nova: nova.servers.__setitem__(INSTANCE, None),
     "Nova has no such instance"),
    ("Nova unreachable", lambda nova: setattr(nova, "fail", _unreachable()),
     "Nova could not be asked"),
]


@pytest.mark.parametrize("case, nova_says, why", NOT_ONTO_C, ids=[c[0] for c in NOT_ONTO_C])
def test_a_trusted_host_nova_is_not_unshelving_onto_is_refused(env, case, nova_says, why):  # noqa: F811
    """The review's HIGH: host-c is enrolled, approved and TRUSTED, and signs
    its own unshelve; before this fix the engine sealed the state to it."""
    coord, db, agents, trust, cold = _shelved(env)
    sealed_to = _third_trusted_host(db, trust, agents)
    nova_says(coord.nova)
    calls_before = list(agents.calls)
    with pytest.raises(exception.UnshelveNotAuthorized, match=re.escape(why)) as err:
        coord.unshelve_vtpcm(INSTANCE, "host-c", requested_by="host-c")
    assert "onto host-c refused" in str(err.value)
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == \
        ("host-a", 0, "SHELVED", None)
    assert agents.calls == calls_before and not cold.imported  # nothing sealed or moved
    assert db.list_migrations(instance_uuid=INSTANCE) == []
    (audit,) = [a for a in db.list_audit(limit=50) if a.event == "vtpcm.unshelve"]
    assert (audit.outcome, audit.host) == ("refused", "host-c")
    assert "not authorized by Nova" in audit.detail and why in audit.detail
    # positive control: Nova really unshelves onto host-c, and it moves there
    coord.nova.fail = None
    coord.nova.unshelving(INSTANCE, "host-c")
    rec = coord.unshelve_vtpcm(INSTANCE, "host-c", requested_by="host-c")
    assert (rec.host, rec.generation, rec.state) == ("host-c", 1, "ACTIVE")
    assert [h for h, _ in cold.imported] == ["host-c"]
    assert sealed_to == [b"kem-of-c"]


def test_without_nova_configured_every_unshelve_elsewhere_is_refused(env):  # noqa: F811
    coord, db, agents, _, cold = _shelved(env)
    coord.nova = None
    with pytest.raises(exception.UnshelveNotAuthorized, match=r"\[nova\] auth_type"):
        coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and not cold.imported
    # back onto the holder needs no transfer, hence no word from Nova
    rec = coord.unshelve_vtpcm(INSTANCE, "host-a", requested_by="host-a")
    assert (rec.host, rec.state, rec.generation) == ("host-a", "ACTIVE", 0)


def test_unshelve_onto_the_holder_does_not_ask_nova(env):  # noqa: F811
    coord, _, _, _, cold = _shelved(env)
    coord.nova.fail = _unreachable()
    assert coord.unshelve_vtpcm(INSTANCE, "host-a", requested_by="host-a").state == "ACTIVE"
    assert coord.nova.asked == [] and not cold.imported


# --- reaping the shelved vTPCM of a deleted instance ----------------------------------

def _destroys(agents):
    return [c for c in agents.calls if c[0] == "destroy"]


def test_two_consecutive_404s_destroy_the_shelved_vtpcm_on_its_holder(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.servers[INSTANCE] = None  # deleted while shelved offloaded
    assert coord.reconcile() == 0
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and _destroys(agents) == []
    assert coord.reconcile() == 1
    assert _destroys(agents) == [("destroy", "host-a")]
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)
    events = [(a.event, a.outcome, a.host) for a in db.list_audit(limit=50)
              if a.event in ("vtpcm.destroy", "vtpcm.reap")]
    assert ("vtpcm.reap", "destroyed", "host-a") in events
    assert ("vtpcm.destroy", "destroyed", "host-a") in events
    assert coord.reconcile() == 0  # nothing left to reap


@pytest.mark.parametrize("between", ["unreachable", "present"])
def test_an_error_or_a_sighting_between_404s_starts_the_count_over(env, between):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    nova = coord.nova
    nova.servers[INSTANCE] = None
    coord.reconcile()
    if between == "unreachable":
        nova.fail = _unreachable()
    else:
        nova.servers[INSTANCE] = ServerView(None, "shelved_offloaded", None)
    coord.reconcile()
    nova.fail = None
    nova.servers[INSTANCE] = None
    coord.reconcile()
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and _destroys(agents) == []
    coord.reconcile()  # the second 404 in a row
    assert _destroys(agents) == [("destroy", "host-a")]


def test_nova_errors_forever_never_destroy(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.fail = _unreachable()
    for _ in range(5):
        coord.reconcile()
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and _destroys(agents) == []


def test_a_live_instance_is_never_reaped_whatever_nova_says(env):  # noqa: F811
    coord, db, agents, _, _ = env
    coord.nova.servers[INSTANCE] = None  # ACTIVE record: the driver's destroy handles it
    for _ in range(3):
        coord.reconcile()
    assert db.get_vtpcm(INSTANCE).state != "SHELVED" and _destroys(agents) == []
    assert coord.nova.asked == []


def test_a_record_that_changed_between_404s_starts_over(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.servers[INSTANCE] = None
    coord.reconcile()
    rec = db.get_vtpcm(INSTANCE)
    db.set_vtpcm_id(INSTANCE, rec.host, rec.generation, "another-vtpcm")
    coord.reconcile()
    assert _destroys(agents) == []
    coord.reconcile()
    assert _destroys(agents) == [("destroy", "host-a")]


def test_a_failed_destroy_keeps_it_shelved_and_a_later_pass_finishes(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.servers[INSTANCE] = None
    agents.fail["destroy"] = exception.ServiceUnreachable(service="agent host-a",
                                                          method="destroy", reason="timeout")
    coord.reconcile()
    coord.reconcile()
    assert db.get_vtpcm(INSTANCE).state == "SHELVED"
    coord.reconcile()
    coord.reconcile()
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)


def test_without_nova_nothing_is_reaped(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova = None
    for _ in range(3):
        coord.reconcile()
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and _destroys(agents) == []


# --- the pure rules --------------------------------------------------------------------

def test_unshelve_refusal_needs_every_field():
    ok = ServerView("h", "shelved_offloaded", "unshelving")
    assert shelved.unshelve_refusal(ok, "h") == ""
    assert shelved.unshelve_refusal(ServerView("h", "shelved_offloaded", "spawning"), "h") == ""
    assert "not onto x" in shelved.unshelve_refusal(ok, "x")
    assert "task_state None" in shelved.unshelve_refusal(
        ServerView("h", "shelved_offloaded", None), "h")
    assert "shelved, not" in shelved.unshelve_refusal(ServerView("h", "shelved", "spawning"),
                                                      "h")


def test_presence():
    assert shelved.presence(None) is Presence.GONE
    assert shelved.presence(ServerView(None, "deleted", None)) is Presence.GONE
    assert shelved.presence(ServerView(None, "soft-delete", None)) is Presence.PRESENT


def test_confirmations_need_consecutive_gone_answers_for_the_same_record():
    with pytest.raises(ValueError, match="at least two"):
        shelved.DeletionConfirmations(1)
    rule = shelved.DeletionConfirmations(3)
    seen = Observed("v", 0)
    assert not rule.observe("i", seen, Presence.GONE)
    assert not rule.observe("i", seen, Presence.GONE)
    assert not rule.observe("i", seen, Presence.UNKNOWN)
    assert rule.count("i") == 0
    assert not rule.observe("i", seen, Presence.GONE)
    assert not rule.observe("i", Observed("v", 1), Presence.GONE)  # generation moved
    assert rule.count("i") == 1
    assert not rule.observe("i", Observed("v", 1), Presence.GONE)
    assert rule.observe("i", Observed("v", 1), Presence.GONE)


def test_the_not_configured_reason_names_the_option():
    assert "[nova] auth_type" in coordinator.NOVA_NOT_CONFIGURED
