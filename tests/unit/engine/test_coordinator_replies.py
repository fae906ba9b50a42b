"""The coordinator over the real signed-reply path: real AgentManagers
(fake instance managers) and CommandVerifiers behind an AgentAPI whose
replies are checked with the keys the engine database enrolled
(EnrolledReplyKeys), no broker. ``world.loop.hook`` plays a broker client
that steals, redelivers or forges answers (see test_signed_replies)."""

import dataclasses
import datetime
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
from vtpcm_nova.engine.db.api import Database, TrustBasis
from vtpcm_nova.engine.replykeys import TOWARD_SAFETY, EnrolledReplyKeys
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
