"""The coordinator over the real signed-reply path: real AgentManagers
(fake instance managers) and CommandVerifiers behind an AgentAPI whose
replies are checked with the keys the engine database enrolled
(EnrolledReplyKeys), no broker. ``world.loop.hook`` plays a broker client
that steals, redelivers or forges answers (see test_signed_replies)."""

import dataclasses
import datetime
import time
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.unit.common import test_signed_replies
from tests.unit.common.test_signed_replies import CONTEXT, DST, SRC, FakeInstances
from tests.unit.engine.test_coordinator import (
    INSTANCE,
    T0,
    YEAR,
    FakeAgents,
    FakeTrust,
    FakeVerdict,
    trusted_in_db,
)
from vtpcm_agent.association import Association, VTPCMState
from vtpcm_common import authn, exception
from vtpcm_common.api.agent import messages as am
from vtpcm_nova.engine.coordinator import CREATING, Coordinator
from vtpcm_nova.engine.db import migration
from vtpcm_nova.engine.db.api import Database, TrustBasis, utcnow
from vtpcm_nova.engine.replykeys import TOWARD_SAFETY, EnrolledReplyKeys
from vtpcm_nova.engine.resolve import Answer, Resolver
from vtpcm_nova.engine.verifier import TrustStatus

world = test_signed_replies.world


class Creating(FakeInstances):
    """An instance manager that makes vTPCMs (or fails to, cleaning up)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[str, Association] = {}
        self.fail: exception.VTPCMException | None = None

    def create(self, instance_uuid: str) -> Association:
        self.calls.append("create")
        if instance_uuid in self.made:
            raise exception.AlreadyExists(what="vTPCM of instance", key=instance_uuid)
        if self.fail is not None:
            raise self.fail
        made = Association(instance_uuid, str(uuid.uuid4()), VTPCMState.STOPPED, 0, None,
                           "/s", "/run/vtpcm/%s.ctrl" % instance_uuid, None, "t0", "t1")
        self.made[instance_uuid] = made
        return made

    def destroy(self, instance_uuid: str) -> Association:
        self.calls.append("destroy")
        if instance_uuid not in self.made:
            raise exception.NotFound(what="vTPCM of instance", key=instance_uuid)
        return dataclasses.replace(self.made.pop(instance_uuid), state=VTPCMState.DESTROYED)


@pytest.fixture
def engine(world: Any, tmp_path: Any) -> Any:
    """A coordinator on SQLite whose agent client is ``world.api``, its
    reply keys the enrolled host command keys."""
    url = "sqlite:///%s" % (tmp_path / "engine.sqlite")
    migration.db_sync(url)
    db = Database(url)
    db.put_policy("golden", "sha256", {16: b"\x16" * 32})
    for host in (SRC, DST):
        inst = Creating()
        world.instances[host] = world.loop.managers[host].instances = inst
        db.enroll_host(host, ak_public=b"ak" + host.encode(), ak_name=b"n" + host.encode(),
                       kem_public=b"kem" + host.encode(), kem_name=b"k" + host.encode(),
                       command_public=authn.public_raw(world.host_keys[host].public_key),
                       ek_certificate=None, approved=True)
        db.assign_policy(host, "golden")
        trusted_in_db(db, host)
    world.api.reply_keys = EnrolledReplyKeys(db)
    trust = FakeTrust()
    trust.verdicts[SRC] = trust.verdicts[DST] = FakeVerdict("TRUSTED")
    yield Coordinator(db, world.api, trust, timeout=60), db
    db.dispose()


def _audit(db: Database, event: str) -> list[tuple[str, str | None]]:
    return [(a.outcome, a.host) for a in db.list_audit(limit=50) if a.event == event]


def deliver_twice(method: str, args: dict[str, Any], deliver: Any) -> Any:
    """A broker client runs the engine's command, keeps the agent's signed
    success, and hands the engine the agent's answer to a second delivery."""
    deliver()
    return deliver()


def test_a_command_delivered_twice_is_never_reported_refused(world: Any) -> None:
    """The second delivery's refusal is not signed: no answer, never a
    signed "refused" for a command that ran."""
    world.loop.hook = deliver_twice
    with pytest.raises(exception.ReplyNotAuthenticated,
                       match="unsigned error reply .CommandReplayed"):
        world.api.commit_outgoing(SRC, CONTEXT)
    assert world.instances[SRC].calls == ["commit_outgoing"]  # it did run


def test_a_replayed_create_keeps_the_reservation(world: Any, engine: Any) -> None:
    """The create ran on SRC: the engine must not free its reservation, so
    no second vTPCM can be created elsewhere."""
    coord, db = engine
    inst = str(uuid.uuid4())
    world.loop.hook = deliver_twice
    with pytest.raises(exception.ReplyNotAuthenticated):
        coord.create_vtpcm(inst, SRC)
    assert inst in world.instances[SRC].made
    assert db.get_vtpcm(inst).state == CREATING
    world.loop.hook = None
    with pytest.raises(exception.AlreadyExists):
        coord.create_vtpcm(inst, DST)
    assert inst not in world.instances[DST].made
    assert ("unknown", SRC) in _audit(db, "vtpcm.create")


def test_a_create_replayed_after_its_nonce_expired_keeps_the_reservation(
        world: Any, engine: Any) -> None:
    """A create that ran, delivered again once the agent forgot its nonce
    (agent clock 100 s fast, legal; the replay 51 s after sending, inside
    rpc_timeout): the agent's "expired" is not signed, so the engine keeps
    its reservation and no second vTPCM is made elsewhere (review 2, P1)."""
    coord, db = engine
    inst = str(uuid.uuid4())
    verifier = world.loop.managers[SRC].verifier
    fast = 100.0
    verifier._clock = lambda: time.time() + fast
    verifier.created_at = verifier._clock() - 1000

    def replay_late(method: str, args: dict[str, Any], deliver: Any) -> Any:
        if method != "create":
            return deliver()
        deliver()  # runs; the broker client keeps the answer
        verifier._clock = lambda: time.time() + fast + 51
        return deliver()
    world.loop.hook = replay_late
    with pytest.raises(exception.ReplyNotAuthenticated,
                       match="unsigned error reply .CommandStale"):
        coord.create_vtpcm(inst, SRC)
    assert inst in world.instances[SRC].made
    assert db.get_vtpcm(inst).state == CREATING
    assert ("unknown", SRC) in _audit(db, "vtpcm.create")
    world.loop.hook = None
    verifier._clock = time.time
    with pytest.raises(exception.AlreadyExists):
        coord.create_vtpcm(inst, DST)
    assert inst not in world.instances[DST].made


@pytest.mark.parametrize("refusal", [
    exception.CommandRefused(method="create", reason="signature does not verify"),
    exception.CommandStale(method="create", reason="expired"),
])
def test_a_create_refused_at_verification_keeps_the_reservation(
        world: Any, engine: Any, refusal: exception.CommandRefused) -> None:
    """Defence in depth: even a signed verification refusal proves neither
    that the create never ran nor that it cannot run later."""
    coord, db = engine
    inst = str(uuid.uuid4())

    def refuse(method: str, args: dict[str, Any], deliver: Any) -> Any:
        outcome = {"error": {"type": type(refusal).__name__, "message": str(refusal),
                             "kwargs": dict(refusal.kwargs)}}
        return world.host_keys[SRC].sign_reply(
            "1.6", method, SRC, args["reply_nonce"],
            authn.request_digest(args["payload"], args.get("auth")), outcome)
    world.loop.hook = refuse
    with pytest.raises(type(refusal)):
        coord.create_vtpcm(inst, SRC)
    assert db.get_vtpcm(inst).state == CREATING
    assert ("unknown", SRC) in _audit(db, "vtpcm.create")
    world.loop.hook = None
    with pytest.raises(exception.AlreadyExists):
        coord.create_vtpcm(inst, DST)


def test_an_agent_that_already_holds_the_vtpcm_keeps_the_reservation(
        world: Any, engine: Any) -> None:
    """A signed AlreadyExists from the reserved host: the vTPCM exists
    there, so the reservation stays (destroy_vtpcm removes both)."""
    coord, db = engine
    inst = str(uuid.uuid4())
    world.instances[SRC].create(inst)  # e.g. left by a create whose answer was lost
    with pytest.raises(exception.AlreadyExists):
        coord.create_vtpcm(inst, SRC)
    assert db.get_vtpcm(inst).state == CREATING
    assert ("exists", SRC) in _audit(db, "vtpcm.create")
    coord.destroy_vtpcm(inst)
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(inst)


def test_a_signed_refusal_frees_the_reservation_and_is_audited(
        world: Any, engine: Any) -> None:
    coord, db = engine
    inst = str(uuid.uuid4())
    world.instances[SRC].fail = exception.SwtpmError(vtpcm_id="v", reason="setup failed")
    with pytest.raises(exception.SwtpmError, match="setup failed"):
        coord.create_vtpcm(inst, SRC)
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(inst)
    assert ("refused", SRC) in _audit(db, "vtpcm.create")


def test_a_forged_create_answer_completes_nothing(world: Any, engine: Any) -> None:
    """Property 6 over the real reply path: a broker client steals the
    create and answers with a well-formed success signed by another
    enrolled-looking key. The engine records no vTPCM id from it and audits
    the refusal; the reservation stays CREATING (the outcome is unknown)."""
    coord, db = engine
    inst = str(uuid.uuid4())

    def forge(method: str, args: dict[str, Any], deliver: Any) -> Any:
        ok = {"instance_uuid": inst, "vtpcm_id": str(uuid.uuid4()), "state": "STOPPED",
              "generation": 0, "migration_id": None,
              "ctrl_socket": "/run/vtpcm/%s.ctrl" % inst, "running": False, "pid": None}
        return world.host_keys["cmp3"].sign_reply(
            "1.6", method, SRC, args["reply_nonce"],
            authn.request_digest(args["payload"], args.get("auth")), {"ok": ok})
    world.loop.hook = forge
    with pytest.raises(exception.ReplyNotAuthenticated, match="does not verify"):
        coord.create_vtpcm(inst, SRC)
    assert world.instances[SRC].calls == []
    rec = db.get_vtpcm(inst)
    assert rec.state == CREATING
    assert ("refused", SRC) in _audit(db, "agent-reply")


# --- hosts that are not approved (mid-migration revocation, reboot) -----------

class KeyedAgents(FakeAgents):
    """FakeAgents behind the engine's reply-key rule, as AgentAPI applies
    it: nothing is sent to, and no answer taken from, a host whose reply
    cannot count for that method (EnrolledReplyKeys)."""

    METHODS = {"seal": "seal_migration_key", "prepare": "prepare_incoming"}

    def __init__(self, keys: EnrolledReplyKeys) -> None:
        super().__init__()
        self.keys = keys

    def _record(self, name: str, host: str, *args: Any) -> None:
        self.keys.reply_key(host, self.METHODS.get(name, name))
        super()._record(name, host, *args)

    def seal_migration_key(self, host: str, context: Any, dest_kem_public: bytes) -> Any:
        self._record("seal", host)
        return am.SealedKey(b"envelope")


@pytest.fixture
def three_hosts(tmp_path: Any) -> Any:
    url = "sqlite:///%s" % (tmp_path / "engine.sqlite")
    migration.db_sync(url)
    db = Database(url)
    db.put_policy("golden", "sha256", {16: b"\x16" * 32})
    trust = FakeTrust()
    for host in ("host-a", "host-b", "host-c"):
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        db.enroll_host(host, ak_public=b"ak-" + host.encode(), ak_name=b"n-" + host.encode(),
                       kem_public=b"kem-of-" + host[-1].encode(), kem_name=b"k" + host.encode(),
                       command_public=authn.public_raw(key), ek_certificate=None,
                       approved=True)
        db.assign_policy(host, "golden")
        trusted_in_db(db, host)
        trust.verdicts[host] = FakeVerdict("TRUSTED")
    agents = KeyedAgents(EnrolledReplyKeys(db))
    coord = Coordinator(db, agents, trust, timeout=60)
    coord.create_vtpcm(INSTANCE, "host-a")
    yield coord, db, agents, trust
    db.dispose()


def _revoke(db: Database, host: str) -> None:
    db.revoke_host(host)


def _reboot_to_pending(db: Database, host: str) -> None:
    """What an attestation under ``reapprove`` does after a host reboot."""
    rec = db.get_host(host)
    policy = db.get_policy(str(rec.policy_name))
    later = T0 + datetime.timedelta(days=1)
    db.record_attestation(TrustBasis(host, rec.revision, policy.name, policy.revision, later),
                          TrustStatus.UNTRUSTED, "rebooted", later + YEAR, reapprove=True)


@pytest.mark.parametrize("demote", [_revoke, _reboot_to_pending])
def test_a_destination_demoted_mid_migration_does_not_freeze_the_source(
        three_hosts: Any, demote: Any) -> None:
    """The abort reaches the revoked (or re-pending) destination and its
    signed answer counts: the source's vTPCM is ACTIVE and free again."""
    coord, db, agents, trust = three_hosts
    mid = str(uuid.uuid4())
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    demote(db, "host-b")
    assert db.get_host("host-b").status.value != "APPROVED"
    trust.verdicts["host-b"] = FakeVerdict("UNTRUSTED", "demoted")
    assert coord.abort(mid, "operator revoked the destination").state == "ABORTED"
    assert ("abort_incoming", "host-b") in agents.calls
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.state, rec.migration_id) == ("host-a", "ACTIVE", None)
    coord.stop_vtpcm(INSTANCE, requested_by="host-a")
    coord.start_vtpcm(INSTANCE, requested_by="host-a")
    assert coord.begin(str(uuid.uuid4()), INSTANCE, "host-a", "host-c").state == "PREPARED"


def test_a_demoted_host_still_moves_nothing_forward(three_hosts: Any) -> None:
    """APPROVED-only for every step that moves a secret or the authority:
    a revoked destination gets no commit and no prepare."""
    coord, db, agents, _ = three_hosts
    keys = EnrolledReplyKeys(db)
    db.revoke_host("host-b")
    for method in ("create", "seal_migration_key", "prepare_incoming", "commit_incoming",
                   "commit_outgoing", "start", "stop", "get", "import_state",
                   "export_state"):
        with pytest.raises(exception.ReplyNotAuthenticated, match="host is REVOKED"):
            keys.reply_key("host-b", method)
    for method in sorted(TOWARD_SAFETY):
        assert keys.reply_key("host-b", method) is not None


def _an_hour_later(coord: Coordinator) -> None:
    later = coord.now() + datetime.timedelta(seconds=3600)
    coord.now = lambda: later


@pytest.mark.parametrize("in_doubt", [False, True], ids=["prepared", "in-doubt"])
@pytest.mark.parametrize("demote", [_revoke, _reboot_to_pending])
def test_the_source_commit_never_moves_the_authority_to_a_demoted_destination(
        three_hosts: Any, demote: Any, in_doubt: bool) -> None:
    """Review 2, P2: a revoked destination's signed DestinationInUse sends
    the deadline abort IN_DOUBT (it counts: TOWARD_SAFETY); the source's
    commit then must not make the revoked host the vTPCM's authority, nor
    from PREPARED. Refused, audited; nothing moves. A re-pending host that
    is approved again and attested TRUSTED gets the same commit."""
    coord, db, agents, trust = three_hosts
    mid = str(uuid.uuid4())
    gen = db.get_vtpcm(INSTANCE).generation
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    demote(db, "host-b")
    trust.verdicts["host-b"] = FakeVerdict("UNTRUSTED", "quote does not match")
    status = db.get_host("host-b").status.value
    assert status in ("REVOKED", "PENDING")
    if in_doubt:
        _an_hour_later(coord)
        agents.fail["abort_incoming"] = exception.DestinationInUse(
            migration_id=mid, reason="the guest runs here")
        coord.reconcile()
    state = "IN_DOUBT" if in_doubt else "PREPARED"
    assert db.get_migration(mid).state == state
    with pytest.raises(exception.HostNotTrusted, match="host is %s" % status):
        coord.commit(mid, requested_by="host-a")
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == (
        "host-a", gen, "MIGRATING", mid)
    assert db.get_migration(mid).state == state
    assert ("commit_incoming", "host-b") not in agents.calls
    refused = [a for a in db.list_audit(limit=50)
               if (a.event, a.outcome) == ("migration.commit", "refused")]
    assert refused and "authority stays on host-a" in str(refused[0].detail)
    if status == "REVOKED":
        return  # final: only a new enrollment brings it back
    db.approve_host("host-b")  # its verdict is UNKNOWN until attested: attested now
    with pytest.raises(exception.HostNotTrusted, match="quote does not match"):
        coord.commit(mid, requested_by="host-a")
    trust.verdicts["host-b"] = FakeVerdict("TRUSTED")
    rec = db.get_host("host-b")
    later = utcnow() + datetime.timedelta(seconds=1)  # after the approval
    db.record_attestation(TrustBasis("host-b", rec.revision, "golden",
                                     db.get_policy("golden").revision, later),
                          TrustStatus.TRUSTED, "quote verified", later + YEAR)
    assert coord.commit(mid, requested_by="host-a").state == "COMMITTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation) == ("host-b", gen + 1)


def test_a_re_enrolled_pending_key_speaks_for_nobody(world: Any, engine: Any) -> None:
    """Review 2, P4: after an operator re-enrolls a REVOKED host (identity
    pulled over the broker, no EK CA), its PENDING row holds whatever key
    answered get_identity. Its signed abort answer must not count as that
    host's: keys are bound to a host only at approval."""
    _, db = engine
    db.revoke_host(DST)
    attacker = world.host_keys["cmp3"]
    db.enroll_host(DST, ak_public=b"soft-ak", ak_name=b"soft-ak-name", kem_public=b"kemX",
                   kem_name=b"kX", command_public=authn.public_raw(attacker.public_key),
                   ek_certificate=None, approved=False)
    assert db.get_host(DST).status.value == "PENDING"

    def forge(method: str, args: dict[str, Any], deliver: Any) -> Any:
        return attacker.sign_reply("1.6", method, DST, args["reply_nonce"],
                                   authn.request_digest(args["payload"], args.get("auth")),
                                   {"ok": {}})
    world.loop.hook = forge
    for method in sorted(TOWARD_SAFETY):
        with pytest.raises(exception.ReplyNotAuthenticated,
                           match="PENDING and its command key was never approved"):
            EnrolledReplyKeys(db).reply_key(DST, method)
    with pytest.raises(exception.ReplyNotAuthenticated, match="never approved"):
        world.api.abort_incoming(DST, CONTEXT, only_if_unused=True)
    assert world.instances[DST].calls == []


def _no_proof(host: str, ctx: Any) -> Any:
    raise exception.ServiceUnreachable(service="vtpcm-agent", method="incoming_state",
                                       reason="timed out")


def _resolver(coord: Coordinator, db: Database, agents: Any) -> Resolver:
    return Resolver(db, coord, agents.get, lambda host: Answer.VERIFIED, _no_proof)


@pytest.mark.parametrize("answer", [
    exception.MigrationError(migration_id="m", reason="no (signed by host-b)"),
    exception.ServiceUnreachable(service="vtpcm-agent", method="abort_incoming",
                                 reason="timed out"),
], ids=["refusing", "silent"])
@pytest.mark.parametrize("in_doubt", [False, True], ids=["aborting", "in-doubt"])
def test_a_revoked_destination_that_will_not_abort_is_resolved_to_the_source(
        three_hosts: Any, answer: exception.VTPCMException, in_doubt: bool) -> None:
    """Review 2, P3: a revoked destination that refuses (signed) or ignores
    every abort keeps the migration ABORTING and the source's vTPCM
    claimed; aborts and reconcile cannot settle it. The operator's resolve
    to the source does: the revoked host's step is skipped (audited), the
    source's vTPCM is ACTIVE and free, and nothing was committed to host-b."""
    coord, db, agents, _ = three_hosts
    mid = str(uuid.uuid4())
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    agents.held["host-a"] = ("MIGRATING_OUT", False, mid)
    db.revoke_host("host-b")
    if in_doubt:
        _an_hour_later(coord)
        agents.fail["abort_incoming"] = exception.DestinationInUse(
            migration_id=mid, reason="the guest runs here")
        coord.reconcile()
        assert db.get_migration(mid).state == "IN_DOUBT"
    real = agents.abort_incoming

    def will_not(host: str, ctx: Any, only_if_unused: bool = False) -> Any:
        if host == "host-b":
            agents.keys.reply_key(host, "abort_incoming")  # its word would count
            raise answer
        return real(host, ctx, only_if_unused)
    agents.abort_incoming = will_not
    if not in_doubt:
        with pytest.raises(type(answer)):
            coord.abort(mid, "operator revoked host-b")
        for _ in range(3):
            coord.abort(mid, "operator revoked host-b, again")
            coord.reconcile()
        assert db.get_migration(mid).state == "ABORTING"
    plan, state = _resolver(coord, db, agents).resolve_migration(mid, "source", execute=True)
    assert "host-b is REVOKED" in plan.text and "restored without it" in plan.text
    assert state == "ABORTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.state, rec.migration_id) == ("host-a", "ACTIVE", None)
    assert ("abort_outgoing", "host-a") in agents.calls
    assert ("commit_incoming", "host-b") not in agents.calls
    skipped = [a for a in db.list_audit(limit=50)
               if (a.event, a.outcome) == ("migration.resolve", "step skipped")]
    assert skipped and "REVOKED" in str(skipped[0].detail)


def test_a_pending_destination_that_will_not_abort_is_not_skipped(
        three_hosts: Any) -> None:
    """Only REVOKED is out for good: a host back to PENDING (reboot under
    reapprove) may come back, so its incoming copy is still waited for."""
    coord, db, agents, _ = three_hosts
    mid = str(uuid.uuid4())
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    agents.held["host-a"] = ("MIGRATING_OUT", False, mid)
    _reboot_to_pending(db, "host-b")
    agents.fail["abort_incoming"] = exception.MigrationError(migration_id=mid, reason="no")
    plan, state = _resolver(coord, db, agents).resolve_migration(mid, "source", execute=True)
    assert state == "ABORTING" and "did not complete" in plan.text
    assert db.get_vtpcm(INSTANCE).migration_id == mid
