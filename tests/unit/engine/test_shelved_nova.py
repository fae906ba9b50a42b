"""Issue 8's shelved-vTPCM holes in the coordinator (fake agents and Nova,
real SQLite): an unshelve moves a SHELVED vTPCM only onto the host Nova
itself unshelves the instance onto, and a SHELVED vTPCM whose instance Nova
deleted (``_local_delete`` never reaches the driver) is destroyed on its
holder only after consecutive 404s, never on an error."""

import datetime
import re
import threading
import time

import pytest

from tests.unit.engine.test_coordinator import INSTANCE, FakeVerdict, env, trusted_in_db  # noqa: F401
from tests.unit.engine.test_coordinator_cold import _shelved
from vtpcm_common import exception
from vtpcm_common.api.agent import messages as am
from vtpcm_nova.engine import coordinator, shelved
from vtpcm_nova.engine.db.store import utcnow as db_now
from vtpcm_nova.engine.shelved import Deletion, Observed, Presence, ServerView


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


def test_two_consecutive_deleted_answers_destroy_the_shelved_vtpcm_on_its_holder(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.deleted.add(INSTANCE)  # Nova's admin listing: deleted while shelved offloaded
    assert coord.reap_deleted_shelved() == 0
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and _destroys(agents) == []
    assert coord.reap_deleted_shelved() == 1
    assert _destroys(agents) == [("destroy", "host-a")]
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)
    events = [(a.event, a.outcome, a.host) for a in db.list_audit(limit=50)
              if a.event in ("vtpcm.destroy", "vtpcm.reap")]
    assert ("vtpcm.reap", "destroyed", "host-a") in events
    assert ("vtpcm.destroy", "destroyed", "host-a") in events
    assert coord.reap_deleted_shelved() == 0  # nothing left to reap


def test_a_reaped_instance_never_gets_a_fresh_vtpcm(env):  # noqa: F811
    """Review H1 (P1b): after a reap, Nova's unshelve of that instance went
    ACTIVE on a fresh, empty vTPCM. The reap's audit entry is a tombstone:
    the engine refuses the create, so the unshelve faults instead."""
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.deleted.add(INSTANCE)
    coord.reap_deleted_shelved()
    coord.reap_deleted_shelved()
    creates = [c for c in agents.calls if c[0] == "create"]
    with pytest.raises(exception.CommandRefused,
                       match="destroyed when Nova showed the instance deleted"):
        coord.create_vtpcm(INSTANCE, "host-a")
    assert [c for c in agents.calls if c[0] == "create"] == creates  # no agent asked
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)
    (refused,) = [a for a in db.list_audit(limit=50)
                  if (a.event, a.outcome) == ("vtpcm.create", "refused")]
    assert refused.instance == INSTANCE
    # positive control: another instance still gets one
    other = "0f0f0f0f-1111-2222-3333-444444444444"
    assert coord.create_vtpcm(other, "host-a").host == "host-a"


def test_a_404_is_never_taken_as_deleted(env):  # noqa: F811
    """Review H1/M1 (P1, P3): a non-admin credential, or a proxy with no
    backend, answers 404; before this fix two such passes shredded a live
    shelved vTPCM. Only Nova's admin listing showing it deleted counts."""
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.servers[INSTANCE] = None  # GET /servers/{id}: 404
    for _ in range(6):
        coord.reap_deleted_shelved()
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and _destroys(agents) == []
    coord.nova.deleted.add(INSTANCE)  # positive control: Nova's word
    coord.reap_deleted_shelved()
    coord.reap_deleted_shelved()
    assert _destroys(agents) == [("destroy", "host-a")]


@pytest.mark.parametrize("where", ["admin check", "admin check only", "listing"])
def test_a_credential_without_novas_admin_view_reaps_nothing(env, caplog, where):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.deleted.add(INSTANCE)
    if where == "admin check":
        coord.nova.admin = False
    elif where == "admin check only":  # the listing alone would say deleted
        coord.nova.is_admin = lambda: False
    else:  # the admin check passed (nothing listed), the listing lacks the admin view
        coord.nova.is_admin = lambda: True
        real = coord.nova.deletion
        coord.nova.deletion = lambda uuid: (real(uuid) and shelved.Deletion.NOT_ADMIN)
    caplog.set_level("WARNING")
    for _ in range(4):
        assert coord.reap_deleted_shelved() == 0
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and _destroys(agents) == []
    warnings = [r.getMessage() for r in caplog.records if "Reaping" in r.getMessage()]
    assert len(warnings) == 1  # once, not every pass
    assert "does not get Nova's admin view" in warnings[0]
    assert "admin role" in warnings[0]
    # positive control: with the admin view it is reaped
    coord.nova = type(coord.nova)()
    coord.nova.deleted.add(INSTANCE)
    coord.reap_deleted_shelved()
    coord.reap_deleted_shelved()
    assert _destroys(agents) == [("destroy", "host-a")]


@pytest.mark.parametrize("between", ["unreachable", "present", "not admin"])
def test_an_error_or_a_sighting_between_answers_starts_the_count_over(env, between):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    nova = coord.nova
    nova.deleted.add(INSTANCE)
    coord.reap_deleted_shelved()
    if between == "unreachable":
        nova.fail = _unreachable()
    elif between == "not admin":
        nova.admin = False
    else:
        nova.deleted.discard(INSTANCE)
    coord.reap_deleted_shelved()
    nova.fail, nova.admin = None, True
    nova.deleted.add(INSTANCE)
    coord.reap_deleted_shelved()
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and _destroys(agents) == []
    coord.reap_deleted_shelved()  # the second answer in a row
    assert _destroys(agents) == [("destroy", "host-a")]


def test_nova_errors_forever_never_destroy(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.deleted.add(INSTANCE)
    coord.nova.fail = _unreachable()
    for _ in range(5):
        coord.reap_deleted_shelved()
    assert db.get_vtpcm(INSTANCE).state == "SHELVED" and _destroys(agents) == []


def test_answers_must_span_the_minimum_time(env):  # noqa: F811
    """Review L3: the rule counted passes, not time; now the first and last
    deleted answers must be (needed - 1) reconcile intervals apart."""
    coord, db, agents, _, _ = _shelved(env)
    clock = [db_now()]
    coord.now = lambda: clock[0]
    coord.deletions = shelved.DeletionConfirmations(2, datetime.timedelta(seconds=60))
    coord.nova.deleted.add(INSTANCE)
    for _ in range(5):  # many passes, one moment
        coord.reap_deleted_shelved()
        clock[0] += datetime.timedelta(seconds=10)
    assert _destroys(agents) == []
    clock[0] += datetime.timedelta(seconds=10)  # 60 s since the first answer
    assert coord.reap_deleted_shelved() == 1
    assert _destroys(agents) == [("destroy", "host-a")]


def test_a_short_glitch_seen_by_overlapping_passes_destroys_nothing(env):  # noqa: F811
    """Review L3 (P6): the start pass and the first periodic pass overlap
    and share the counts; a 300 ms glitch seen by both shredded the vTPCM."""
    coord, db, agents, _, _ = _shelved(env)
    coord.deletions = shelved.DeletionConfirmations(2, datetime.timedelta(seconds=1))
    t0 = time.monotonic()
    coord.nova.deletion = lambda uuid: (shelved.Deletion.DELETED
                                        if time.monotonic() - t0 < 0.3
                                        else shelved.Deletion.NOT_SHOWN_DELETED)
    threads = [threading.Thread(target=coord.reconcile) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert _destroys(agents) == []
    time.sleep(0.35)
    coord.reap_deleted_shelved()  # the glitch is over: the count starts over
    assert coord.deletions.count(INSTANCE) == 0 and _destroys(agents) == []


def test_one_reaper_pass_at_a_time(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    inside, release = threading.Event(), threading.Event()
    asked = []

    def slow_deletion(uuid):
        asked.append(uuid)
        inside.set()
        release.wait(10)
        return shelved.Deletion.DELETED
    coord.nova.deletion = slow_deletion
    first = threading.Thread(target=coord.reap_deleted_shelved)
    first.start()
    try:
        assert inside.wait(10)
        assert coord.reap_deleted_shelved() == 0  # skipped: one is running
        assert asked == [INSTANCE]
    finally:
        release.set()
        first.join(10)
    assert not first.is_alive()
    assert coord.deletions.count(INSTANCE) == 1


def _unshelved_then_nova_gave_up(coord):
    """Review L2 (P4): the engine's unshelve finished after the driver's
    call timed out; Nova shows the instance shelved_offloaded again."""
    rec = coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert (rec.host, rec.state) == ("host-b", "ACTIVE")
    coord.nova.servers[INSTANCE] = ServerView(None, "shelved_offloaded", None)


@pytest.mark.parametrize("record", ["ACTIVE after a late unshelve", "STOPPED, never shelved"])
def test_a_non_shelved_vtpcm_of_an_instance_nova_deleted_is_reported_never_destroyed(
        env, record, caplog):  # noqa: F811
    """Review round 2, MEDIUM 2: a compromised compute host can make Nova
    show ANY instance deleted (Instance.destroy through nova-conductor), so
    an ACTIVE or STOPPED vTPCM is never shredded on Nova's word: reported
    once (WARNING, ``vtpcm.orphan``), destroyed only by an operator."""
    if record.startswith("ACTIVE"):
        coord, db, agents, _, _ = _shelved(env)
        _unshelved_then_nova_gave_up(coord)
        holder = "host-b"
    else:
        coord, db, agents, _, _ = env
        holder = db.get_vtpcm(INSTANCE).host
        db.set_vtpcm_state(INSTANCE, db.get_vtpcm(INSTANCE).generation, "STOPPED",
                           expected_state=db.get_vtpcm(INSTANCE).state,
                           expected_migration_id=None)
    rec = db.get_vtpcm(INSTANCE)
    # positive control: an unflagged live vTPCM is refused to the operator too
    with pytest.raises(exception.CommandRefused, match="not shelved nor reported orphaned"):
        coord.destroy_shelved_vtpcm(INSTANCE)
    coord.nova.deleted.add(INSTANCE)  # Nova's admin listing: deleted (maybe forged)
    caplog.set_level("WARNING")
    for _ in range(5):
        assert coord.reap_deleted_shelved() == 0
    assert _destroys(agents) == []
    assert (db.get_vtpcm(INSTANCE).state, db.get_vtpcm(INSTANCE).generation) == \
        (rec.state, rec.generation)
    assert not db.has_audit(INSTANCE, coordinator.REAPED, "destroyed")
    (orphan,) = [a for a in db.list_audit(limit=50) if a.event == "vtpcm.orphan"]
    assert (orphan.outcome, orphan.host) == ("reported", holder)
    assert rec.state in orphan.detail and rec.vtpcm_id in orphan.detail
    warnings = [r for r in caplog.records if "Orphaned vTPCM" in r.getMessage()]
    assert len(warnings) == 1  # once per record, not once per pass
    coord.destroy_shelved_vtpcm(INSTANCE)  # the operator's decision
    assert _destroys(agents) == [("destroy", holder)]
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)


def test_reconcile_never_asks_nova(env):  # noqa: F811
    """Review round 2, MEDIUM 1: the reaper ran inside reconcile(), one Nova
    request per vTPCM, holding up migration deadlines and abandoned begins.
    It runs in its own periodic task now."""
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.deleted.add(INSTANCE)
    for _ in range(3):
        coord.reconcile()
    assert coord.nova.asked == [] and _destroys(agents) == []
    assert db.get_vtpcm(INSTANCE).state == "SHELVED"


def _many_shelved(db, n):
    uuids = ["%08d-0000-4000-8000-000000000000" % i for i in range(n)]
    for u in uuids:
        db.create_vtpcm(u, "v-" + u, "host-a", state="SHELVED")
    return uuids


def test_a_pass_is_bounded_and_the_next_resumes_where_it_stopped(env):  # noqa: F811
    coord, db, agents, _, _ = env
    coord.reap_max_checks = 3
    uuids = sorted(_many_shelved(db, 5) + [INSTANCE])  # INSTANCE: ACTIVE, watched
    coord.reap_deleted_shelved()
    assert coord.nova.asked == uuids[:3]
    coord.reap_deleted_shelved()
    coord.reap_deleted_shelved()
    assert coord.nova.asked == uuids + uuids[:3]  # every record in turn


def test_a_pass_stops_at_the_first_timeout(env):  # noqa: F811
    coord, db, agents, _, _ = env
    uuids = sorted(_many_shelved(db, 5))
    coord.nova.fail = None
    real = coord.nova.deletion

    def times_out(uuid):
        if uuid == uuids[1]:
            coord.nova.asked.append(uuid)
            raise _unreachable()
        return real(uuid)
    coord.nova.deletion = times_out
    coord.reap_deleted_shelved()
    assert coord.nova.asked == uuids[:2]


def test_a_pass_stops_when_out_of_time(env):  # noqa: F811
    coord, db, agents, _, _ = env
    uuids = sorted(_many_shelved(db, 5))
    clock = [db_now()]
    coord.now = lambda: clock[0]
    coord.reap_budget = datetime.timedelta(seconds=10)
    real = coord.nova.deletion

    def slow(uuid):
        clock[0] += datetime.timedelta(seconds=6)
        return real(uuid)
    coord.nova.deletion = slow
    coord.reap_deleted_shelved()
    assert coord.nova.asked == uuids[:2]  # 0 s, 6 s asked; 12 s > 10 s stops


def test_a_record_unshelved_between_answer_and_claim_is_not_destroyed(env):  # noqa: F811
    """The DESTROYING claim needs the state Nova was asked about: an
    unshelve that lands (same generation) after the last answer wins."""
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.deleted.add(INSTANCE)
    coord.reap_deleted_shelved()
    real = coord.nova.deletion

    def unshelved_meanwhile(uuid):
        rec = db.get_vtpcm(uuid)
        db.set_vtpcm_state(uuid, rec.generation, "ACTIVE", expected_state="SHELVED",
                           expected_migration_id=None)
        return real(uuid)
    coord.nova.deletion = unshelved_meanwhile
    assert coord.reap_deleted_shelved() == 0
    assert _destroys(agents) == [] and db.get_vtpcm(INSTANCE).state == "ACTIVE"


def test_a_live_instance_is_never_reaped_whatever_404s_say(env):  # noqa: F811
    coord, db, agents, _, _ = env
    coord.nova.servers[INSTANCE] = None
    for _ in range(3):
        coord.reap_deleted_shelved()
    assert db.get_vtpcm(INSTANCE).state != "SHELVED" and _destroys(agents) == []


def test_a_record_that_changed_between_answers_starts_over(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.deleted.add(INSTANCE)
    coord.reap_deleted_shelved()
    rec = db.get_vtpcm(INSTANCE)
    db.set_vtpcm_id(INSTANCE, rec.host, rec.generation, "another-vtpcm")
    coord.reap_deleted_shelved()
    assert _destroys(agents) == []
    coord.reap_deleted_shelved()
    assert _destroys(agents) == [("destroy", "host-a")]


def test_a_failed_destroy_keeps_it_shelved_and_a_later_pass_finishes(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova.deleted.add(INSTANCE)
    agents.fail["destroy"] = exception.ServiceUnreachable(service="agent host-a",
                                                          method="destroy", reason="timeout")
    coord.reap_deleted_shelved()
    coord.reap_deleted_shelved()
    assert db.get_vtpcm(INSTANCE).state == "SHELVED"
    coord.reap_deleted_shelved()
    coord.reap_deleted_shelved()
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)


def test_without_nova_nothing_is_reaped(env):  # noqa: F811
    coord, db, agents, _, _ = _shelved(env)
    coord.nova = None
    for _ in range(3):
        coord.reap_deleted_shelved()
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


def test_presence_is_gone_only_on_novas_positive_word():
    assert shelved.presence(Deletion.DELETED) is Presence.GONE
    assert shelved.presence(Deletion.NOT_SHOWN_DELETED) is Presence.PRESENT
    assert shelved.presence(Deletion.NOT_ADMIN) is Presence.UNKNOWN


def test_confirmations_need_consecutive_gone_answers_for_the_same_record():
    with pytest.raises(ValueError, match="at least two"):
        shelved.DeletionConfirmations(1)
    rule = shelved.DeletionConfirmations(3)
    seen = Observed("v", 0)
    t = db_now()
    assert not rule.observe("i", seen, Presence.GONE, t)
    assert not rule.observe("i", seen, Presence.GONE, t)
    assert not rule.observe("i", seen, Presence.UNKNOWN, t)
    assert rule.count("i") == 0
    assert not rule.observe("i", seen, Presence.GONE, t)
    assert not rule.observe("i", Observed("v", 1), Presence.GONE, t)  # generation moved
    assert rule.count("i") == 1
    assert not rule.observe("i", Observed("v", 1), Presence.GONE, t)
    assert rule.observe("i", Observed("v", 1), Presence.GONE, t)


def test_confirmations_need_the_minimum_span_since_the_first():
    rule = shelved.DeletionConfirmations(2, datetime.timedelta(seconds=30))
    t = db_now()
    seen = Observed("v", 0)
    assert not rule.observe("i", seen, Presence.GONE, t)
    assert not rule.observe("i", seen, Presence.GONE, t + datetime.timedelta(seconds=29))
    assert rule.observe("i", seen, Presence.GONE, t + datetime.timedelta(seconds=30))
    # a new vTPCM restarts the clock
    assert not rule.observe("i", Observed("w", 0), Presence.GONE,
                            t + datetime.timedelta(seconds=31))
    # ... from its own first sighting, not the old record's
    assert not rule.observe("i", Observed("w", 0), Presence.GONE,
                            t + datetime.timedelta(seconds=32))
    assert rule.observe("i", Observed("w", 0), Presence.GONE,
                        t + datetime.timedelta(seconds=61))


def test_the_not_configured_reason_names_the_option():
    assert "[nova] auth_type" in coordinator.NOVA_NOT_CONFIGURED
