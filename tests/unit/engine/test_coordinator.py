"""The migration coordinator over a real SQLite database and a fake agent."""

import datetime
import threading
import time
import uuid

import pytest
import sqlalchemy
from sqlalchemy.orm import Session

from vtpcm_common import exception, statedigest
from vtpcm_common.api.agent import messages as am
from vtpcm_nova.engine import coordinator
from vtpcm_nova.engine.coordinator import Coordinator
from vtpcm_nova.engine.db import migration, models
from vtpcm_nova.engine.db.api import Database, TrustBasis, VerdictRecord
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.shelved import Deletion, ServerView
from vtpcm_nova.engine.verifier import TrustStatus

INSTANCE = str(uuid.uuid4())
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
PROJECT = "8c1e6f1c2f434b8e9f730d2b5a1e0c11"  # the instances' Keystone project
YEAR = datetime.timedelta(days=365)


def FakeVerdict(status: str, reason: str = "") -> VerdictRecord:
    """A real verdict record, as Attestor.check_fresh returns: the coordinator
    reads its typed ``trusted``/``reason``, nothing duck-typed."""
    return VerdictRecord("any-host", TrustStatus(status), reason, T0, T0 + YEAR)


class _StoredVerdicts(dict):
    """A verdict set here is also the engine database's record of the
    host's last attestation (as the real ``Attestor`` stores it): ``begin``
    reads the database first and asks ``check_fresh`` only when that finds
    no fresh TRUSTED verdict of an APPROVED host."""

    def __init__(self, db):
        super().__init__()
        self.db = db
        self.stored = 0

    def __setitem__(self, host, verdict):
        super().__setitem__(host, verdict)
        if self.db is None:
            return
        rec = self.db.get_host(host)
        if rec.policy_name is None:
            return
        policy = self.db.get_policy(rec.policy_name)
        # a later challenge than any on record (an expiry by a host change
        # is dated by the wall clock)
        self.stored += 1
        basis = TrustBasis(host, rec.revision, policy.name, policy.revision,
                           datetime.datetime.now(datetime.UTC)
                           + datetime.timedelta(microseconds=self.stored))
        if verdict.trusted and rec.status is not HostStatus.APPROVED:
            return  # the database refuses it; the host's status decides
        self.db.record_attestation(basis, verdict.status, verdict.reason, T0 + YEAR)


class FakeTrust:
    def __init__(self, db=None):
        self.verdicts = _StoredVerdicts(db)

    def check_fresh(self, host):
        return self.verdicts.get(host, FakeVerdict("UNKNOWN", "never attested"))


class FakeNova:
    """Nova's API as the engine asks it: ``servers`` maps an instance to its
    view (None: 404); an instance not listed is ACTIVE on host-a, PROJECT's. ``deleted``
    holds the instances Nova's admin listing shows deleted; ``admin`` False
    is a credential without Nova's admin view. ``fail`` is raised instead of
    answering (Nova unreachable)."""

    def __init__(self):
        self.servers = {}
        self.deleted = set()
        self.admin = True
        self.asked = []
        self.fail = None

    def get_server(self, instance_uuid):
        self.asked.append(instance_uuid)
        if self.fail is not None:
            raise self.fail
        return self.servers.get(instance_uuid, ServerView("host-a", "active", None, PROJECT))

    def is_admin(self):
        if self.fail is not None:
            raise self.fail
        return self.admin

    def deletion(self, instance_uuid):
        self.asked.append(instance_uuid)
        if self.fail is not None:
            raise self.fail
        if not self.admin:
            return Deletion.NOT_ADMIN
        if instance_uuid in self.deleted:
            return Deletion.DELETED
        return Deletion.NOT_SHOWN_DELETED

    def unshelving(self, instance_uuid, host):
        """What Nova shows while it unshelves onto ``host`` (in spawn); the
        server is ``PROJECT``'s."""
        self.servers[instance_uuid] = ServerView(host, "shelved_offloaded", "spawning",
                                                 PROJECT)


class FakeAgents:
    """Records calls; ``fail`` maps a method name to an exception to raise once."""

    def __init__(self):
        self.calls = []
        self.fail = {}
        self.generation = 0
        self.held = {}  # host -> (state, running, migration id) that get reports
        # the post-import check: side -> the permanent state that side
        # digests (bytes) or why it cannot tell (str); the calls, apart
        # from ``calls`` (host, side, nonce)
        self.states = {}
        self.digest_calls = []
        self.api_version = {}  # host -> the agent API its health reports
        # side -> the blobs its proxy saw ({type: (flags, size, sha256 hex)})
        # or why it has none (str); (host, side, streams asked) of each call
        self.streams = {}
        self.digest_streams = []

    def _record(self, name, host, *args):
        self.calls.append((name, host))
        err = self.fail.pop(name, None)
        if err is not None:
            raise err

    def get(self, host, instance_uuid):
        self._record("get", host)
        state, running, mid = self.held.get(host, ("ACTIVE", True, None))
        return am.VTPCMInfo(instance_uuid, str(uuid.uuid4()), state, self.generation,
                            mid, "/run/x.ctrl", running, 42 if running else None)

    def create(self, host, instance_uuid):
        self._record("create", host)
        return am.VTPCMInfo(instance_uuid, str(uuid.uuid4()), "STOPPED", 0, None,
                            "/run/x.ctrl", False, None)

    def destroy(self, host, instance_uuid):
        self._record("destroy", host)

    def start(self, host, instance_uuid):
        self._record("start", host)
        return am.VTPCMInfo(instance_uuid, str(uuid.uuid4()), "ACTIVE", self.generation,
                            None, "/run/x.ctrl", True, 42)

    def stop(self, host, instance_uuid):
        self._record("stop", host)
        return am.VTPCMInfo(instance_uuid, str(uuid.uuid4()), "STOPPED", self.generation,
                            None, "/run/x.ctrl", False, None)

    def seal_migration_key(self, host, context, dest_kem_public):
        self._record("seal", host)
        if context.generation != self.generation:  # as the agent's own check
            raise exception.GenerationMismatch(instance_uuid=context.instance_uuid,
                                               given=context.generation,
                                               expected=self.generation)
        assert dest_kem_public == b"kem-of-" + context.dest_host[-1:].encode()
        return am.SealedKey(b"envelope")

    def prepare_incoming(self, host, context, envelope):
        self._record("prepare", host)
        assert envelope == b"envelope"

    def commit_incoming(self, host, context):
        self._record("commit_incoming", host)

    def commit_outgoing(self, host, context):
        self._record("commit_outgoing", host)

    def abort_incoming(self, host, context, only_if_unused=False):
        self.only_if_unused = only_if_unused
        self._record("abort_incoming", host)

    def abort_outgoing(self, host, context):
        self._record("abort_outgoing", host)

    def reclaim_outgoing(self, host, context, generation):
        self._record("reclaim_outgoing", host)
        self.reclaimed_at = generation

    def state_digest(self, host, context, side, nonce, streams=True):
        self.digest_calls.append((host, side, nonce))
        # both sides are asked at once: a failure for one host only
        err = self.fail.pop(("state_digest", host), None) or self.fail.pop("state_digest",
                                                                           None)
        if err is not None:
            raise err
        self.digest_streams.append((host, side, streams))
        state = self.states.get(side, b"the permanent state")
        if isinstance(state, str):
            return am.StateDigest(side, None, state)
        digest = statedigest.permanent_state_digest(nonce, state)
        if not streams:
            return am.StateDigest(side, digest)
        blobs = self.streams.get(side, "no control-channel proxy")
        if isinstance(blobs, str):
            return am.StateDigest(side, digest, stream=None, stream_reason=blobs)
        return am.StateDigest(side, digest, stream=statedigest.stream_digest(nonce, blobs))

    def health(self, host, timeout=None):
        self._record("health", host)
        return am.Health(host, self.api_version.get(host, "1.13"), 1, 1, ())


def trusted_in_db(db, host):
    """The engine's own record of a TRUSTED verdict, which ``begin`` reads
    with the host's status (FakeTrust stands for the attestation before it)."""
    rec = db.get_host(host)
    policy = db.get_policy(rec.policy_name)
    basis = TrustBasis(host, rec.revision, policy.name, policy.revision, T0)
    db.record_attestation(basis, TrustStatus.TRUSTED, "quote verified", T0 + YEAR)


@pytest.fixture
def env(tmp_path):
    migration.db_sync("sqlite:///%s" % (tmp_path / "engine.sqlite"))
    db = Database("sqlite:///%s" % (tmp_path / "engine.sqlite"))
    db.put_policy("golden", "sha256", {16: b"\x16" * 32})
    for host in ("host-a", "host-b"):
        db.enroll_host(host, ak_public=b"ak-" + host.encode(), ak_name=b"n-" + host.encode(),
                       kem_public=b"kem-of-" + host[-1].encode(), kem_name=b"k" + host.encode(),
                       ek_certificate=None, approved=True)
        db.assign_policy(host, "golden")
        trusted_in_db(db, host)
    agents, trust = FakeAgents(), FakeTrust(db)
    trust.verdicts["host-a"] = FakeVerdict("TRUSTED")
    trust.verdicts["host-b"] = FakeVerdict("TRUSTED")
    clock = {"now": T0}
    coord = Coordinator(db, agents, trust, timeout=60, now=lambda: clock["now"],
                        nova=FakeNova())
    coord.create_vtpcm(INSTANCE, "host-a")
    coord.nova.asked.clear()  # the create asked Nova for the owner project
    yield coord, db, agents, trust, clock
    db.dispose()


def names(agents):
    return [c[0] for c in agents.calls if c[0] not in ("get", "create")]


def test_happy_path_moves_authority_and_generation(env):
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    assert db.get_vtpcm(INSTANCE).host == "host-a"
    assert coord.commit(mid).state == "COMMITTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.migration_id) == ("host-b", 1, None)
    assert names(agents) == ["seal", "prepare", "commit_incoming", "commit_outgoing"]
    assert agents.calls[-1] == ("commit_outgoing", "host-a")
    # commit again: no-op
    assert coord.commit(mid).state == "COMMITTED"
    assert names(agents).count("commit_outgoing") == 1


def test_untrusted_destination_never_sees_a_key(env):
    coord, db, agents, trust, _ = env
    trust.verdicts["host-b"] = FakeVerdict("UNTRUSTED", "PCR 16 differs from policy 'golden'")
    mid = str(uuid.uuid4())
    with pytest.raises(exception.HostNotTrusted) as err:
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert "PCR 16" in str(err.value)
    assert "seal" not in names(agents) and "prepare" not in names(agents)
    assert db.get_migration(mid).state == "REFUSED"
    assert db.get_vtpcm(INSTANCE).host == "host-a"
    audit = db.list_audit(limit=10)
    assert any(a.outcome == "refused" and "PCR 16" in a.detail for a in audit)
    with pytest.raises(exception.HostNotTrusted):
        coord.check_destination(INSTANCE, "host-b")


def test_begin_reads_the_destination_status_with_its_verdict(env):
    """A TRUSTED answer from the trust checker is not enough: ``begin``
    reads the host's status with its verdict, in one query of its own."""
    coord, db, agents, _, _ = env
    db.revoke_host("host-b")  # FakeTrust still answers TRUSTED
    with pytest.raises(exception.HostNotTrusted,
                       match="host-b is not trusted: host is REVOKED"):
        coord.begin(str(uuid.uuid4()), INSTANCE, "host-a", "host-b")
    assert names(agents) == []
    assert db.get_vtpcm(INSTANCE).migration_id is None


def test_begin_attests_only_a_destination_without_a_fresh_trusted_verdict(env):
    """The gate is one query while the database holds a fresh TRUSTED
    verdict of an APPROVED destination; the trust checker (which attests)
    is asked only otherwise, and its answer is looked up again."""
    coord, db, agents, trust, _ = env
    asked = []
    real = trust.check_fresh

    def check_fresh(host):
        asked.append(host)
        return real(host)
    trust.check_fresh = check_fresh
    mid = str(uuid.uuid4())
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    assert asked == []
    coord.abort(mid, "test")
    db.assign_policy("host-b", "golden")  # its verdict expired (attest again)
    with pytest.raises(exception.HostNotTrusted, match="attest again"):
        coord.begin(str(uuid.uuid4()), INSTANCE, "host-a", "host-b")
    assert asked == ["host-b"]
    assert names(agents) == ["seal", "prepare", "abort_incoming", "abort_outgoing"]


def test_wrong_source_refused(env):
    coord, db, agents, trust, _ = env
    trust.verdicts["host-a"] = FakeVerdict("TRUSTED")
    with pytest.raises(exception.MigrationError) as err:
        coord.begin(str(uuid.uuid4()), INSTANCE, "host-b", "host-a")
    assert "source is not where the vTPCM lives" in str(err.value)
    assert "seal" not in names(agents)


def test_stale_generation_at_source_refused(env):
    coord, db, agents, _, _ = env
    agents.generation = 5  # source agent holds another generation than the authority
    mid = str(uuid.uuid4())
    with pytest.raises(exception.MigrationError) as err:
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert "generation" in str(err.value)
    assert "seal" not in names(agents)
    assert db.get_migration(mid).state == "REFUSED"
    assert db.get_vtpcm(INSTANCE).migration_id is None


def test_a_source_without_the_vtpcm_refuses_the_begin_before_any_claim(env):
    """Review M1: the source agent has no vTPCM of the instance (host
    reinstalled, its association lost). The begin asks it before claiming
    and is refused with nothing claimed; claimed first, the seal's refusal
    left an abort that could never restore the source's copy, the record
    claimed for good."""
    coord, db, agents, _, _ = env

    def missing(*args, **kwargs):
        agents.calls.append(("missing", args[0]))
        raise exception.NotFound(what="vTPCM of instance", key=INSTANCE)
    agents.get = missing
    agents.seal_migration_key = missing
    agents.abort_outgoing = missing
    before = db.get_vtpcm(INSTANCE)
    mid = str(uuid.uuid4())
    with pytest.raises(exception.NotFound):
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    coord.reconcile()
    assert db.get_vtpcm(INSTANCE) == before  # not claimed, unchanged
    assert [c[0] for c in agents.calls].count("missing") == 1  # the get only, no seal


def test_prepare_failure_aborts_and_restores_source(env):
    coord, db, agents, _, _ = env
    agents.fail["prepare"] = exception.SealError(reason="tampered envelope")
    mid = str(uuid.uuid4())
    with pytest.raises(exception.MigrationError) as err:
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert "tampered" in str(err.value)
    assert names(agents) == ["seal", "prepare", "abort_incoming", "abort_outgoing"]
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.migration_id, rec.state) == \
        ("host-a", 0, None, "ACTIVE")
    assert db.get_migration(mid).state == "ABORTED"
    # a new migration may follow
    assert coord.begin(str(uuid.uuid4()), INSTANCE, "host-a", "host-b").state == "PREPARED"


def test_abort_then_commit_refused(env):
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert coord.abort(mid, "libvirt failed").state == "ABORTED"
    with pytest.raises(exception.InvalidTransition):
        coord.commit(mid)
    assert db.get_vtpcm(INSTANCE).host == "host-a"


def test_abort_after_commit_refused(env):
    coord, db, _, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    coord.commit(mid)
    with pytest.raises(exception.InvalidTransition):
        coord.abort(mid, "too late")
    assert db.get_vtpcm(INSTANCE).host == "host-b"


def test_commit_survives_agent_outage_and_reconcile_finishes(env):
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    agents.fail["commit_outgoing"] = exception.ServiceUnreachable(
        service="agent host-a", method="commit_outgoing", reason="timed out")
    with pytest.raises(exception.ServiceUnreachable, match="agent host-a did not answer"):
        coord.commit(mid)
    assert db.get_migration(mid).state == "SHREDDING"
    assert db.get_vtpcm(INSTANCE).host == "host-b"  # the commit point has passed
    assert coord.reconcile() == 1
    assert db.get_migration(mid).state == "COMMITTED"


def test_deadline_aborts_unfinished_migration(env):
    coord, db, agents, _, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert coord.reconcile() == 0
    clock["now"] += datetime.timedelta(seconds=61)
    assert coord.reconcile() == 1
    assert db.get_migration(mid).state == "ABORTED"
    assert names(agents)[-2:] == ["abort_incoming", "abort_outgoing"]
    assert agents.only_if_unused is True  # QEMU may already run on the destination


def test_deadline_abort_that_fails_otherwise_stays_pending(env):
    """A refusal that is not DestinationInUse (here: the plain
    MigrationError of an agent older than it) proves nothing about the
    destination: the abort stays pending, and its retries stay cautious."""
    coord, db, agents, _, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    clock["now"] += datetime.timedelta(seconds=61)
    agents.fail["abort_incoming"] = exception.MigrationError(
        migration_id=mid, reason="the incoming vTPCM already received its state")
    coord.reconcile()
    rec = db.get_migration(mid)
    assert (rec.state, rec.error) == ("ABORTING", "deadline passed")
    assert "abort_outgoing" not in names(agents)  # the source is not touched
    coord.reconcile()  # the retry keeps the deadline's caution
    assert agents.only_if_unused is True and db.get_migration(mid).state == "ABORTED"


def test_begin_is_idempotent_and_ids_cannot_be_reused(env):
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    assert names(agents).count("seal") == 1
    with pytest.raises(exception.MigrationError):
        coord.begin(mid, str(uuid.uuid4()), "host-a", "host-b")


def test_second_migration_while_one_runs_refused(env):
    coord, _, agents, _, _ = env
    coord.begin(str(uuid.uuid4()), INSTANCE, "host-a", "host-b")
    with pytest.raises(exception.MigrationError):
        coord.begin(str(uuid.uuid4()), INSTANCE, "host-a", "host-b")
    assert names(agents).count("seal") == 1


def test_loser_of_a_begin_race_is_refused_without_agent_calls(env, monkeypatch):
    coord, db, agents, _, _ = env
    real = db.begin_view
    other = str(uuid.uuid4())

    def read_then_lose(migration_id, instance_uuid):  # another worker claims right after
        view = real(migration_id, instance_uuid)
        rec = view.vtpcm
        assert db.set_vtpcm_state(instance_uuid, rec.generation, "MIGRATING",
                                  expected_state=rec.state, migration_id=other,
                                  expected_migration_id=None)
        return view

    monkeypatch.setattr(db, "begin_view", read_then_lose)
    mid = str(uuid.uuid4())
    with pytest.raises(exception.MigrationError) as err:
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert "another migration holds the vTPCM" in str(err.value)
    assert db.get_migration(mid).state == "REFUSED"
    assert db.get_vtpcm(INSTANCE).migration_id == other  # the winner's claim stays
    assert names(agents) == []


def test_an_engine_dying_while_it_records_a_begin_leaves_no_claim(env):
    """Found under load (tests/functional/engine/test_load.py): the claim
    and the migration record were two transactions, and an engine killed
    between them left the vTPCM held by a migration that never existed:
    its caller's abort found nothing, no reconcile or deadline released it,
    every later begin was refused. Now one transaction: nothing or both."""
    coord, db, agents, _, _ = env

    def die_at_the_insert(session, flush_context, instances):
        if any(isinstance(row, models.Migration) for row in session.new):
            raise SystemExit("engine killed")  # the process goes, its transaction too

    sqlalchemy.event.listen(Session, "before_flush", die_at_the_insert)
    mid = str(uuid.uuid4())
    try:
        with pytest.raises(SystemExit, match="engine killed"):
            coord.begin(mid, INSTANCE, "host-a", "host-b")
    finally:
        sqlalchemy.event.remove(Session, "before_flush", die_at_the_insert)
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.state, rec.migration_id) == ("STOPPED", None)
    with pytest.raises(exception.NotFound):
        db.get_migration(mid)
    # and the next migration of the vTPCM goes ahead
    assert coord.begin(str(uuid.uuid4()), INSTANCE, "host-a", "host-b").state == "PREPARED"


def test_restore_releases_only_its_own_claim(env):
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    other = str(uuid.uuid4())
    # as if a later migration held the record when this one's abort runs
    assert db.set_vtpcm_state(INSTANCE, 0, "MIGRATING", expected_state="MIGRATING",
                              migration_id=other, expected_migration_id=mid)
    coord.abort(mid, "rolled back")
    assert db.get_vtpcm(INSTANCE).migration_id == other


def test_a_second_create_reaches_no_agent(env):
    """The record is reserved before any agent is asked: a VM never gets two
    vTPCMs, not even from two creates for different hosts."""
    coord, db, agents, _, _ = env
    before = list(agents.calls)
    with pytest.raises(exception.AlreadyExists):
        coord.create_vtpcm(INSTANCE, "host-b")
    assert agents.calls == before
    assert db.get_vtpcm(INSTANCE).host == "host-a"


def test_a_refused_create_frees_the_reservation(env):
    coord, db, agents, _, _ = env
    other = str(uuid.uuid4())
    agents.fail["create"] = exception.InvalidInput(reason="no room")
    with pytest.raises(exception.InvalidInput):
        coord.create_vtpcm(other, "host-b")
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(other)
    rec = coord.create_vtpcm(other, "host-b")
    assert (rec.host, rec.state, rec.generation) == ("host-b", "STOPPED", 0)
    assert not rec.vtpcm_id.startswith(coordinator.RESERVED_PREFIX)


def test_a_lost_create_answer_keeps_the_reservation_until_destroyed(env):
    coord, db, agents, trust, clock = env
    other = str(uuid.uuid4())
    agents.fail["create"] = exception.ServiceUnreachable(
        service="agent", method="create", reason="timeout")
    with pytest.raises(exception.ServiceUnreachable):
        coord.create_vtpcm(other, "host-b")
    assert db.get_vtpcm(other).state == "CREATING"
    with pytest.raises(exception.AlreadyExists):
        coord.create_vtpcm(other, "host-a")  # maybe it exists on host-b
    assert db.get_vtpcm(other).vtpcm_id.startswith(coordinator.RESERVED_PREFIX)
    trust.verdicts["host-a"] = FakeVerdict("TRUSTED")
    with pytest.raises(exception.MigrationError, match="creation is unfinished"):
        coord.begin(str(uuid.uuid4()), other, "host-b", "host-a")
    # The agent knows nothing, but the signed create may still be queued for
    # it: the reservation stays until that command has expired.
    agents.fail["destroy"] = exception.NotFound(what="vTPCM", key=other)
    with pytest.raises(exception.VTPCMBusy, match="may still reach host host-b"):
        coord.destroy_vtpcm(other)
    assert db.get_vtpcm(other).state == "CREATING"
    clock["now"] += datetime.timedelta(seconds=coordinator.COMMAND_LIFETIME + 1)
    agents.fail["destroy"] = exception.NotFound(what="vTPCM", key=other)
    coord.destroy_vtpcm(other)
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(other)


def test_destroy_only_by_the_holder_and_never_during_a_migration(env):
    coord, db, agents, _, _ = env
    with pytest.raises(exception.CommandRefused, match="lives on host-a, not on host-b"):
        coord.destroy_vtpcm(INSTANCE, requested_by="host-b")
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    with pytest.raises(exception.MigrationError, match="migrating"):
        coord.destroy_vtpcm(INSTANCE, requested_by="host-a")
    coord.commit(mid)
    with pytest.raises(exception.CommandRefused, match="lives on host-b"):
        coord.destroy_vtpcm(INSTANCE, requested_by="host-a")  # the old holder
    coord.destroy_vtpcm(INSTANCE, requested_by="host-b")
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)


def _audited(db, event):
    return [(a.outcome, a.host) for a in db.list_audit(limit=100) if a.event == event]


def test_start_and_stop_go_to_the_holder_and_are_audited(env):
    coord, db, agents, _, _ = env
    agents.calls.clear()
    host, info = coord.start_vtpcm(INSTANCE, requested_by="host-a")
    assert (host, info.state, info.running) == ("host-a", "ACTIVE", True)
    host, info = coord.stop_vtpcm(INSTANCE, requested_by="host-a")
    assert (host, info.state, info.running) == ("host-a", "STOPPED", False)
    assert agents.calls == [("get", "host-a"), ("start", "host-a"), ("stop", "host-a")]
    assert _audited(db, "vtpcm.start") == [("running", "host-a")]
    assert _audited(db, "vtpcm.stop") == [("stopped", "host-a")]


def test_start_and_stop_only_by_the_holder_and_never_during_a_migration(env):
    coord, db, agents, _, _ = env
    agents.calls.clear()
    for power in (coord.start_vtpcm, coord.stop_vtpcm):
        with pytest.raises(exception.CommandRefused, match="lives on host-a, not on host-b"):
            power(INSTANCE, requested_by="host-b")
    assert agents.calls == []
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    agents.calls.clear()
    for power in (coord.start_vtpcm, coord.stop_vtpcm):
        with pytest.raises(exception.MigrationError, match="migrating"):
            power(INSTANCE, requested_by="host-a")
    assert agents.calls == []
    coord.commit(mid)
    with pytest.raises(exception.CommandRefused, match="lives on host-b"):
        coord.start_vtpcm(INSTANCE, requested_by="host-a")  # the old holder
    agents.generation = 1
    assert coord.start_vtpcm(INSTANCE, requested_by="host-b")[0] == "host-b"


def test_start_refuses_a_generation_other_than_the_authoritative_one(env):
    coord, db, agents, _, _ = env
    agents.generation = 7  # e.g. an agent database restored from an old backup
    agents.calls.clear()
    with pytest.raises(exception.GenerationMismatch, match="generation 7 refused"):
        coord.start_vtpcm(INSTANCE, requested_by="host-a")
    assert agents.calls == [("get", "host-a")]
    assert _audited(db, "vtpcm.start") == [("refused", "host-a")]


def test_an_agent_refusal_of_start_or_stop_is_audited(env):
    coord, db, agents, _, _ = env
    agents.fail["stop"] = exception.InvalidTransition(
        what="vTPCM of instance", key=INSTANCE, current="MIGRATING_IN", target="STOPPED")
    with pytest.raises(exception.InvalidTransition):
        coord.stop_vtpcm(INSTANCE, requested_by="host-a")
    assert _audited(db, "vtpcm.stop") == [("refused", "host-a")]


def test_no_start_or_stop_while_created_or_destroyed(env):
    coord, db, agents, _, _ = env
    other = str(uuid.uuid4())
    agents.fail["create"] = exception.ServiceUnreachable(
        service="agent", method="create", reason="timeout")
    with pytest.raises(exception.ServiceUnreachable):
        coord.create_vtpcm(other, "host-a")
    agents.calls.clear()
    with pytest.raises(exception.VTPCMBusy, match="creation is unfinished"):
        coord.start_vtpcm(other, requested_by="host-a")
    agents.fail["destroy"] = exception.ServiceUnreachable(
        service="agent", method="destroy", reason="timeout")
    with pytest.raises(exception.ServiceUnreachable):
        coord.destroy_vtpcm(INSTANCE, requested_by="host-a")
    agents.calls.clear()
    with pytest.raises(exception.VTPCMBusy, match="destruction is unfinished"):
        coord.stop_vtpcm(INSTANCE, requested_by="host-a")
    assert agents.calls == []
    with pytest.raises(exception.NotFound):
        coord.start_vtpcm(str(uuid.uuid4()), requested_by="host-a")


def test_a_failed_agent_destroy_leaves_the_record_destroying_and_unmovable(env):
    coord, db, agents, trust, _ = env
    agents.fail["destroy"] = exception.ServiceUnreachable(
        service="agent", method="destroy", reason="timeout")
    with pytest.raises(exception.ServiceUnreachable):
        coord.destroy_vtpcm(INSTANCE, requested_by="host-a")
    assert db.get_vtpcm(INSTANCE).state == "DESTROYING"
    with pytest.raises(exception.MigrationError, match="being destroyed"):
        coord.begin(str(uuid.uuid4()), INSTANCE, "host-a", "host-b")
    coord.destroy_vtpcm(INSTANCE, requested_by="host-a")  # the retry finishes it
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INSTANCE)


def test_commit_records_the_destination_vtpcm_id(env):
    coord, db, agents, _, _ = env
    first = db.get_vtpcm(INSTANCE).vtpcm_id
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    coord.commit(mid)
    rec = db.get_vtpcm(INSTANCE)
    assert rec.host == "host-b" and rec.vtpcm_id != first
    assert ("get", "host-b") in agents.calls


# --- a commit lost after the switchover (the deadline finds the destination used) ---

def _switched_over(agents, mid, source_running=False):
    """The guest runs on host-b: its incoming vTPCM holds the state (the
    deadline's destroy is refused) and runs; the source's swtpm stopped
    when libvirt ended the source QEMU (unless ``source_running``)."""
    agents.fail["abort_incoming"] = exception.DestinationInUse(
        migration_id=mid, reason="the incoming vTPCM already received its state; "
                                 "refusing to destroy it on a timeout")
    agents.held["host-a"] = ("MIGRATING_OUT", source_running, mid)
    agents.held["host-b"] = ("MIGRATING_IN", True, mid)


def _committed_to_b(db, agents, mid):
    assert db.get_migration(mid).state == "COMMITTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == \
        ("host-b", 1, "ACTIVE", None)
    assert names(agents)[-2:] == ["commit_incoming", "commit_outgoing"]
    assert agents.calls[-1] == ("commit_outgoing", "host-a")  # the old copy is shredded


def test_a_commit_lost_after_the_switchover_waits_in_doubt_for_the_sources_commit(env):
    """post_live_migration's commit never reached the engine. At the
    deadline the destination refuses to destroy the state it received: the
    migration is in doubt. The agents say the guest left the source, but
    their answers are not authenticated: nothing moves until the source's
    signed commit arrives (or an abort)."""
    coord, db, agents, _, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    _switched_over(agents, mid)
    clock["now"] += datetime.timedelta(seconds=61)
    for _ in range(2):
        coord.reconcile()
        assert agents.only_if_unused is True
        assert db.get_migration(mid).state == "IN_DOUBT"
    assert "commit_outgoing" not in names(agents) and "abort_outgoing" not in names(agents)
    with pytest.raises(exception.MigrationError,
                       match="only the source may pass the commit point"):
        coord.commit(mid, requested_by="host-b")
    assert coord.commit(mid, requested_by="host-a").state == "COMMITTED"
    _committed_to_b(db, agents, mid)
    assert [(o, d) for o, d in _audited_details(db, mid)] == [
        ("accepted", ""),
        ("aborting", "deadline passed"),
        ("in doubt", "vTPCM migration %s: the destination keeps its vTPCM: the incoming "
                     "vTPCM already received its state; refusing to destroy it on a "
                     "timeout" % mid),
        ("refused", "signed by host-b, not the source, before the commit point"),
        ("commit point passed", "")]
    # the Nova driver's late retry of the commit is a success, from either host
    assert coord.commit(mid).state == "COMMITTED"
    assert coord.commit(mid, requested_by="host-b").state == "COMMITTED"
    assert names(agents).count("commit_outgoing") == 1


def _audited_details(db, mid):
    return [(a.outcome, a.detail) for a in reversed(db.list_audit(limit=100))
            if a.migration_id == mid]


def test_a_migration_in_doubt_waits_for_a_commit_while_the_source_runs(env):
    """Same, but the source's swtpm still runs (libvirt had not finished):
    reconcile does not guess; the commit that arrives later settles it."""
    coord, db, agents, _, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    _switched_over(agents, mid, source_running=True)
    clock["now"] += datetime.timedelta(seconds=61)
    for _ in range(2):
        coord.reconcile()
        assert db.get_migration(mid).state == "IN_DOUBT"
        rec = db.get_vtpcm(INSTANCE)
        assert (rec.host, rec.generation, rec.migration_id) == ("host-a", 0, mid)
    assert "commit_outgoing" not in names(agents) and "abort_outgoing" not in names(agents)
    assert coord.commit(mid).state == "COMMITTED"
    _committed_to_b(db, agents, mid)


def test_a_commit_while_the_deadline_abort_is_unanswered_settles_it_first(env):
    """The destination did not answer the deadline's destroy (ABORTING);
    the commit retries that step, learns the destination is in use, and
    passes the commit point instead of an illegal ABORTING -> commit."""
    coord, db, agents, _, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    clock["now"] += datetime.timedelta(seconds=61)
    agents.fail["abort_incoming"] = exception.ServiceUnreachable(
        service="vtpcm-agent.host-b", method="abort_incoming", reason="MessagingTimeout")
    coord.reconcile()
    assert db.get_migration(mid).state == "ABORTING"
    agents.fail["abort_incoming"] = exception.ServiceUnreachable(
        service="vtpcm-agent.host-b", method="abort_incoming", reason="timeout")
    with pytest.raises(exception.ServiceUnreachable):  # still unreachable: no guess
        coord.commit(mid)
    assert db.get_migration(mid).state == "ABORTING"
    _switched_over(agents, mid, source_running=True)
    assert coord.commit(mid).state == "COMMITTED"
    _committed_to_b(db, agents, mid)


def test_a_commit_after_a_deadline_abort_of_an_unused_destination_is_refused(env):
    coord, db, agents, _, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    clock["now"] += datetime.timedelta(seconds=61)
    agents.fail["abort_incoming"] = exception.ServiceUnreachable(
        service="vtpcm-agent.host-b", method="abort_incoming", reason="timeout")
    coord.reconcile()
    with pytest.raises(exception.InvalidTransition,
                       match="from ABORTED to CommitRequested"):
        coord.commit(mid)  # the retried destroy went through: nothing arrived there
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == \
        ("host-a", 0, "ACTIVE", None)


def test_an_abort_in_doubt_discards_the_destination_and_restores_the_source(env):
    """Nova rolled back after the destination received the state (QEMU
    failed late): the guest runs on the source, which gets its vTPCM back."""
    coord, db, agents, _, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    _switched_over(agents, mid, source_running=True)
    clock["now"] += datetime.timedelta(seconds=61)
    coord.reconcile()
    assert db.get_migration(mid).state == "IN_DOUBT"
    agents.fail["abort_incoming"] = exception.ServiceUnreachable(
        service="vtpcm-agent.host-b", method="abort_incoming", reason="timeout")
    with pytest.raises(exception.ServiceUnreachable):
        coord.abort(mid, "rolled back by Nova at the source")
    assert db.get_migration(mid).state == "DISCARDING"
    coord.reconcile()  # the retry keeps the explicit abort's word
    assert agents.only_if_unused is False
    assert db.get_migration(mid).state == "ABORTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == \
        ("host-a", 0, "ACTIVE", None)
    with pytest.raises(exception.InvalidTransition, match="from ABORTED"):
        coord.commit(mid)


def test_agent_answers_never_refuse_an_abort_in_doubt(env):
    """An abort signed by one of the two hosts (Nova rolled back) settles a
    migration in doubt even when the agents claim a switchover: a forged
    answer must not be able to keep it, nor to commit it."""
    coord, db, agents, _, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    _switched_over(agents, mid, source_running=True)
    clock["now"] += datetime.timedelta(seconds=61)
    coord.reconcile()
    assert db.get_migration(mid).state == "IN_DOUBT"
    agents.held["host-a"] = ("MIGRATING_OUT", False, mid)  # "libvirt ended the source QEMU"
    assert coord.abort(mid, "rolled back by Nova at the source").state == "ABORTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == \
        ("host-a", 0, "ACTIVE", None)
    assert "commit_outgoing" not in names(agents)


def test_forged_switchover_answers_never_let_the_destination_commit(env):
    """Review finding: with the destination allowed to sign commit on the
    agents' word, a compromised destination (or a broker client forging the
    source agent's answer) shredded a source the guest still ran on. Before
    the commit point only the source's signed commit counts."""
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    agents.held["host-a"] = ("MIGRATING_OUT", False, mid)  # forged: "source stopped"
    agents.held["host-b"] = ("MIGRATING_IN", True, mid)
    with pytest.raises(exception.MigrationError,
                       match=r"only the source may pass the commit point \(migration is "
                             r"PREPARED\)"):
        coord.commit(mid, requested_by="host-b")
    assert db.get_migration(mid).state == "PREPARED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation) == ("host-a", 0)
    assert "commit_outgoing" not in names(agents)
    assert ("refused", "signed by host-b, not the source, before the commit point") in \
        _audited_details(db, mid)
    assert coord.commit(mid, requested_by="host-a").state == "COMMITTED"
    _committed_to_b(db, agents, mid)


def test_begin_with_the_id_of_a_finished_migration_is_refused(env):
    """A begin retried with the id of a migration that already ended must
    not be answered as if it had just prepared the destination."""
    coord, db, agents, trust, _ = env
    aborted = str(uuid.uuid4())
    coord.begin(aborted, INSTANCE, "host-a", "host-b")
    coord.abort(aborted, "libvirt failed")
    done = str(uuid.uuid4())
    coord.begin(done, INSTANCE, "host-a", "host-b")
    coord.commit(done)
    agents.generation = 1
    refused = str(uuid.uuid4())
    trust.verdicts["host-a"] = FakeVerdict("UNTRUSTED", "PCR 16 differs")
    with pytest.raises(exception.HostNotTrusted):
        coord.begin(refused, INSTANCE, "host-b", "host-a")
    trust.verdicts["host-a"] = FakeVerdict("TRUSTED")
    seals = names(agents).count("seal")
    for mid, source, dest, state in ((done, "host-a", "host-b", "COMMITTED"),
                                     (aborted, "host-a", "host-b", "ABORTED"),
                                     (refused, "host-b", "host-a", "REFUSED")):
        with pytest.raises(exception.MigrationError) as err:
            coord.begin(mid, INSTANCE, source, dest)
        assert err.value.kwargs["reason"] == (
            "this migration already ended (%s); a new migration needs a new id" % state)
        assert db.get_migration(mid).state == state
    assert names(agents).count("seal") == seals
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.migration_id) == ("host-b", 1, None)


def test_begin_with_the_id_of_a_migration_past_its_commit_point_is_refused(env):
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    agents.fail["commit_outgoing"] = exception.ServiceUnreachable(
        service="vtpcm-agent.host-a", method="commit_outgoing", reason="timeout")
    with pytest.raises(exception.ServiceUnreachable):
        coord.commit(mid)
    with pytest.raises(exception.MigrationError) as err:
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert err.value.kwargs["reason"] == "migration is SHREDDING"
    # the commit, retried by either host, is a success
    assert coord.commit(mid, requested_by="host-b").state == "COMMITTED"
    assert coord.commit(mid, requested_by="host-a").state == "COMMITTED"
    assert names(agents).count("commit_outgoing") == 2  # the failed try and its retry


@pytest.mark.parametrize(("host", "verdict", "revoke", "reason"), [
    ("host-b", FakeVerdict("UNTRUSTED", "PCR 16 differs"), False, "PCR 16 differs"),
    ("host-b", FakeVerdict("UNKNOWN", "never attested"), False, "never attested"),
    # the checker says TRUSTED, but the engine's own record says REVOKED
    ("host-b", FakeVerdict("TRUSTED"), True, "host is REVOKED"),
])
def test_create_needs_a_fresh_trusted_verdict_of_an_approved_host(env, host, verdict,
                                                                   revoke, reason):
    """A forced boot skips the scheduler filter: the engine itself refuses
    to create a vTPCM on a host it does not trust, before any agent call,
    and audits it."""
    coord, db, agents, trust, _ = env
    trust.verdicts[host] = verdict
    if revoke:
        db.revoke_host(host)
    other = str(uuid.uuid4())
    calls = list(agents.calls)
    with pytest.raises(exception.HostNotTrusted, match="%s is not trusted: %s" % (host, reason)):
        coord.create_vtpcm(other, host)
    assert agents.calls == calls
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(other)
    entry = db.list_audit(limit=1)[0]
    assert (entry.event, entry.outcome, entry.instance) == ("vtpcm.create", "refused", other)


def _unauthenticated(host, method):
    return exception.ReplyNotAuthenticated(host=host, method=method,
                                           reason="signature does not verify")


@pytest.mark.parametrize(("step", "host", "state"), [
    ("commit_incoming", "host-b", "COMMITTING"),
    ("commit_outgoing", "host-a", "SHREDDING"),
])
def test_an_unauthenticated_commit_answer_is_no_step_taken(env, step, host, state):
    """What the RPC client raises for a reply it cannot verify (a broker
    client answering in the agent's place): the step is not done, and the
    migration waits where it was until reconcile gets a real answer."""
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    agents.fail[step] = _unauthenticated(host, step)
    with pytest.raises(exception.ReplyNotAuthenticated):
        coord.commit(mid)
    assert db.get_migration(mid).state == state
    assert coord.reconcile() == 1
    assert db.get_migration(mid).state == "COMMITTED"


def test_an_unauthenticated_answer_to_the_deadline_abort_is_neither_done_nor_in_use(env):
    """A forged abort success or a forged DestinationInUse both arrive as
    ReplyNotAuthenticated: the migration neither ends ABORTED (the source
    restored while the destination may hold the key) nor goes IN_DOUBT."""
    coord, db, agents, _, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    clock["now"] += datetime.timedelta(seconds=61)
    agents.fail["abort_incoming"] = _unauthenticated("host-b", "abort_incoming")
    coord.reconcile()
    assert db.get_migration(mid).state == "ABORTING"
    assert "abort_outgoing" not in names(agents)
    assert coord.reconcile() == 1
    assert db.get_migration(mid).state == "ABORTED"


class ReconcileMidCommit(FakeAgents):
    """Another engine worker's reconcile finishes the commit while this
    worker's commit_incoming is on its way (issue 10's third case)."""

    def __init__(self, other):
        super().__init__()
        self.other = other

    def commit_incoming(self, host, context):
        super().commit_incoming(host, context)
        other, self.other = self.other, None
        if other is not None:
            assert other.reconcile() == 1


def test_a_commit_raced_by_another_workers_reconcile_answers_committed(env):
    """Found under load (tests/functional/engine/test_load.py, "state
    changed concurrently" from commits that went through): the commit is
    decided at the commit point, so its caller gets success."""
    coord, db, _, trust, clock = env
    other = Coordinator(db, FakeAgents(), trust, timeout=60, now=lambda: clock["now"])
    raced = ReconcileMidCommit(other)
    worker = Coordinator(db, raced, trust, timeout=60, now=lambda: clock["now"])
    mid = str(uuid.uuid4())
    assert worker.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    assert worker.commit(mid).state == "COMMITTED"
    assert raced.other is None  # the race happened
    assert ("commit_outgoing", "host-a") in other.agents.calls
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation) == ("host-b", 1)
    points = [a for a in db.list_audit(limit=50)
              if (a.migration_id, a.event, a.outcome)
              == (mid, "migration.commit", "commit point passed")]
    assert len(points) == 1


def test_a_commit_whose_step_fails_without_a_race_still_fails(env):
    """Positive control of the above: with nobody moving the migration, an
    agent's refusal past the commit point is the caller's error, and the
    retry finishes it."""
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    agents.fail["commit_incoming"] = exception.MigrationError(
        migration_id=mid, reason="has not received its state")
    with pytest.raises(exception.MigrationError, match="has not received its state"):
        coord.commit(mid)
    assert db.get_migration(mid).state == "COMMITTING"
    assert coord.commit(mid).state == "COMMITTED"


class ReconcileMidAbort(FakeAgents):
    """Another engine worker's reconcile finishes the abort while this
    worker's destroy of the destination's copy is on its way."""

    def __init__(self, other):
        super().__init__()
        self.other = other

    def abort_incoming(self, host, context, only_if_unused=False):
        super().abort_incoming(host, context, only_if_unused)
        other, self.other = self.other, None
        if other is not None:
            assert other.reconcile() == 1


def test_an_abort_raced_by_another_workers_reconcile_answers_aborted(env):
    """Found in CI (tests/functional/engine/test_worker_leases.py, two
    workers reconciling every second): an abort whose destroy another
    worker's reconcile ran too answered "state changed concurrently
    (expected ABORTING)" for an abort that went through."""
    coord, db, _, trust, clock = env
    other = Coordinator(db, FakeAgents(), trust, timeout=60, now=lambda: clock["now"])
    raced = ReconcileMidAbort(other)
    worker = Coordinator(db, raced, trust, timeout=60, now=lambda: clock["now"])
    mid = str(uuid.uuid4())
    assert worker.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    assert worker.abort(mid, "test done").state == "ABORTED"
    assert raced.other is None  # the race happened
    assert ("abort_outgoing", "host-a") in other.agents.calls
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.migration_id) == ("host-a", None)


def test_an_abort_that_lost_to_a_commit_still_fails(env, monkeypatch):
    """Positive control of the above: a commit that passed the commit
    point between this abort's load and its compare-and-set is not the
    abort's progress; the abort is refused and the commit stands."""
    coord, db, _, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    real = coord._load

    def load_then_commit(migration_id):
        loaded = real(migration_id)
        monkeypatch.setattr(coord, "_load", real)
        coord.commit(migration_id)
        return loaded
    monkeypatch.setattr(coord, "_load", load_then_commit)
    with pytest.raises(exception.MigrationError, match="state changed concurrently"):
        coord.abort(mid, "too late")
    assert db.get_migration(mid).state == "COMMITTED"


def _deadline_worker(db, trust, clock, mid):
    """Another engine worker whose agents see a destination that received
    the state (a deadline's only_if_unused destroy is refused)."""
    agents = FakeAgents()
    _switched_over(agents, mid, source_running=True)
    return Coordinator(db, agents, trust, timeout=60, now=lambda: clock["now"])


def _reconcile_between_load_and_cas(coord, monkeypatch, other):
    real = coord._load

    def load_then_reconcile(migration_id):
        loaded = real(migration_id)
        monkeypatch.setattr(coord, "_load", real)
        other.reconcile()
        return loaded
    monkeypatch.setattr(coord, "_load", load_then_reconcile)


def test_an_abort_after_a_deadline_abort_in_doubt_discards(env):
    """Control of the race below: Nova's abort arriving just after another
    worker's deadline abort left IN_DOUBT drives it on to ABORTED."""
    coord, db, _, trust, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    clock["now"] += datetime.timedelta(seconds=61)
    _deadline_worker(db, trust, clock, mid).reconcile()
    assert db.get_migration(mid).state == "IN_DOUBT"
    assert coord.abort(mid, "rolled back by Nova").state == "ABORTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.state, rec.migration_id) == ("host-a", "ACTIVE", None)


def test_an_abort_racing_a_deadline_abort_into_doubt_still_aborts(env, monkeypatch):
    """Review of the first fix (MEDIUM): Nova's abort lost its PREPARED ->
    ABORTING compare-and-set to another worker's deadline abort, whose
    destination refused the only_if_unused destroy (IN_DOUBT); the abort
    answered that IN_DOUBT record without error and its own word (discard
    the destination, restore the source) was dropped. Now it applies its
    abort to the state it reloads, as in either order without the race."""
    coord, db, _, trust, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    clock["now"] += datetime.timedelta(seconds=61)
    _reconcile_between_load_and_cas(coord, monkeypatch,
                                    _deadline_worker(db, trust, clock, mid))
    assert coord.abort(mid, "resize reverted by Nova").state == "ABORTED"
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.state, rec.migration_id) == ("host-a", "ACTIVE", None)


def test_an_abort_racing_an_unanswered_deadline_abort_destroys_unconditionally(
        env, monkeypatch):
    """Same race, the other worker's deadline destroy unanswered (ABORTING,
    'deadline passed'): the abort settles the deadline's destroy, then its
    own word takes the IN_DOUBT on to ABORTED."""
    coord, db, agents, trust, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    clock["now"] += datetime.timedelta(seconds=61)
    other_agents = FakeAgents()
    other_agents.fail["abort_incoming"] = exception.ServiceUnreachable(
        service="vtpcm-agent.host-b", method="abort_incoming", reason="timeout")
    other = Coordinator(db, other_agents, trust, timeout=60, now=lambda: clock["now"])
    _reconcile_between_load_and_cas(coord, monkeypatch, other)
    _switched_over(agents, mid, source_running=True)
    assert coord.abort(mid, "rolled back by Nova").state == "ABORTED"
    assert ("abort_incoming", "host-b") in agents.calls


class _ReconcileDuringDestroy(FakeAgents):
    """Another worker's reconcile finishes the deadline abort while this
    worker's settle (the deadline destroy's retry) is on its way."""

    def __init__(self, other):
        super().__init__()
        self.other = other

    def abort_incoming(self, host, context, only_if_unused=False):
        super().abort_incoming(host, context, only_if_unused)
        other, self.other = self.other, None
        if other is not None:
            other.reconcile()


def test_the_settle_of_a_deadline_abort_raced_by_reconcile_answers_aborted(env):
    """Review of the first fix (LOW): the settle of an unanswered deadline
    abort lost the same race outside the new handling and answered "state
    changed concurrently (expected ABORTING)" for a migration that aborted."""
    coord, db, agents, trust, clock = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    clock["now"] += datetime.timedelta(seconds=61)
    agents.fail["abort_incoming"] = exception.ServiceUnreachable(
        service="vtpcm-agent.host-b", method="abort_incoming", reason="timeout")
    coord.reconcile()
    assert db.get_migration(mid).state == "ABORTING"
    other = Coordinator(db, FakeAgents(), trust, timeout=60, now=lambda: clock["now"])
    raced = _ReconcileDuringDestroy(other)
    worker = Coordinator(db, raced, trust, timeout=60, now=lambda: clock["now"])
    assert worker.abort(mid, "rolled back by Nova").state == "ABORTED"
    assert raced.other is None  # the race happened


def test_an_engine_dying_right_after_the_commit_point_leaves_it_audited(env, monkeypatch):
    """Found under load: the commit point's audit entry was written after
    the state change, in its own transaction; an engine killed between the
    two left a migration that reconcile committed with no "commit point
    passed" in the audit. Now the entry goes with the state change."""
    coord, db, _, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    real = db.update_migration_state

    def die_after_the_commit_point(*args, **kwargs):
        moved = real(*args, **kwargs)
        if moved and args[2] == "COMMITTING":
            raise SystemExit("engine killed")
        return moved

    monkeypatch.setattr(db, "update_migration_state", die_after_the_commit_point)
    with pytest.raises(SystemExit, match="engine killed"):
        coord.commit(mid)
    monkeypatch.setattr(db, "update_migration_state", real)
    assert db.get_migration(mid).state == "COMMITTING"
    assert coord.reconcile() == 1  # another worker, or this one restarted
    assert db.get_migration(mid).state == "COMMITTED"
    points = [a for a in db.list_audit(limit=50)
              if (a.migration_id, a.event, a.outcome)
              == (mid, "migration.commit", "commit point passed")]
    assert len(points) == 1
    assert [a.outcome for a in db.list_audit(limit=50)
            if (a.migration_id, a.event) == (mid, "migration.begin")] == ["accepted"]


def test_the_commit_point_moves_the_authority_in_its_own_transaction(env, monkeypatch):
    """Issue 11 point 2: the authority's move is written with the
    COMMITTING state (one transaction, one fsync less), not after it: an
    engine killed right after that write leaves the record on the
    destination already, and reconcile's MoveAuthority finds it done."""
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    real = db.update_migration_state

    def die_after_the_commit_point(*args, **kwargs):
        moved = real(*args, **kwargs)
        if moved and args[2] == "COMMITTING":
            raise SystemExit("engine killed")
        return moved

    monkeypatch.setattr(db, "update_migration_state", die_after_the_commit_point)
    with pytest.raises(SystemExit, match="engine killed"):
        coord.commit(mid)
    monkeypatch.setattr(db, "update_migration_state", real)
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.state, rec.migration_id) == \
        ("host-b", 1, "ACTIVE", None)
    assert "commit_incoming" not in names(agents)
    assert coord.reconcile() == 1
    assert db.get_migration(mid).state == "COMMITTED"
    assert db.get_vtpcm(INSTANCE).generation == 1


# --- the source's shred after the commit's answer (engine API 1.11) -----------------

class HeldJobs:
    """Stands for the coordinator's background executor: jobs run only when
    the test says, so it sees the state between the answer and the shred."""

    def __init__(self):
        self.jobs = []

    def submit(self, fn, *args):
        self.jobs.append((fn, args))
        return True

    def run(self):
        jobs, self.jobs = self.jobs, []
        for fn, args in jobs:
            fn(*args)


def test_a_commit_with_shred_later_answers_before_the_source_is_shredded(env):
    coord, db, agents, _, _ = env
    coord._after_commit = jobs = HeldJobs()
    first = db.get_vtpcm(INSTANCE).vtpcm_id
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert coord.commit(mid, shred_later=True).state == "SHREDDING"
    # durable before the answer: the authority on host-b, its copy committed
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.generation, rec.migration_id) == ("host-b", 1, None)
    assert names(agents) == ["seal", "prepare", "commit_incoming"]
    assert ("get", "host-b") not in agents.calls  # the id bookkeeping waits too
    jobs.run()
    assert db.get_migration(mid).state == "COMMITTED"
    assert names(agents)[-1] == "commit_outgoing" and agents.calls[-1][1] == "host-a"
    assert db.get_vtpcm(INSTANCE).vtpcm_id != first
    # a retried commit is a no-op success
    assert coord.commit(mid, shred_later=True).state == "COMMITTED"
    assert names(agents).count("commit_outgoing") == 1


def test_a_begin_shreds_the_copy_an_earlier_commit_left_first(env):
    """The vTPCM goes back to host-a before the background shred of its old
    copy there ran: the begin shreds it before sealing, so host-a is clean
    when it receives the vTPCM again."""
    coord, db, agents, _, _ = env
    coord._after_commit = HeldJobs()  # never run
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    coord.commit(mid, shred_later=True)
    agents.generation = 1
    back = str(uuid.uuid4())
    assert coord.begin(back, INSTANCE, "host-b", "host-a").state == "PREPARED"
    assert db.get_migration(mid).state == "COMMITTED"
    assert names(agents)[2:] == ["commit_incoming", "commit_outgoing", "seal", "prepare"]


def test_a_begin_elsewhere_does_not_wait_for_the_shred_an_earlier_commit_left(env, monkeypatch):
    """The old source is not the new destination: the begin does not wait
    for (nor run) that shred; the background job or reconcile does it."""
    coord, db, agents, _, _ = env
    coord._after_commit = jobs = HeldJobs()
    db.enroll_host("host-c", ak_public=b"ak-c", ak_name=b"n-c", kem_public=b"kem-of-c",
                   kem_name=b"kc", ek_certificate=None, approved=True)
    db.assign_policy("host-c", "golden")
    trusted_in_db(db, "host-c")
    env[3].verdicts["host-c"] = FakeVerdict("TRUSTED")
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    coord.commit(mid, shred_later=True)
    agents.generation = 1
    assert coord.begin(str(uuid.uuid4()), INSTANCE, "host-b", "host-c").state == "PREPARED"
    assert "commit_outgoing" not in names(agents)
    assert db.get_migration(mid).state == "SHREDDING"
    jobs.run()
    assert db.get_migration(mid).state == "COMMITTED"


def test_a_failed_shred_after_the_answer_is_finished_by_reconcile(env):
    coord, db, agents, _, _ = env
    coord._after_commit = jobs = HeldJobs()
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert coord.commit(mid, shred_later=True).state == "SHREDDING"
    agents.fail["commit_outgoing"] = exception.ServiceUnreachable(
        service="agent host-a", method="commit_outgoing", reason="timed out")
    jobs.run()  # logged, not raised: nobody waits for it
    assert db.get_migration(mid).state == "SHREDDING"
    assert coord.reconcile() == 1
    assert db.get_migration(mid).state == "COMMITTED"


def test_a_commit_without_shred_later_still_answers_committed(env):
    """A driver older than engine API 1.11 waits for the shred, as before."""
    coord, db, agents, _, _ = env
    coord._after_commit = jobs = HeldJobs()
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert coord.commit(mid).state == "COMMITTED"
    assert jobs.jobs == [] and names(agents)[-1] == "commit_outgoing"


# --- tombstones and leases (issue 10 review) ----------------------------------------

def test_abort_of_an_unrecorded_id_leaves_a_tombstone_that_refuses_the_late_begin(env):
    """The caller's begin timed out before the engine wrote its record: its
    abort, naming the instance, records the migration ABORTED; the begin,
    arriving later, is refused and moves nothing."""
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    tomb = coord.abort(mid, "begin failed: timed out", instance_uuid=INSTANCE,
                       requested_by="host-a")
    assert (tomb.state, tomb.error, tomb.source) == (
        "ABORTED", coordinator.TOMBSTONE_REASON, "host-a")
    with pytest.raises(exception.MigrationError,
                       match="its caller aborted it before the engine recorded its begin"):
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert names(agents) == []
    assert db.get_vtpcm(INSTANCE).migration_id is None
    outcomes = [(a.event, a.outcome) for a in db.list_audit(limit=10) if a.migration_id == mid]
    assert ("migration.abort", "tombstone") in outcomes
    assert ("migration.begin", "refused") in outcomes
    # an abort retried after the tombstone is a no-op success
    assert coord.abort(mid, "again", instance_uuid=INSTANCE,
                       requested_by="host-a").state == "ABORTED"


def test_a_tombstone_written_while_the_begin_attests_refuses_it(env):
    coord, db, agents, trust, _ = env
    mid = str(uuid.uuid4())
    real = trust.check_fresh
    db.assign_policy("host-b", "golden")  # its verdict expired: begin attests

    def slow_attestation(host):  # the caller gives up and aborts meanwhile
        coord.abort(mid, "begin timed out", instance_uuid=INSTANCE, requested_by="host-a")
        trust.verdicts[host] = FakeVerdict("TRUSTED")
        return real(host)
    trust.check_fresh = slow_attestation
    with pytest.raises(exception.MigrationError, match="aborted it before the engine"):
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert names(agents) == []
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.state, rec.migration_id) == ("STOPPED", None)  # the claim rolled back
    assert db.get_migration(mid).state == "ABORTED"


def test_only_the_holder_may_tombstone_and_only_with_the_instance(env):
    coord, db, _, _, _ = env
    mid = str(uuid.uuid4())
    with pytest.raises(exception.CommandRefused, match="not host-a, the holder"):
        coord.abort(mid, "x", instance_uuid=INSTANCE, requested_by="host-b")
    with pytest.raises(exception.NotFound):
        coord.abort(mid, "x")
    with pytest.raises(exception.NotFound):
        db.get_migration(mid)


def _holder_of_other(coord, db, trust):
    """host-c, holding only instance OTHER's vTPCM."""
    db.enroll_host("host-c", ak_public=b"ak-c", ak_name=b"n-c", kem_public=b"kem-of-c",
                   kem_name=b"khost-c", ek_certificate=None, approved=True)
    db.assign_policy("host-c", "golden")
    trusted_in_db(db, "host-c")
    trust.verdicts["host-c"] = FakeVerdict("TRUSTED")
    other = str(uuid.uuid4())
    coord.create_vtpcm(other, "host-c")
    return other


def _begin_records_at_the_tombstone(db, mid):
    """The real begin of ``mid`` (INSTANCE, host-a -> host-b) records
    itself between the abort's lookup and its tombstone insert."""
    real = db.get_vtpcm
    done = []

    def get_vtpcm(instance):  # what _tombstone reads right before its insert
        if not done:
            done.append(True)
            _recorded_begin(db, mid, "engine-1/other")
        return real(instance)
    db.get_vtpcm = get_vtpcm


def test_an_abort_racing_a_begin_of_another_instance_is_refused(env):
    """host-c, holder of OTHER only, aborts an id naming OTHER; INSTANCE's
    begin records that id just before the tombstone: host-c is neither
    its source nor its destination, so nothing of it is aborted."""
    coord, db, _, trust, _ = env
    other = _holder_of_other(coord, db, trust)
    mid = str(uuid.uuid4())
    _begin_records_at_the_tombstone(db, mid)
    with pytest.raises(exception.CommandRefused,
                       match="signed by host-c; the migration recorded meanwhile is of "
                             "instance %s, host-a -> host-b" % INSTANCE):
        coord.abort(mid, "host-c says so", instance_uuid=other, requested_by="host-c")
    rec = db.get_migration(mid)
    assert (rec.instance_uuid, rec.state, rec.error) == (INSTANCE, "SEALING", None)
    assert ("migration.abort", "refused") in [
        (a.event, a.outcome) for a in db.list_audit(limit=10) if a.migration_id == mid]


def test_an_abort_racing_its_own_begin_aborts_it(env):
    """The holder's abort of its own instance's id, recorded meanwhile by
    its late begin: that migration is aborted (the tombstone's purpose)."""
    coord, db, _, _, _ = env
    mid = str(uuid.uuid4())
    _begin_records_at_the_tombstone(db, mid)
    rec = coord.abort(mid, "begin timed out", instance_uuid=INSTANCE, requested_by="host-a")
    assert (rec.instance_uuid, rec.state) == (INSTANCE, "ABORTED")
    assert rec.error != coordinator.TOMBSTONE_REASON


def test_a_tombstone_of_another_instance_refuses_a_begin_as_a_reused_id(env):
    """A tombstone under an id names its instance; a begin of another
    instance under that id is refused as a reused id, not as aborted by
    its caller, and the tombstone stays the other instance's."""
    coord, db, agents, trust, _ = env
    other = _holder_of_other(coord, db, trust)
    mid = str(uuid.uuid4())
    coord.abort(mid, "squat", instance_uuid=other, requested_by="host-c")
    with pytest.raises(exception.MigrationError,
                       match="used for another instance or hosts"):
        coord.begin(mid, INSTANCE, "host-a", "host-b")
    rec = db.get_migration(mid)
    assert (rec.instance_uuid, rec.state) == (other, "ABORTED")
    assert db.get_vtpcm(INSTANCE).migration_id is None
    assert "seal" not in names(agents)
    # the same, the tombstone written while the begin attests
    mid2 = str(uuid.uuid4())
    real = trust.check_fresh
    db.assign_policy("host-b", "golden")  # its verdict expired: begin attests

    def slow_attestation(host):
        coord.abort(mid2, "squat", instance_uuid=other, requested_by="host-c")
        trust.verdicts[host] = FakeVerdict("TRUSTED")
        return real(host)
    trust.check_fresh = slow_attestation
    with pytest.raises(exception.MigrationError,
                       match="used for another instance or hosts"):
        coord.begin(mid2, INSTANCE, "host-a", "host-b")
    assert (db.get_migration(mid2).instance_uuid, db.get_vtpcm(INSTANCE).migration_id) == (
        other, None)


def _recorded_begin(db, mid, begun_by):
    db.create_migration(mid, INSTANCE, "host-a", "host-b", 0, "SEALING",
                        T0 + datetime.timedelta(hours=3), now=T0, prior_state="STOPPED",
                        begun_by=begun_by)


def test_reconcile_spares_begins_of_live_runs_and_aborts_those_of_gone_ones(env):
    """Two live runs may share a host name; only a run without a live
    lease (by the database's clock) loses its begins."""
    coord, db, _, _, _ = env
    coord.worker = coordinator.worker_id("engine-1")
    other = coordinator.worker_id("engine-1")
    db.register_worker(other, "engine-1", 60)
    mid = str(uuid.uuid4())
    _recorded_begin(db, mid, other)
    coord.reconcile()
    assert db.get_migration(mid).state == "SEALING"
    db.deregister_worker(other)  # its clean stop
    coord.reconcile()
    rec = db.get_migration(mid)
    assert rec.state == "ABORTED"
    assert "holds no live lease" in rec.error


def test_reconcile_reads_an_abandoned_begin_again_before_aborting_it(env, caplog):
    """``_still_begin``: a begin that moved on between reconcile's load and
    its abandonment check (here: its run finished the step) is left alone,
    quietly; one still in a begin state is aborted."""
    coord, db, _, _, _ = env
    coord.worker = coordinator.worker_id("engine-1")
    mid = str(uuid.uuid4())
    _recorded_begin(db, mid, "engine-1/gone")  # a run holding no lease
    real_live = db.live_workers

    def live_workers():  # asked after the load, before the abort
        db.update_migration_state(mid, "SEALING", "PREPARING")
        db.update_migration_state(mid, "PREPARING", "PREPARED")
        return real_live()
    db.live_workers = live_workers
    caplog.set_level("WARNING")
    coord.reconcile()
    assert db.get_migration(mid).state == "PREPARED"
    assert "aborting it" not in caplog.text
    assert "Reconcile of migration %s" % mid not in caplog.text  # no failed CAS
    db.live_workers = real_live
    left = str(uuid.uuid4())
    _recorded_begin(db, left, "engine-1/gone")
    coord.reconcile()
    assert db.get_migration(left).state == "ABORTED"


def test_reconcile_aborts_a_begin_of_this_run_only_once_it_no_longer_runs_it(env):
    coord, db, agents, _, _ = env
    coord.worker = coordinator.worker_id("engine-1")
    db.register_worker(coord.worker, "engine-1", 60)
    mid = str(uuid.uuid4())
    seen = []
    real_seal = agents.seal_migration_key

    def seal_during_reconcile(*args, **kwargs):  # a reconcile pass mid-step
        coord.reconcile()
        seen.append(db.get_migration(mid).state)
        return real_seal(*args, **kwargs)
    agents.seal_migration_key = seal_during_reconcile
    assert coord.begin(mid, INSTANCE, "host-a", "host-b").state == "PREPARED"
    assert seen == ["SEALING"]
    coord.abort(mid, "done")
    # a begin this run recorded but whose thread is gone (a database error)
    left = str(uuid.uuid4())
    _recorded_begin(db, left, coord.worker)
    coord.reconcile()
    assert "recorded it and no longer runs it" in db.get_migration(left).error


# --- earlier migrations still unfinished at a begin (review M2, M3, L1, L2) ---------

def test_a_begin_back_to_a_host_whose_old_shred_failed_is_refused(env):
    """Review M2: the shred of the vTPCM's old copy on the host it is about
    to go back to fails: the begin is refused (retryable) before any claim,
    and goes on once reconcile has finished that shred."""
    coord, db, agents, _, _ = env
    coord._after_commit = HeldJobs()  # never run
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert coord.commit(mid, shred_later=True).state == "SHREDDING"
    agents.generation = 1
    agents.fail["commit_outgoing"] = exception.ServiceUnreachable(
        service="agent host-a", method="commit_outgoing", reason="timed out")
    back = str(uuid.uuid4())
    with pytest.raises(exception.MigrationError) as err:
        coord.begin(back, INSTANCE, "host-b", "host-a")
    assert mid in str(err.value) and "retry" in str(err.value)
    assert db.get_migration(mid).state == "SHREDDING"
    assert "seal" not in names(agents)[2:] and "prepare" not in names(agents)[2:]
    rec = db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.state, rec.migration_id) == ("host-b", "ACTIVE", None)
    with pytest.raises(exception.NotFound):
        db.get_migration(back)  # nothing recorded: the same id can be retried
    assert "commit_outgoing" not in agents.fail  # it failed once only
    assert coord.reconcile() == 1
    assert coord.begin(back, INSTANCE, "host-b", "host-a").state == "PREPARED"


def test_a_begin_back_waits_for_its_old_shred_only_a_short_bound(env, monkeypatch):
    """Review M2: a shred that hangs costs the begin PRE_SHRED_WAIT, not a
    full RPC timeout; the begin is refused, the shred runs on."""
    coord, db, agents, _, _ = env
    coord._after_commit = HeldJobs()
    monkeypatch.setattr(coordinator, "PRE_SHRED_WAIT", 0.2)
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    coord.commit(mid, shred_later=True)
    agents.generation = 1
    release = threading.Event()
    real = agents.commit_outgoing

    def hangs(host, context):
        release.wait(10)
        return real(host, context)
    agents.commit_outgoing = hangs
    started = time.monotonic()
    with pytest.raises(exception.MigrationError, match="unfinished"):
        coord.begin(str(uuid.uuid4()), INSTANCE, "host-b", "host-a")
    assert time.monotonic() - started < 5
    release.set()


def test_a_begin_while_an_earlier_migration_is_committing_is_refused(env, monkeypatch):
    """Review M3: a worker killed between the commit point and the
    destination's commit leaves the migration COMMITTING with the record on
    its destination, held by no migration: a new begin is refused
    (retryable) instead of claiming it, until reconcile finished the commit."""
    coord, db, agents, _, _ = env
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    agents.fail["commit_incoming"] = exception.ServiceUnreachable(
        service="agent host-b", method="commit_incoming", reason="timed out")
    with pytest.raises(exception.ServiceUnreachable, match="commit_incoming"):
        coord.commit(mid)
    assert db.get_migration(mid).state == "COMMITTING"
    agents.generation = 1
    later = str(uuid.uuid4())
    with pytest.raises(exception.MigrationError) as err:
        coord.begin(later, INSTANCE, "host-b", "host-a")
    assert "COMMITTING" in str(err.value) and mid in str(err.value)
    assert names(agents).count("seal") == 1
    coord.reconcile()  # the agent answers again
    assert db.get_migration(mid).state == "COMMITTED"
    assert coord.begin(later, INSTANCE, "host-b", "host-a").state == "PREPARED"


def test_reconcile_records_the_destinations_id_a_shred_later_commit_left(env):
    """Review L1: the worker dies after answering SHREDDING, before its
    background job: reconcile's shred records the destination's vTPCM id."""
    coord, db, agents, _, _ = env
    coord._after_commit = HeldJobs()  # the worker dies: the job never runs
    first = db.get_vtpcm(INSTANCE).vtpcm_id
    mid = str(uuid.uuid4())
    coord.begin(mid, INSTANCE, "host-a", "host-b")
    assert coord.commit(mid, shred_later=True).state == "SHREDDING"
    assert coord.reconcile() == 1
    assert db.get_migration(mid).state == "COMMITTED"
    assert db.get_vtpcm(INSTANCE).vtpcm_id not in (None, first)


def test_background_jobs_are_bounded_and_stop():
    """Review L2: a full queue refuses the job (left to reconcile); stop
    drops the queued ones, waits for the running one at most its bound,
    and refuses new ones; the threads are daemons."""
    jobs = coordinator.BackgroundJobs(workers=1, limit=1)
    gate, ran = threading.Event(), []
    assert jobs.submit(gate.wait, 10)
    deadline = time.monotonic() + 5
    while jobs._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)  # the worker took the first job
    assert jobs.submit(ran.append, 1)
    assert not jobs.submit(ran.append, 2)  # full
    assert all(t.daemon for t in jobs._threads)
    started = time.monotonic()
    jobs.stop(timeout=0.2)
    assert time.monotonic() - started < 2
    assert not jobs.submit(ran.append, 3)
    gate.set()
    jobs._threads[0].join(5)
    assert ran == []  # the queued job was dropped, not run
