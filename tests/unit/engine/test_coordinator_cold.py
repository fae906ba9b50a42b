"""Cold migration and resize in the coordinator: the engine's transfer of
the encrypted blobs between the agents (fake agents, real SQLite)."""

import uuid

import pytest

from tests.unit.engine.test_coordinator import INSTANCE, env, names  # noqa: F401
from tests.unit.engine.test_coordinator import FakeVerdict as coordinator_verdict
from vtpcm_common import exception
from vtpcm_common.api.agent import messages as am


class ColdAgents:
    """Adds the state collector to the fake agents of test_coordinator."""

    def __init__(self, agents, mid, generation=0):
        self.agents = agents
        self.exported = am.StateBlobs(INSTANCE, mid, generation, b"\x01" * 64, 0,
                                      b"\x02" * 32, 0)
        self.imported = []

    def export_state(self, host, instance_uuid):
        self.agents._record("export_state", host)
        return self.exported

    def import_state(self, host, blobs):
        self.agents._record("import_state", host)
        self.imported.append((host, blobs))
        # what the destination's agent reports from now on
        self.agents.held[host] = ("MIGRATING_IN", True, blobs.migration_id)


def _cold(env, mid):  # noqa: F811
    coord, db, agents, _, _ = env
    cold = ColdAgents(agents, mid)
    agents.export_state, agents.import_state = cold.export_state, cold.import_state
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    return coord, db, agents, cold


def test_transfer_then_confirm_moves_the_blobs_once_and_the_authority(env):  # noqa: F811
    mid = str(uuid.uuid4())
    coord, db, agents, cold = _cold(env, mid)
    assert coord.transfer(mid, requested_by="host-a").state == "TRANSFERRED"
    assert cold.imported == [("host-b", cold.exported)]
    assert db.get_vtpcm(INSTANCE).host == "host-a"  # not before confirm
    assert coord.transfer(mid, requested_by="host-a").state == "TRANSFERRED"
    assert len(cold.imported) == 1, "a retried transfer must not import again"
    assert coord.commit(mid, requested_by="host-a").state == "COMMITTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.migration_id) == ("host-b", 1, None)
    assert names(agents) == ["seal", "prepare", "export_state", "import_state",
                             "commit_incoming", "commit_outgoing"]


def test_revert_discards_the_destination_and_restores_the_source(env):  # noqa: F811
    mid = str(uuid.uuid4())
    coord, db, agents, _ = _cold(env, mid)
    coord.transfer(mid, requested_by="host-a")
    assert coord.abort(mid, "resize reverted").state == "ABORTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.migration_id) == ("host-a", 0, None)
    assert names(agents)[-2:] == ["abort_incoming", "abort_outgoing"]
    assert agents.only_if_unused is False


@pytest.mark.parametrize("signer", ["host-b", "host-c"])
def test_a_transfer_signed_by_another_host_is_refused_and_audited(env, signer):  # noqa: F811
    mid = str(uuid.uuid4())
    coord, db, agents, cold = _cold(env, mid)
    with pytest.raises(exception.CommandRefused, match="not the source host-a"):
        coord.transfer(mid, requested_by=signer)
    assert db.get_migration(mid).state == "PREPARED"
    assert "export_state" not in names(agents) and not cold.imported
    (entry,) = [a for a in db.list_audit(limit=10) if a.event == "migration.transfer"]
    assert entry.outcome == "refused" and signer in entry.detail
    # positive control: the source's own transfer goes through
    assert coord.transfer(mid, requested_by="host-a").state == "TRANSFERRED"


def test_blobs_of_another_migration_are_never_imported(env):  # noqa: F811
    mid = str(uuid.uuid4())
    coord, db, agents, cold = _cold(env, mid)
    cold.exported = am.StateBlobs(INSTANCE, str(uuid.uuid4()), 0, b"\x01" * 64, 0, b"", 0)
    with pytest.raises(exception.MigrationError, match="aborted|not of this migration"):
        coord.transfer(mid, requested_by="host-a")
    assert not cold.imported
    assert db.get_migration(mid).state == "ABORTED"
    assert db.get_vtpcm(INSTANCE).host == "host-a"


def test_a_failed_import_aborts_and_restores_the_source(env):  # noqa: F811
    mid = str(uuid.uuid4())
    coord, db, agents, _ = _cold(env, mid)
    agents.fail["import_state"] = exception.StateImportError(vtpcm_id="v", reason="bad MAC")
    with pytest.raises(exception.MigrationError, match="bad MAC"):
        coord.transfer(mid, requested_by="host-a")
    rec = db.get_migration(mid)
    assert rec.state == "ABORTED" and "bad MAC" in rec.error
    assert db.get_vtpcm(INSTANCE).migration_id is None


def test_no_transfer_outside_a_prepared_migration(env):  # noqa: F811
    mid = str(uuid.uuid4())
    coord, db, agents, cold = _cold(env, mid)
    coord.abort(mid, "operator")
    with pytest.raises(exception.InvalidTransition, match="ABORTED"):
        coord.transfer(mid, requested_by="host-a")
    assert not cold.imported
    assert any(a.event == "migration.transfer" and "ABORTED" in a.detail
               for a in db.list_audit(limit=10))


def test_a_deadline_spares_a_resized_guest_until_confirm(env):  # noqa: F811
    """Resize auto-confirm may come long after the migration's deadline: the
    destination holds the state, so the deadline leaves it IN_DOUBT and
    the source's confirm still commits."""
    import datetime
    mid = str(uuid.uuid4())
    coord, db, agents, _ = _cold(env, mid)
    coord.transfer(mid, requested_by="host-a")
    clock = env[4]
    clock["now"] += datetime.timedelta(hours=5)
    agents.fail["abort_incoming"] = exception.DestinationInUse(migration_id=mid,
                                                               reason="received")
    coord.reconcile()
    assert db.get_migration(mid).state == "IN_DOUBT"
    assert agents.only_if_unused is True
    assert coord.commit(mid, requested_by="host-a").state == "COMMITTED"
    assert db.get_vtpcm(INSTANCE).host == "host-b"


# --- evacuation with a fresh vTPCM (state loss, operator option) --------------------

def _revoked(db, host="host-a"):
    """The operator's decision that the holder is gone (``vtpcm-manage host revoke``)."""
    db.revoke_host(host)


def test_an_evacuation_abandons_a_revoked_hosts_vtpcm_for_a_fresh_one(env):  # noqa: F811
    coord, db, agents, _, _ = env
    old = db.get_vtpcm(INSTANCE)
    _revoked(db)
    rec = coord.replace_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert rec.host == "host-b" and rec.vtpcm_id != old.vtpcm_id
    assert ("create", "host-b") in agents.calls
    (lost,) = [a for a in db.list_audit(limit=20) if a.event == "vtpcm.evacuate"]
    assert lost.outcome == "state lost" and lost.host == "host-a"
    assert old.vtpcm_id in lost.detail
    # the old copy is kept as abandoned, and can never be started through the engine
    (abandoned,) = db.list_abandoned(INSTANCE)
    assert (abandoned.host, abandoned.vtpcm_id, abandoned.generation) == \
        ("host-a", old.vtpcm_id, old.generation)
    with pytest.raises(exception.CommandRefused, match="lives on host-b"):
        coord.start_vtpcm(INSTANCE, requested_by="host-a")


@pytest.mark.parametrize(("setup", "why"), [
    ("silent", "host-a is APPROVED: evacuating a vTPCM instance with a fresh vTPCM needs "
               "the failed host revoked first"),
    ("same-host", "already lives on host-a"),
    ("migrating", "holds the vTPCM"),
    ("other-signer", "signed by host-c"),
])
def test_an_evacuation_is_refused_unless_the_holder_was_revoked(env, setup, why):  # noqa: F811
    coord, db, agents, _, _ = env
    agents.fail["health"] = exception.ServiceUnreachable(
        service="agent host-a", method="health", reason="timeout")  # never asked
    target, signer = "host-b", "host-b"
    if setup == "same-host":
        target = signer = "host-a"
    if setup == "other-signer":
        signer = "host-c"
    if setup == "migrating":
        coord.begin(str(uuid.uuid4()), INSTANCE, "host-a", "host-b")
    before, calls = db.get_vtpcm(INSTANCE), len(agents.calls)
    with pytest.raises(exception.CommandRefused, match=why):
        coord.replace_vtpcm(INSTANCE, target, requested_by=signer)
    assert db.get_vtpcm(INSTANCE) == before and db.list_abandoned() == []
    assert [a.outcome for a in db.list_audit(limit=20) if a.event == "vtpcm.evacuate"] == \
        ["refused"]
    assert agents.calls[calls:] == []


def test_an_evacuation_to_an_untrusted_host_keeps_the_record(env):  # noqa: F811
    """Review finding F1: the record went before the target's trust was checked."""
    coord, db, agents, trust, _ = env
    db.enroll_host("host-c", ak_public=b"ak-c", ak_name=b"n-c", kem_public=b"kem-of-c",
                   kem_name=b"kc", ek_certificate=None, approved=True)
    db.assign_policy("host-c", "golden")
    trust.verdicts["host-c"] = coordinator_verdict("UNTRUSTED", "PCR 0 differs")
    _revoked(db)
    before = db.get_vtpcm(INSTANCE)
    with pytest.raises(exception.HostNotTrusted, match="PCR 0 differs"):
        coord.replace_vtpcm(INSTANCE, "host-c", requested_by="host-c")
    assert db.get_vtpcm(INSTANCE) == before and db.list_abandoned() == []
    audits = [(a.event, a.outcome) for a in db.list_audit(limit=50)]
    assert ("vtpcm.evacuate", "refused") in audits
    assert ("vtpcm.evacuate", "state lost") not in audits
    assert ("create", "host-c") not in agents.calls


def test_a_refused_create_of_an_evacuation_puts_the_old_record_back(env):  # noqa: F811
    coord, db, agents, _, _ = env
    _revoked(db)
    before = db.get_vtpcm(INSTANCE)
    agents.fail["create"] = exception.CommandRefused(method="create", reason="disk full")
    with pytest.raises(exception.CommandRefused, match="disk full"):
        coord.replace_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert db.get_vtpcm(INSTANCE) == before and db.list_abandoned() == []
    assert "state lost" not in [a.outcome for a in db.list_audit(limit=20)]


def test_reconcile_destroys_an_abandoned_vtpcm_once_its_host_answers(env):  # noqa: F811
    coord, db, agents, _, _ = env
    _revoked(db)
    coord.replace_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    agents.fail["destroy"] = exception.ServiceUnreachable(
        service="agent host-a", method="destroy", reason="partitioned")
    coord.reconcile()
    assert len(db.list_abandoned()) == 1, "an unanswered destroy is retried"
    coord.reconcile()
    assert db.list_abandoned() == []
    assert [c for c in agents.calls if c[0] == "destroy"] == [("destroy", "host-a")] * 2
    assert db.get_vtpcm(INSTANCE).host == "host-b"
    (done,) = [a for a in db.list_audit(limit=20) if a.event == "vtpcm.destroy"]
    assert done.host == "host-a" and "abandoned by an evacuation" in done.detail


# --- shelve offload and unshelve -----------------------------------------------------

def _shelved(env):  # noqa: F811
    coord, db, agents, trust, _ = env
    cold = ColdAgents(agents, None)
    agents.export_state = lambda host, instance: (
        agents._record("export_state", host),
        am.StateBlobs(INSTANCE, db.get_vtpcm(INSTANCE).migration_id, 0, b"\x01" * 64, 0,
                      b"", 0))[1]
    agents.import_state = cold.import_state
    assert coord.shelve_vtpcm(INSTANCE, requested_by="host-a").state == "SHELVED"
    assert ("stop", "host-a") in agents.calls
    coord.nova.unshelving(INSTANCE, "host-b")  # Nova unshelves it onto host-b
    return coord, db, agents, trust, cold


def test_unshelve_elsewhere_moves_the_shelved_vtpcm_once(env):  # noqa: F811
    coord, db, agents, _, cold = _shelved(env)
    rec = coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert (rec.host, rec.generation, rec.state) == ("host-b", 1, "ACTIVE")
    assert [h for h, _ in cold.imported] == ["host-b"]
    assert names(agents)[-6:] == ["seal", "prepare", "export_state", "import_state",
                                  "commit_incoming", "commit_outgoing"]
    outcomes = [a.outcome for a in db.list_audit(limit=50) if a.event == "vtpcm.unshelve"]
    assert outcomes == ["moved"]
    # restored twice: refused, nothing moves
    with pytest.raises(exception.CommandRefused, match="not shelved"):
        coord.unshelve_vtpcm(INSTANCE, "host-a", requested_by="host-a")
    assert db.get_vtpcm(INSTANCE).host == "host-b" and len(cold.imported) == 1


def test_unshelve_onto_an_untrusted_host_keeps_it_shelved_on_the_holder(env):  # noqa: F811
    coord, db, agents, trust, cold = _shelved(env)
    trust.verdicts["host-b"] = coordinator_verdict("UNTRUSTED", "PCR 7 differs")
    with pytest.raises(exception.HostNotTrusted, match="PCR 7 differs"):
        coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == \
        ("host-a", 0, "SHELVED", None)
    assert "seal" not in names(agents) and not cold.imported
    assert [a.outcome for a in db.list_audit(limit=50) if a.event == "vtpcm.unshelve"] == \
        ["refused"]
    # positive control: trusted again, it moves
    trust.verdicts["host-b"] = coordinator_verdict("TRUSTED")
    assert coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b").host == "host-b"


def test_unshelve_on_the_holder_only_makes_it_live_again(env):  # noqa: F811
    coord, db, agents, _, cold = _shelved(env)
    rec = coord.unshelve_vtpcm(INSTANCE, "host-a", requested_by="host-a")
    assert (rec.host, rec.state, rec.generation) == ("host-a", "ACTIVE", 0)
    assert not cold.imported


def test_only_the_holder_shelves_and_only_the_target_unshelves(env):  # noqa: F811
    coord, db, agents, _, _ = env
    with pytest.raises(exception.CommandRefused, match="lives on host-a, not on host-b"):
        coord.shelve_vtpcm(INSTANCE, requested_by="host-b")
    (refused,) = [a for a in db.list_audit(limit=50) if a.event == "vtpcm.shelve"]
    assert (refused.outcome, refused.host) == ("refused", "host-b")
    assert "lives on host-a" in refused.detail
    coord.shelve_vtpcm(INSTANCE, requested_by="host-a")
    with pytest.raises(exception.CommandRefused, match="signed by host-c"):
        coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-c")
    assert db.get_vtpcm(INSTANCE).state == "SHELVED"


def _unreachable(host, method):
    return exception.ServiceUnreachable(service="agent " + host, method=method,
                                        reason="timeout")


def test_a_failed_unshelve_whose_abort_finishes_later_stays_shelved(env):  # noqa: F811
    """Review finding F3: the abort restored ACTIVE, not SHELVED, once
    reconcile finished it, and every later unshelve elsewhere was refused."""
    coord, db, agents, _, cold = _shelved(env)
    aborts = []

    def prepare_incoming(host, context, envelope):
        agents._record("prepare", host)
        raise _unreachable(host, "prepare_incoming")

    def abort_incoming(host, context, only_if_unused=False):
        agents._record("abort_incoming", host)
        aborts.append(host)
        if len(aborts) == 1:
            raise _unreachable(host, "abort_incoming")
    agents.prepare_incoming, agents.abort_incoming = prepare_incoming, abort_incoming
    with pytest.raises(exception.ServiceUnreachable, match="abort_incoming"):
        coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert db.get_vtpcm(INSTANCE).state == "MIGRATING"  # the abort is unfinished
    coord.reconcile()
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.state, rec.migration_id) == ("host-a", "SHELVED", None)
    assert [a.outcome for a in db.list_audit(limit=50) if a.event == "vtpcm.unshelve"] == \
        ["refused"]
    # Nova's retried unshelve moves it
    del agents.prepare_incoming
    assert coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b").host == "host-b"


def test_an_unshelve_past_its_commit_point_is_done(env):  # noqa: F811
    """Review finding F4: a failed shred after the commit point was reported
    to Nova as a failed unshelve (audited refused) though the vTPCM moved."""
    coord, db, agents, _, _ = _shelved(env)
    agents.fail["commit_outgoing"] = _unreachable("host-a", "commit_outgoing")
    rec = coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert (rec.host, rec.generation, rec.state) == ("host-b", 1, "ACTIVE")
    assert [a.outcome for a in db.list_audit(limit=50) if a.event == "vtpcm.unshelve"] == \
        ["moved"]
    (mig,) = db.list_migrations(instance_uuid=INSTANCE)
    assert mig.state == "SHREDDING"
    coord.reconcile()  # finishes the shred
    assert db.get_migration(mig.migration_id).state == "COMMITTED"


def test_a_migration_never_begins_on_a_shelved_vtpcm(env):  # noqa: F811
    """Review finding F6: begin took a SHELVED record and its abort unshelved it."""
    coord, db, agents, _, _ = _shelved(env)
    agents.held["host-a"] = ("STOPPED", False, None)
    mid = str(uuid.uuid4())
    with pytest.raises(exception.MigrationError, match="shelved: only an unshelve moves it"):
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.state, rec.migration_id) == ("SHELVED", None)
    assert "seal" not in names(agents)
    assert ("migration.begin", "refused") in [(a.event, a.outcome)
                                              for a in db.list_audit(limit=50)]


def test_an_aborted_migration_keeps_the_records_prior_state(env):  # noqa: F811
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert db.get_migration(mid).prior_state == "STOPPED"  # as the agent created it
    coord.abort(mid, "x")
    assert db.get_vtpcm(INSTANCE).state == "ACTIVE"  # live again, as before


def test_start_incoming_only_between_transfer_and_confirm(env):  # noqa: F811
    mid = str(uuid.uuid4())
    coord, db, agents, _ = _cold(env, mid)
    agents.held["host-b"] = ("MIGRATING_IN", False, mid)
    with pytest.raises(exception.CommandRefused, match="migration is PREPARED"):
        coord.start_incoming(mid, requested_by="host-b")
    coord.transfer(mid, requested_by="host-a")
    with pytest.raises(exception.CommandRefused, match="signed by host-a, not the dest"):
        coord.start_incoming(mid, requested_by="host-a")
    assert ("start", "host-b") not in agents.calls

    def start(host, instance_uuid):
        agents._record("start", host)
        return am.VTPCMInfo(instance_uuid, "v", "MIGRATING_IN", 0, mid, "/run/x.ctrl",
                            True, 42)
    agents.start = start
    host, info = coord.start_incoming(mid, requested_by="host-b")
    assert (host, info.running) == ("host-b", True)
    assert db.get_migration(mid).state == "TRANSFERRED"
    assert db.get_vtpcm(INSTANCE).host == "host-a"  # nothing moved
    coord.commit(mid, requested_by="host-a")
    with pytest.raises(exception.CommandRefused, match="migration is COMMITTED"):
        coord.start_incoming(mid, requested_by="host-b")
    outcomes = [a.outcome for a in db.list_audit(limit=50)
                if a.event == "migration.start_incoming"]
    assert sorted(outcomes) == ["refused", "refused", "refused", "running"]


def test_start_incoming_refuses_an_agent_answer_for_another_vtpcm(env):  # noqa: F811
    mid = str(uuid.uuid4())
    coord, db, agents, _ = _cold(env, mid)
    coord.transfer(mid, requested_by="host-a")
    agents.start = lambda host, instance_uuid: am.VTPCMInfo(
        instance_uuid, "v", "ACTIVE", 0, None, "/run/x.ctrl", True, 42)
    with pytest.raises(exception.MigrationError, match="not this incoming one"):
        coord.start_incoming(mid, requested_by="host-b")


@pytest.mark.parametrize("held", [("ACTIVE", True, None), ("DESTROYED", False, None),
                                  ("MIGRATING_IN", False, "another-migration")])
def test_a_confirm_is_refused_before_the_commit_point_without_the_incoming(
        env, held):  # noqa: F811
    """Review finding F2 (engine side): a destination that no longer holds this
    migration's incoming vTPCM made the confirm pass the commit point and
    wedge. Now the confirm is refused while a revert is still possible."""
    mid = str(uuid.uuid4())
    coord, db, agents, _ = _cold(env, mid)
    coord.transfer(mid, requested_by="host-a")
    agents.held["host-b"] = held
    with pytest.raises(exception.MigrationError, match="holds no incoming vTPCM of this"):
        coord.commit(mid, requested_by="host-a")
    assert db.get_migration(mid).state == "TRANSFERRED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.migration_id) == ("host-a", 0, mid)
    assert "commit_incoming" not in names(agents)
    assert ("migration.commit", "refused") in [(a.event, a.outcome)
                                               for a in db.list_audit(limit=50)]
    assert coord.abort(mid, "resize reverted").state == "ABORTED"  # revert still works
    assert db.get_vtpcm(INSTANCE).host == "host-a"


def test_an_operator_destroys_only_a_shelved_vtpcm(env):  # noqa: F811
    """Review finding F3 (part): an instance deleted while SHELVED_OFFLOADED
    never reaches the driver; the operator's signed command shreds its
    vTPCM on the holder, and never a vTPCM that is not shelved."""
    coord, db, agents, _, _ = env
    with pytest.raises(exception.CommandRefused, match="is STOPPED on host-a, not shelved"):
        coord.destroy_shelved_vtpcm(INSTANCE)
    assert ("destroy", "host-a") not in agents.calls
    coord.shelve_vtpcm(INSTANCE, requested_by="host-a")
    coord.destroy_shelved_vtpcm(INSTANCE)
    assert ("destroy", "host-a") in agents.calls
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)
    assert [a.outcome for a in db.list_audit(limit=50) if a.event == "vtpcm.destroy"] == \
        ["destroyed", "refused"]


def test_forgetting_a_host_drops_its_abandoned_vtpcms(env):  # noqa: F811
    coord, db, agents, _, _ = env
    _revoked(db)
    coord.replace_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert len(db.list_abandoned()) == 1
    db.forget_host("host-a")
    assert db.list_abandoned() == []
