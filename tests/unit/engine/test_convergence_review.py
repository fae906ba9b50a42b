"""Review findings on swtpm recovery and the operator's tools (issue 10),
each driven through the real coordinator, database and resolver with fake
agents (no QEMU, no swtpm): every test here failed on eb44f10."""

import datetime
import uuid

import oslo_messaging as messaging
import pytest

from tests.unit.engine.fakes import enrolled
from tests.unit.engine.test_attestation import env as att_env  # noqa: F401 (fixture)
from tests.unit.engine.test_coordinator import INSTANCE, env  # noqa: F401 (fixture)
from vtpcm_common import exception
from vtpcm_common.api.agent import messages as am
from vtpcm_nova.engine.coordinator import Coordinator
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.manager import EngineManager
from vtpcm_nova.engine.replykeys import EnrolledReplyKeys
from vtpcm_nova.engine.resolve import Answer, Resolver


def _incoming(holds_state, state="MIGRATING_IN", generation=0, mid=None):
    def answer(host, ctx):
        return am.IncomingState(state, generation, mid or ctx.migration_id, True,
                                holds_state)
    return answer


def _get(mid, dest_state="MIGRATING_IN"):
    def agent_get(host, instance):
        state = "MIGRATING_OUT" if host == "host-a" else dest_state
        return am.VTPCMInfo(instance, str(uuid.uuid4()), state, 0, mid, "/run/x.ctrl",
                            True, 41)
    return agent_get


class _Silent(dict):
    """``FakeAgents.fail`` whose failures last (a host gone for good)."""

    def pop(self, key, default=None):
        return self.get(key, default)


def _deadline_abort_unanswered(coord, db, agents, clock):
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    clock["now"] += datetime.timedelta(seconds=120)
    agents.fail["abort_incoming"] = exception.ServiceUnreachable(
        service="agent", method="abort_incoming", reason="timeout")
    coord.reconcile()
    rec = db.get_migration(mid)
    assert (rec.state, rec.error) == ("ABORTING", "deadline passed")
    return mid


def test_resolve_to_an_empty_destination_is_refused_before_the_commit_point(env):  # noqa: F811
    """Finding 1 (HIGH): a prepared, running but EMPTY incoming vTPCM got the
    authority; commit_incoming then failed for good (COMMITTING, the way
    back refused)."""
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    res = Resolver(db, coord, _get(mid), lambda h: Answer.VERIFIED, _incoming(False))
    with pytest.raises(exception.ResolutionRefused, match="has received no state"):
        res.resolve_migration(mid, "destination", execute=True)
    assert db.get_migration(mid).state == "PREPARED"
    assert (db.get_vtpcm(INSTANCE).host, db.get_vtpcm(INSTANCE).generation) == ("host-a", 0)
    assert "commit_incoming" not in [c[0] for c in agents.calls]
    # an answer about another migration proves nothing either
    other = Resolver(db, coord, _get(mid), lambda h: Answer.VERIFIED,
                     _incoming(True, mid=str(uuid.uuid4())))
    with pytest.raises(exception.ResolutionRefused, match="does not prove"):
        other.resolve_migration(mid, "destination", execute=True)
    # no signed answer (agent older than 1.7, reply not verified): refused too
    def unsigned(host, ctx):
        raise exception.ReplyNotAuthenticated(host=host, method="incoming_state",
                                              reason="an unsigned error reply")
    silent = Resolver(db, coord, _get(mid), lambda h: Answer.VERIFIED, unsigned)
    with pytest.raises(exception.ResolutionRefused, match="does not prove"):
        silent.resolve_migration(mid, "destination", execute=True)
    # with the state received it commits
    res = Resolver(db, coord, _get(mid), lambda h: Answer.VERIFIED, _incoming(True))
    assert res.resolve_migration(mid, "destination", execute=True)[1] == "COMMITTED"


def test_revoked_host_is_asked_for_health_with_a_signed_reply(env):  # noqa: F811
    """Finding 2 (HIGH): the verifying client refused to send health to a
    revoked host, so 'the agent still answers' never held."""
    _, db, _, _, _ = env
    db.enroll_host("cmp1", ak_public=b"ak", ak_name=b"\x00\x0bak", kem_public=b"k",
                   kem_name=b"k1", command_public=b"\x01" * 32, approved=True)
    db.revoke_host("cmp1")
    keys = EnrolledReplyKeys(db)
    assert keys.reply_key("cmp1", "health") is not None
    with pytest.raises(exception.ReplyNotAuthenticated, match="only an approved host"):
        keys.reply_key("cmp1", "get")


class _Health:
    def __init__(self, err):
        self.err = err

    def health(self, host, timeout=None):
        if self.err is not None:
            raise self.err
        return am.Health(host, "1.7", 0, 0, ())


@pytest.mark.parametrize("err,alive", [
    (None, Answer.VERIFIED),
    (exception.ReplyNotAuthenticated(host="cmp1", method="health", reason="bad signature"),
     Answer.UNVERIFIED),
    (messaging.MessagingTimeout("no answer"), Answer.SILENT),
    (exception.ServiceUnreachable(service="agent", method="health", reason="timeout"),
     Answer.SILENT),
])
def test_any_answer_of_the_agent_refuses_forget(env, err, alive):  # noqa: F811
    coord, db, _, _, _ = env
    mgr = EngineManager(db, None, coord)
    coord.agents = _Health(err)
    assert mgr._agent_alive("host-b") is alive


def test_forget_keeps_the_revocation(att_env):  # noqa: F811
    """Finding 3 (HIGH/MEDIUM): forget deleted the host row and its bound
    keys; one unsigned registration cast re-enrolled the revoked TPM
    (APPROVED under auto_approve), or it enrolled under another name."""
    att, agent, _ = att_env
    tpm = enrolled(att, agent, "cmp1")
    att.revoke("cmp1")
    mgr = EngineManager(att.db, att, Coordinator(att.db, agent, None), auto_approve=True)
    att.db.forget_host("cmp1")
    assert att.db.get_host("cmp1").status is HostStatus.FORGOTTEN
    mgr.enroll_registered("cmp1")  # what the agent's unsigned registration leads to
    assert att.db.get_host("cmp1").status is HostStatus.FORGOTTEN
    agent.tpms["cmp9"] = tpm
    with pytest.raises(exception.CertificationError, match="cmp1"):
        att.enroll_from_agent("cmp9", auto_approve=True)
    with pytest.raises(exception.InvalidTransition, match="FORGOTTEN"):
        att.db.approve_host("cmp1")
    with pytest.raises(exception.ReplyNotAuthenticated, match="forgotten"):
        EnrolledReplyKeys(att.db).reply_key("cmp1", "abort_incoming")
    with pytest.raises(exception.NotFound):  # the engine API shows no tombstone
        mgr._known_host("cmp1")
    # the operator's enroll (signed engine call) is the way back
    rec = att.enroll_from_agent("cmp1", auto_approve=False)
    assert rec.status is HostStatus.PENDING


def test_forget_does_not_settle_a_deadline_abort(env):  # noqa: F811
    """Finding 4 (MEDIUM): forgetting the destination of a deadline abort fed
    it DestinationDestroyed: the source's older copy went ACTIVE although
    the guest may run on the destination."""
    coord, db, agents, _, clock = env
    mid = _deadline_abort_unanswered(coord, db, agents, clock)
    db.revoke_host("host-b")
    res = Resolver(db, coord, _get(mid), lambda h: Answer.SILENT, _incoming(True))
    with pytest.raises(exception.ResolutionRefused,
                       match="deadline abort waits for the destination's answer"):
        res.forget_host("host-b", execute=True)
    assert db.get_migration(mid).state == "ABORTING"
    assert "abort_outgoing" not in [c[0] for c in agents.calls]
    # the operator who saw the guest on the source says so: in doubt on that
    # word, then discarded; the revoked destination's silence is not waited
    # for (its step skipped), and the forget finds nothing left to settle
    agents.fail = _Silent(abort_incoming=exception.ServiceUnreachable(
        service="agent", method="abort_incoming", reason="timeout"))
    assert res.resolve_migration(mid, "source", execute=True)[1] == "ABORTED"
    outcomes = [a.outcome for a in db.list_audit(limit=50)
                if a.event == "migration.abort" and a.migration_id == mid]
    assert "in doubt" in outcomes and "discarding the destination" in outcomes
    assert res.forget_host("host-b", execute=True).allowed
    assert ("abort_outgoing", "host-a") in agents.calls


def test_resolve_to_source_of_a_used_destination_aborts_and_says_so(env):  # noqa: F811
    """Finding 6 (LOW): the destination refused the deadline's destroy
    (DestinationInUse): IN_DOUBT, yet audited 'resolved'. Now the operator's
    word is carried out (IN_DOUBT -> DISCARDING -> ABORTED)."""
    coord, db, agents, _, clock = env
    mid = _deadline_abort_unanswered(coord, db, agents, clock)
    agents.fail["abort_incoming"] = exception.DestinationInUse(
        migration_id=mid, reason="the incoming vTPCM already received its state")
    res = Resolver(db, coord, _get(mid), lambda h: Answer.SILENT, _incoming(True))
    plan, state = res.resolve_migration(mid, "source", execute=True)
    assert state == "ABORTED"
    assert "WARNING" in plan.text
    outcomes = [a.outcome for a in db.list_audit(limit=20) if a.event == "migration.resolve"]
    assert outcomes[0] == "resolved"
    assert ("abort_outgoing", "host-a") in agents.calls


def test_resolve_that_does_not_finish_is_audited_incomplete(env):  # noqa: F811
    coord, db, agents, _, clock = env
    mid = _deadline_abort_unanswered(coord, db, agents, clock)
    agents.fail = _Silent(abort_incoming=exception.ServiceUnreachable(
        service="agent", method="abort_incoming", reason="timeout"))
    res = Resolver(db, coord, _get(mid), lambda h: Answer.SILENT, _incoming(True))
    plan, state = res.resolve_migration(mid, "source", execute=True)
    assert state == "DISCARDING"  # the operator's word: in doubt, then discard
    outcomes = [a.outcome for a in db.list_audit(limit=20) if a.event == "migration.resolve"]
    assert outcomes[0] == "incomplete" and "resolved" not in outcomes


def test_resolve_audits_resolved_only_for_a_finished_migration(env):  # noqa: F811
    """Finding 6 (LOW): whatever the steps did, 'resolved' is audited only
    when the migration ended ABORTED or COMMITTED."""
    coord, db, agents, _, clock = env
    mid = _deadline_abort_unanswered(coord, db, agents, clock)

    class Idle:  # a settler whose steps return without moving the migration
        def __getattr__(self, name):
            return lambda migration_id, *args: db.get_migration(migration_id)

    res = Resolver(db, Idle(), _get(mid), lambda h: Answer.SILENT, _incoming(True))
    plan, state = res.resolve_migration(mid, "source", execute=True)
    assert state == "ABORTING" and "not finished" in plan.text
    outcomes = [a.outcome for a in db.list_audit(limit=20) if a.event == "migration.resolve"]
    assert outcomes[0] == "incomplete"


def test_an_unverified_answer_refuses_forget_unless_the_operator_overrides(env):  # noqa: F811
    """Review fix3, finding 4: anyone on the broker answering on a dead
    host's topic (a reply that does not verify) blocked ``hosts forget``
    for ever. It still refuses by default, audited; the operator's signed
    ``--despite-unverified-answers`` forgets it, warned that a real agent
    with a changed key would be forgotten while alive."""
    coord, db, _, _, _ = env
    db.revoke_host("host-b")
    mgr = EngineManager(db, None, coord)
    coord.agents = _Health(exception.ReplyNotAuthenticated(
        host="host-b", method="health", reason="signed with another key"))
    with pytest.raises(exception.ResolutionRefused,
                       match="does not verify.*--despite-unverified-answers"):
        mgr.resolver.forget_host("host-b", execute=True)
    assert db.get_host("host-b").status is HostStatus.REVOKED
    plan = mgr.resolver.forget_host("host-b", execute=True, despite_unverified=True)
    assert "forgotten while alive" in plan.text
    assert db.get_host("host-b").status is HostStatus.FORGOTTEN
    audit = [(a.outcome, a.detail) for a in db.list_audit(limit=50, host="host-b")
             if a.event == "host.forget"]
    assert [o for o, _ in audit].count("unverified answer") == 2
    assert any("on the operator's word" in str(d) for _, d in audit)
    assert ("forgotten" in [o for o, _ in audit]) and ("refused" in [o for o, _ in audit])


def test_the_override_does_not_forget_a_host_whose_agent_verifies(env):  # noqa: F811
    coord, db, _, _, _ = env
    db.revoke_host("host-b")
    mgr = EngineManager(db, None, coord)
    coord.agents = _Health(None)
    with pytest.raises(exception.ResolutionRefused, match="still answers"):
        mgr.resolver.forget_host("host-b", execute=True, despite_unverified=True)
    assert db.get_host("host-b").status is HostStatus.REVOKED
