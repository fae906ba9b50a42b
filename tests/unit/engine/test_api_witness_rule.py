"""Issue 8's last HIGH in the coordinator (fake agents and Nova, real
SQLite): with ``[nova] require_api_witness`` an unshelve onto another host
than the holder needs nova-api's witness of an unshelve request of that
instance, fresh and unused (Nova's own view is forgeable by any compute
host through nova-conductor), and the reaper shreds only on a witnessed
delete; without one it reports."""

import datetime
import re

import pytest

from tests.unit.engine.test_coordinator import INSTANCE, PROJECT, T0, env  # noqa: F401
from tests.unit.engine.test_coordinator_cold import _shelved
from tests.unit.engine.test_shelved_nova import _destroys, _third_trusted_host
from vtpcm_common import exception
from vtpcm_nova.engine import coordinator
from vtpcm_nova.engine.db import witnesses
from vtpcm_nova.engine.shelved import ServerView
from vtpcm_nova.engine.shelving import WITNESS_NOT_CONFIGURED, WitnessPolicy

OTHER = "0b5f6bb2-1d7f-4e0e-8d43-1c1f1d3a9e77"
REQUIRED = WitnessPolicy(required=True, keys_configured=True, max_age=600)


SHELVED_AGO = datetime.timedelta(hours=2)  # when the tests' vTPCM entered SHELVED


def _witness(db, instance=INSTANCE, action="unshelve", host=None, age=10.0, nonce="n1",
             project=PROJECT):
    at = T0 - datetime.timedelta(seconds=age)
    db.record_witness("key0:%s" % nonce, instance, action, host, "key0", at, at,
                      project_id=project, user_id="user-1")


def _shelved_before(env):  # noqa: F811
    """Shelved SHELVED_AGO before T0 (the clock then back at T0)."""
    clock = env[4]
    clock["now"] = T0 - SHELVED_AGO
    shelved = _shelved(env)
    clock["now"] = T0
    return shelved


def _required(env):  # noqa: F811
    coord, db, agents, trust, cold = _shelved_before(env)
    coord.witness = REQUIRED
    _third_trusted_host(db, trust, agents)
    coord.nova.unshelving(INSTANCE, "host-c")  # Nova's view: onto host-c (maybe forged)
    return coord, db, agents, cold


def _refused(coord, db, agents, cold, why):
    calls_before = list(agents.calls)
    with pytest.raises(exception.UnshelveNotAuthorized, match=re.escape(why)):
        coord.unshelve_vtpcm(INSTANCE, "host-c", requested_by="host-c")
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == \
        ("host-a", 0, "SHELVED", None)
    assert agents.calls == calls_before and not cold.imported  # nothing sealed or moved
    assert db.list_migrations(instance_uuid=INSTANCE) == []


def test_nova_view_alone_moves_nothing_when_witnesses_are_required(env):  # noqa: F811
    """The review's attack: host-c wrote host/task_state through
    nova-conductor, so Nova's API shows the instance unshelving onto it, and
    it signs its own unshelve; nova-api never saw an unshelve request."""
    coord, db, agents, cold = _required(env)
    _refused(coord, db, agents, cold, "nova-api witnessed no unshelve request")
    audit = [a for a in db.list_audit(limit=50) if a.event == "vtpcm.unshelve"]
    assert [(a.outcome, a.host) for a in audit] == [("refused", "host-c")]
    assert "not witnessed by nova-api" in audit[0].detail


@pytest.mark.parametrize("case, witness", [
    ("for another instance", dict(instance=OTHER)),
    ("stale", dict(age=601)),
    ("naming another host", dict(host="host-b")),
    ("of a delete", dict(action="delete")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_witness_that_does_not_fit_is_no_witness(env, case, witness):  # noqa: F811
    coord, db, agents, cold = _required(env)
    _witness(db, **witness)
    _refused(coord, db, agents, cold, "nova-api witnessed no unshelve request")
    assert all(w.used_at is None for w in db.list_witnesses(witness.get("instance",
                                                                        INSTANCE)))


@pytest.mark.parametrize("named", [None, "host-c"])
def test_a_fresh_witness_moves_it_once(env, named):  # noqa: F811
    coord, db, agents, cold = _required(env)
    _witness(db, host=named)
    rec = coord.unshelve_vtpcm(INSTANCE, "host-c", requested_by="host-c")
    assert (rec.host, rec.generation, rec.state) == ("host-c", 1, "ACTIVE")
    (used,) = db.list_witnesses(INSTANCE)
    assert used.used_at == T0 and used.used_by.startswith("unshelve ")
    assert db.has_audit(INSTANCE, "vtpcm.witness", "used")
    # shelved again on host-c, Nova shows an unshelve onto host-b: the used
    # witness does not count twice
    assert coord.shelve_vtpcm(INSTANCE, requested_by="host-c").state == "SHELVED"
    coord.nova.unshelving(INSTANCE, "host-b")
    with pytest.raises(exception.UnshelveNotAuthorized, match="nova-api witnessed no"):
        coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert db.get_vtpcm(INSTANCE).host == "host-c"


def test_without_witness_keys_the_refusal_names_the_options(env):  # noqa: F811
    coord, db, agents, cold = _required(env)
    coord.witness = WitnessPolicy(required=True, keys_configured=False)
    _witness(db)
    _refused(coord, db, agents, cold, WITNESS_NOT_CONFIGURED)
    assert "[nova] api_witness_public_keys" in WITNESS_NOT_CONFIGURED
    assert "[nova] require_api_witness = false" in WITNESS_NOT_CONFIGURED


def test_unshelve_onto_the_holder_needs_no_witness(env):  # noqa: F811
    coord, db, _, _ = _required(env)
    rec = coord.unshelve_vtpcm(INSTANCE, "host-a", requested_by="host-a")
    assert (rec.host, rec.state) == ("host-a", "ACTIVE")


def test_not_required_keeps_novas_view_alone(env):  # noqa: F811
    coord, db, _, _ = _required(env)
    coord.witness = WitnessPolicy(required=False)
    assert coord.unshelve_vtpcm(INSTANCE, "host-c", requested_by="host-c").host == "host-c"


# --- the reaper ----------------------------------------------------------------------

def _deleted(env, state="SHELVED"):  # noqa: F811
    coord, db, agents, _, _ = _shelved_before(env)
    coord.witness = REQUIRED
    if state != "SHELVED":
        db.set_vtpcm_state(INSTANCE, 0, state, expected_state="SHELVED",
                           expected_migration_id=None)
    coord.nova.deleted.add(INSTANCE)  # Nova's admin listing: deleted (maybe forged)
    return coord, db, agents


def test_an_unwitnessed_deletion_of_a_shelved_instance_is_only_reported(env):  # noqa: F811
    """A compromised compute host can make Nova show a shelved instance
    deleted (Instance.destroy through nova-conductor): before witnesses
    the reaper shredded its vTPCM, and the state was lost."""
    coord, db, agents = _deleted(env)
    for _ in range(4):
        assert coord.reap_deleted_shelved() == 0
    assert _destroys(agents) == []
    assert db.get_vtpcm(INSTANCE).state == "SHELVED"
    (orphan,) = [a for a in db.list_audit(limit=50) if a.event == "vtpcm.orphan"]
    assert "nova-api witnessed no delete" in orphan.detail
    assert not db.has_audit(INSTANCE, coordinator.REAPED, "destroyed")


def test_a_witnessed_deletion_is_shredded(env):  # noqa: F811
    coord, db, agents = _deleted(env)
    _witness(db, action="delete", age=3600)  # the reaper needs passes: hours are fine
    assert coord.reap_deleted_shelved() == 0  # the first of two answers
    assert db.list_witnesses(INSTANCE)[0].used_at is None  # not used before the shred
    assert coord.reap_deleted_shelved() == 1
    assert _destroys(agents) == [("destroy", "host-a")]
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)
    (reap,) = [a for a in db.list_audit(limit=50) if a.event == coordinator.REAPED]
    assert "nova-api witnessed its delete" in reap.detail


def test_a_failed_shred_gives_the_witness_back(env):  # noqa: F811
    coord, db, agents = _deleted(env)
    _witness(db, action="delete")
    real = agents.destroy

    def down(host, instance):
        raise exception.ServiceUnreachable(service="agent", method="destroy", reason="down")
    agents.destroy = down
    coord.reap_deleted_shelved()
    assert coord.reap_deleted_shelved() == 0
    assert db.list_witnesses(INSTANCE)[0].used_at is None
    agents.destroy = real
    assert coord.reap_deleted_shelved() == 1


def test_an_unshelve_witness_is_no_delete_witness(env):  # noqa: F811
    coord, db, agents = _deleted(env)
    _witness(db, action="unshelve")
    for _ in range(3):
        assert coord.reap_deleted_shelved() == 0
    assert _destroys(agents) == []


# --- the table stays bounded ---------------------------------------------------------

def test_a_flood_of_witnesses_keeps_a_bounded_table(env):  # noqa: F811
    _, db, _, _, _ = env
    old = T0 - witnesses.PURGE_AFTER - datetime.timedelta(seconds=1)
    db.record_witness("key0:old", OTHER, "unshelve", None, "key0", old, old)
    for i in range(3 * witnesses.MAX_PER_INSTANCE):
        _witness(db, nonce="n%d" % i, age=float(i))
    kept = db.list_witnesses(INSTANCE)
    assert len(kept) == witnesses.MAX_PER_INSTANCE
    # the newest requests are the ones kept
    assert max(T0 - w.requested_at for w in kept) == \
        datetime.timedelta(seconds=witnesses.MAX_PER_INSTANCE - 1)
    assert db.list_witnesses(OTHER) == []  # purged at the next recording


# --- the witness review (issue 8): who asked, and when -------------------------------

@pytest.mark.parametrize("project, admin, moves", [
    (PROJECT, (), True),                     # the server's own project
    ("someone-else", (), False),             # another project (or the service project)
    (None, (), False),                       # a witness that names no project
    ("ops-admin", ("ops-admin",), True),     # a listed admin project
])
def test_an_unshelve_witness_counts_only_from_the_servers_or_an_admin_project(
        env, project, admin, moves):  # noqa: F811
    """Review finding 1 (b): nova-compute's own credentials can ask nova-api
    for an unshelve onto its host; the engine takes the witness only from
    the project Nova shows owning the server, or a listed admin project."""
    coord, db, agents, cold = _required(env)
    coord.witness = WitnessPolicy(required=True, keys_configured=True, max_age=600,
                                  admin_projects=frozenset(admin))
    _witness(db, host="host-c", project=project)
    if moves:
        assert coord.unshelve_vtpcm(INSTANCE, "host-c", requested_by="host-c").host == \
            "host-c"
    else:
        _refused(coord, db, agents, cold, "by its project %s" % PROJECT)
        assert db.list_witnesses(INSTANCE)[0].used_at is None


def test_a_leftover_unshelve_witness_pulls_nothing_after_a_new_shelve(env):  # noqa: F811
    """Review finding 2 (proof P2): the user's host-less unshelve landed on
    the holder without using the witness; after a new shelve, host-c
    (forging Nova's view) must not pull the vTPCM with that witness."""
    coord, db, agents, cold = _required(env)
    _witness(db, host=None, age=120)
    assert coord.unshelve_vtpcm(INSTANCE, "host-a", requested_by="host-a").host == "host-a"
    (left,) = db.list_witnesses(INSTANCE)
    assert left.used_by == "unshelve on the holder"  # used up there
    assert coord.shelve_vtpcm(INSTANCE, requested_by="host-a").state == "SHELVED"
    _refused(coord, db, agents, cold, "nova-api witnessed no unshelve request")


@pytest.mark.parametrize("action", ["unshelve", "delete"])
def test_a_witness_from_before_the_shelve_counts_for_nothing(env, action):  # noqa: F811
    """Review finding 2 and 3: a request older than the record's SHELVED
    state (recorded while it was ACTIVE, not cleared) is of an earlier life
    of the instance."""
    coord, db, agents, cold = _required(env)
    coord.witness = WitnessPolicy(required=True, keys_configured=True, max_age=3600 * 3)
    before = SHELVED_AGO.total_seconds() + 60
    _witness(db, action=action, host=None, age=before)
    if action == "unshelve":
        _refused(coord, db, agents, cold, "nova-api witnessed no unshelve request")
    else:
        coord.nova.deleted.add(INSTANCE)
        for _ in range(3):
            assert coord.reap_deleted_shelved() == 0
        assert _destroys(agents) == []
    assert db.list_witnesses(INSTANCE)[0].used_at is None


@pytest.mark.parametrize("state", ["ACTIVE", "STOPPED"])
@pytest.mark.parametrize("policy", [
    REQUIRED, WitnessPolicy(required=False, keys_configured=True)], ids=["required",
                                                                         "not-required"])
def test_a_delete_witness_never_shreds_a_live_vtpcm(env, state, policy):  # noqa: F811
    """Review findings 3 and 7 (proofs P1, P6): a DELETE nova-api accepted
    and then undone (soft delete + restore, a failed terminate) leaves an
    unused delete witness; with Nova's deletion forged the reaper must
    only report the ACTIVE/STOPPED vTPCM, with witnesses required or not."""
    coord, db, agents = _deleted(env, state)
    coord.witness = policy
    _witness(db, action="delete", age=60)
    for _ in range(3):
        assert coord.reap_deleted_shelved() == 0
    assert _destroys(agents) == []
    assert db.get_vtpcm(INSTANCE).state == state
    assert db.has_audit(INSTANCE, "vtpcm.orphan", "reported")
    assert db.list_witnesses(INSTANCE)[0].used_at is None


# --- the owner project recorded at create (issue 8, review F1a) -----------------------

SERVICE_PROJECT = "5e7d0c8a9b1f4c2d8e3f6a7b8c9d0e1f"


def _owned(env):  # noqa: F811
    """The vTPCM created while Nova showed the server in PROJECT: the
    engine records its owner then."""
    coord = env[0]
    coord.destroy_vtpcm(INSTANCE)
    coord.nova.servers[INSTANCE] = ServerView("host-a", "active", None, PROJECT)
    assert coord.create_vtpcm(INSTANCE, "host-a").owner_project == PROJECT
    return _required(env)


def test_a_project_rewritten_through_conductor_gets_no_witness_counted(env):  # noqa: F811
    """Review F1a: a compromised TRUSTED host-c rewrote the shelved
    instance's project_id to the service project (Instance.save through
    nova-conductor) and asked nova-api, with its own service credentials
    (admin there, no 'service' role), to unshelve onto itself: nova-api
    witnessed it, naming the service project. The engine compares the
    witness with the owner it recorded at create, and refuses the move
    because Nova's view no longer shows that owner."""
    coord, db, agents, cold = _owned(env)
    coord.nova.servers[INSTANCE] = ServerView("host-c", "shelved_offloaded", "spawning",
                                              SERVICE_PROJECT)
    _witness(db, host="host-c", project=SERVICE_PROJECT)
    _refused(coord, db, agents, cold, "Nova shows the server in project %s, it was "
             "created in %s" % (SERVICE_PROJECT, PROJECT))
    assert db.list_witnesses(INSTANCE)[0].used_at is None
    audit = [a for a in db.list_audit(limit=50) if a.event == "vtpcm.unshelve"]
    assert audit[0].outcome == "refused" and SERVICE_PROJECT in audit[0].detail


def test_the_recorded_owners_witness_moves_it(env):  # noqa: F811
    coord, db, agents, cold = _owned(env)
    _witness(db, host="host-c", project=PROJECT)
    rec = coord.unshelve_vtpcm(INSTANCE, "host-c", requested_by="host-c")
    assert (rec.host, rec.state, rec.owner_project) == ("host-c", "ACTIVE", PROJECT)


def test_a_witness_from_another_project_is_refused_though_nova_shows_the_owner(
        env):  # noqa: F811
    coord, db, agents, cold = _owned(env)
    _witness(db, host="host-c", project=SERVICE_PROJECT)
    _refused(coord, db, agents, cold, "by its project %s" % PROJECT)


def test_without_nova_at_create_no_owner_is_recorded(env):  # noqa: F811
    """[nova] not configured: the create goes on, no owner recorded (the
    unshelve then takes Nova's current view, documented)."""
    coord = env[0]
    coord.destroy_vtpcm(INSTANCE)
    coord.nova = None
    assert coord.create_vtpcm(INSTANCE, "host-a").owner_project is None
    assert coord.create_vtpcm(OTHER, "host-a").owner_project is None


@pytest.mark.parametrize("nova_at_create", ["unreachable", "no project"])
def test_an_owner_nova_could_not_give_at_create_takes_only_an_admin_witness(
        env, nova_at_create):  # noqa: F811
    """Owner review, F1 (P2/P2b): a compute host that blanks the instance's
    project, or cuts the engine off Nova, at create made the engine record no
    owner, and the unshelve then took Nova's current view, which the host
    rewrites (F1a again). Such a vTPCM's owner is now UNKNOWN_OWNER, and only
    a witness of a [nova] witness_admin_projects project counts."""
    coord = env[0]
    coord.destroy_vtpcm(INSTANCE)
    if nova_at_create == "unreachable":
        coord.nova.fail = exception.ServiceUnreachable(service="nova", method="GET",
                                                       reason="timed out")
    else:
        coord.nova.servers[INSTANCE] = ServerView("host-a", "active", None, None)
    assert coord.create_vtpcm(INSTANCE, "host-a").owner_project == ""
    coord.nova.fail = None
    coord, db, agents, cold = _required(env)
    # the host rewrote the project to the service project and got a witness there
    coord.nova.servers[INSTANCE] = ServerView("host-c", "shelved_offloaded", "spawning",
                                              SERVICE_PROJECT)
    _witness(db, host="host-c", project=SERVICE_PROJECT)
    _refused(coord, db, agents, cold, "witness_admin_projects")
    # positive control: an admin project's witness moves it
    coord.witness = WitnessPolicy(required=True, keys_configured=True, max_age=600,
                                  admin_projects=frozenset({"admin-p"}))
    _witness(db, host="host-c", project="admin-p", nonce="n2")
    assert coord.unshelve_vtpcm(INSTANCE, "host-c", requested_by="host-c").host == "host-c"
