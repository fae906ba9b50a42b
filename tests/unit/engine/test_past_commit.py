"""Review fix3, finding 2: a migration COMMITTING whose destination died
before committing had no operator path (forget: "resolve each first";
``--to source``: past the commit point; ``--to destination``:
commit_incoming on a dead, revoked host never completes). The port of the
proof, inverted: ``resolve --to source --past-commit`` rolls back to the
source's intact copy under a new generation, only for a REVOKED
destination, audited."""

from typing import Any

import pytest

from tests.unit.engine.test_coordinator import INSTANCE
from tests.unit.engine.test_coordinator_replies import _resolver, three_hosts  # noqa: F401
from tests.unit.engine.test_resolve import GONE, OUT, host, migration, view
from vtpcm_common import exception
from vtpcm_nova.engine import resolve
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.protocol import MigrationState as M

DEAD = exception.ServiceUnreachable(service="vtpcm-agent", method="commit_incoming",
                                    reason="timed out")


def test_committing_dead_dest_has_an_operator_path_and_says_what_is_lost():
    rec = migration(M.COMMITTING, dest="gone")
    # the ways the proof showed closed stay closed
    assert not resolve.plan_forget(host(HostStatus.REVOKED), [rec], [],
                                   resolve.Answer.SILENT).allowed
    refused = resolve.plan_migration(rec, "source", OUT, GONE)
    assert not refused.allowed and "--past-commit" in refused.text
    # the one way back, in plain words
    plan = resolve.plan_past_commit(rec, OUT, GONE, dest_gone=True)
    assert plan.allowed
    assert "state at the switchover moment" in plan.text
    assert "anything the guest wrote to its TPM on gone is lost" in plan.text
    assert "new generation 6" in plan.text and "(generation 5) is never activated" \
        in plan.text


@pytest.mark.parametrize("rec, source, gone, why", [
    (migration(M.COMMITTING), OUT, False, "is not REVOKED: revoke it first"),
    (migration(M.SHREDDING), OUT, True, "applies only to a migration COMMITTING"),
    (migration(M.PREPARED), OUT, True, "applies only to a migration COMMITTING"),
    (migration(M.COMMITTING), GONE, True, "no intact copy to go back to"),
    (migration(M.COMMITTING), view("DESTROYED", migration_id=None), True,
     "no intact copy to go back to"),
])
def test_past_commit_is_refused_outside_its_one_case(rec, source, gone, why):
    plan = resolve.plan_past_commit(rec, source, GONE, dest_gone=gone)
    assert not plan.allowed and why in plan.text


def _stuck_committing(coord: Any, db: Any, agents: Any) -> str:
    """host-b dies right after the source's commit: COMMITTING, the
    authority moved to host-b at generation 1, commit_incoming pending."""
    import uuid
    mid = str(uuid.uuid4())
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    agents.held["host-a"] = ("MIGRATING_OUT", False, mid)

    def dead(host: str, ctx: Any) -> Any:
        agents.calls.append(("commit_incoming", host))
        raise DEAD
    agents.commit_incoming = dead
    with pytest.raises(exception.ServiceUnreachable):
        coord.commit(mid, requested_by="host-a")
    assert db.get_migration(mid).state == "COMMITTING"
    assert (db.get_vtpcm(INSTANCE).host, db.get_vtpcm(INSTANCE).generation) == ("host-b", 1)
    return mid


def test_rollback_past_the_commit_point_restores_the_source_under_a_new_generation(
        three_hosts: Any) -> None:  # noqa: F811
    coord, db, agents, _ = three_hosts
    mid = _stuck_committing(coord, db, agents)
    res = _resolver(coord, db, agents)
    # not while host-b is APPROVED: its agent could still commit
    with pytest.raises(exception.ResolutionRefused, match="is not REVOKED"):
        res.resolve_migration(mid, "source", execute=True, past_commit=True)
    with pytest.raises(exception.ResolutionRefused, match="goes with --to source only"):
        res.resolve_migration(mid, "destination", execute=True, past_commit=True)
    assert ("reclaim_outgoing", "host-a") not in agents.calls
    db.revoke_host("host-b")
    # the proof: toward the destination it never completes
    _, state = res.resolve_migration(mid, "destination", execute=True)
    assert state == "COMMITTING"
    plan, state = res.resolve_migration(mid, "source", execute=False, past_commit=True)
    assert state == "COMMITTING" and "new generation 2" in plan.text
    plan, state = res.resolve_migration(mid, "source", execute=True, past_commit=True)
    assert state == "ABORTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == \
        ("host-a", 2, "ACTIVE", None)
    assert agents.reclaimed_at == 2  # never 1, host-b's generation
    audit = [(a.event, a.outcome, a.detail) for a in db.list_audit(limit=50)
             if a.migration_id == mid]
    assert any(o == "rollback to the source's copy" and "died before committing" in d
               for _, o, d in audit)
    assert ("migration.resolve", "resolved") in [(e, o) for e, o, _ in audit]
    # nothing moves host-b's copy forward any more
    calls = len(agents.calls)
    coord.reconcile()
    with pytest.raises(exception.InvalidTransition):
        coord.commit(mid, requested_by="host-b")
    assert ("commit_incoming", "host-b") not in agents.calls[calls:]
    assert db.get_vtpcm(INSTANCE).generation == 2


@pytest.mark.parametrize("by_reconcile", [True, False], ids=["reconcile", "again"])
def test_a_rollback_interrupted_at_the_source_is_finished_later(
        three_hosts: Any, by_reconcile: bool) -> None:  # noqa: F811
    coord, db, agents, _ = three_hosts
    mid = _stuck_committing(coord, db, agents)
    db.revoke_host("host-b")
    agents.fail["reclaim_outgoing"] = exception.ServiceUnreachable(
        service="vtpcm-agent", method="reclaim_outgoing", reason="timed out")
    plan, state = _resolver(coord, db, agents).resolve_migration(
        mid, "source", execute=True, past_commit=True)
    assert state == "RECLAIMING" and "did not complete" in plan.text
    assert db.get_vtpcm(INSTANCE).host == "host-b"  # the record moves after the agent
    if by_reconcile:
        coord.reconcile()
    else:  # the same command again finishes it
        assert _resolver(coord, db, agents).resolve_migration(
            mid, "source", execute=True, past_commit=True)[1] == "ABORTED"
    assert db.get_migration(mid).state == "ABORTED"
    assert (db.get_vtpcm(INSTANCE).host, db.get_vtpcm(INSTANCE).generation) == ("host-a", 2)
