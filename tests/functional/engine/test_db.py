"""Engine database against real SQLite files and the local PostgreSQL."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable

import pytest
import sqlalchemy

from vtpcm_common import exception
from vtpcm_nova.engine import verifier
from vtpcm_nova.engine.db import api, migration
from vtpcm_nova.engine.db.models import HostStatus

pytestmark = pytest.mark.functional

T0 = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.UTC)
MIN = datetime.timedelta(minutes=1)
INST = "6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11"
MIG = "0b8e7a52-9d2c-4c55-8a6a-1f1a3e2d4c00"

MakeDb = Callable[[], api.Database]


def enroll(db: api.Database, name: str = "cmp1", approved: bool = False) -> api.HostRecord:
    return db.enroll_host(name, ak_public=b"ak-" + name.encode(),
                          ak_name=b"\x00\x0bak-" + name.encode(),
                          kem_public=b"kem", kem_name=b"\x00\x0bkem", approved=approved,
                          now=T0)


def record(db: api.Database, host: str, status: verifier.TrustStatus, reason: str,
            at: datetime.datetime, until: datetime.datetime) -> api.VerdictRecord:
    """Record a verdict as an attestation of the host as it is now would."""
    rec = db.get_host(host)
    policy = db.get_policy(rec.policy_name) if rec.policy_name else None
    basis = api.TrustBasis(host, rec.revision, rec.policy_name,
                           policy.revision if policy else None, at)
    return db.record_attestation(basis, status, reason, until)


def test_schema_revision_and_persistence_across_restart(make_db: MakeDb) -> None:
    db = make_db()
    assert db.schema_revision() == migration.head()
    enroll(db)
    db.put_policy("golden", "sha256", {0: b"\x00" * 32, 16: b"\x16" * 32}, "boot", now=T0)
    db.assign_policy("cmp1", "golden")
    db.approve_host("cmp1", now=T0 + MIN)
    record(db, "cmp1", verifier.TrustStatus.TRUSTED, "ok", T0, T0 + MIN)
    db.set_clock_state("cmp1", verifier.ClockState(10, 1, 0))
    db.audit("enroll", "ok", host="cmp1", detail="enrolled", now=T0)
    db.dispose()

    db2 = make_db()  # "engine restart"
    assert db2.schema_revision() == migration.head()
    host = db2.get_host("cmp1")
    assert host.status is HostStatus.APPROVED and host.policy_name == "golden"
    assert host.enrolled_at == T0 and host.approved_at == T0 + MIN
    assert host.enrolled_at.tzinfo is not None
    assert host.ak_public == b"ak-cmp1"
    assert db2.get_policy("golden").pcrs == {0: b"\x00" * 32, 16: b"\x16" * 32}
    assert db2.get_policy("golden").spec().name == "golden"
    verdict = db2.get_verdict("cmp1")
    assert verdict is not None and verdict.trusted and verdict.expires_at == T0 + MIN
    assert db2.get_clock_state("cmp1") == verifier.ClockState(10, 1, 0)
    assert [a.event for a in db2.list_audit(host="cmp1")] == ["enroll"]


def test_host_lifecycle(make_db: MakeDb) -> None:
    db = make_db()
    assert enroll(db).status is HostStatus.PENDING
    with pytest.raises(exception.AlreadyExists):
        enroll(db)
    with pytest.raises(exception.NotFound):
        db.get_host("nope")
    with pytest.raises(exception.NotFound):
        db.assign_policy("cmp1", "missing-policy")
    db.set_clock_state("cmp1", verifier.ClockState(10, 1, 0))
    db.approve_host("cmp1")
    assert db.get_clock_state("cmp1") is None  # re-approval resets the baseline
    assert db.revoke_host("cmp1").status is HostStatus.REVOKED
    with pytest.raises(exception.InvalidTransition):
        db.approve_host("cmp1")
    assert db.get_verdict("cmp1").reason == "host revoked"
    again = enroll(db, approved=True)  # re-enrollment of a revoked host
    assert again.status is HostStatus.APPROVED and db.get_verdict("cmp1") is None
    enroll(db, "cmp2")
    assert [h.name for h in db.list_hosts()] == ["cmp1", "cmp2"]
    assert [h.name for h in db.list_hosts(HostStatus.PENDING)] == ["cmp2"]


def test_policy_validation(make_db: MakeDb) -> None:
    db = make_db()
    for bank, pcrs in [("md5", {0: b"\x00" * 32}), ("sha256", {}),
                       ("sha256", {24: b"\x00" * 32}), ("sha256", {0: b"\x00" * 20})]:
        with pytest.raises(exception.InvalidInput):
            db.put_policy("p", bank, pcrs)
    assert db.list_policies() == []
    db.put_policy("p", "sha256", {1: b"\x01" * 32})
    db.put_policy("p", "sha256", {2: b"\x02" * 32})  # replace
    assert db.get_policy("p").pcrs == {2: b"\x02" * 32}


def test_fresh_verdicts_excludes_expired(make_db: MakeDb) -> None:
    db = make_db()
    db.put_policy("golden", "sha256", {16: b"\x16" * 32})
    for name in ("a", "b", "c"):
        enroll(db, name, approved=True)
        db.assign_policy(name, "golden")
    record(db, "a", verifier.TrustStatus.TRUSTED, "ok", T0, T0 + 5 * MIN)
    record(db, "b", verifier.TrustStatus.TRUSTED, "ok", T0, T0 + MIN)
    record(db, "c", verifier.TrustStatus.UNTRUSTED, "PCR 16", T0, T0 + 5 * MIN)
    fresh = db.fresh_verdicts(T0 + 2 * MIN)
    assert sorted(fresh) == ["a", "c"]
    assert fresh["a"].trusted and not fresh["c"].trusted
    assert db.fresh_verdicts(T0 + 10 * MIN) == {}
    # one row per host: a new verdict replaces the old
    record(db, "b", verifier.TrustStatus.TRUSTED, "ok", T0, T0 + 9 * MIN)
    assert sorted(db.fresh_verdicts(T0 + 2 * MIN)) == ["a", "b", "c"]
    with pytest.raises(exception.StaleAttestation, match="host is no longer enrolled"):
        db.record_attestation(api.TrustBasis("ghost", 0, "golden", 0, T0),
                              verifier.TrustStatus.TRUSTED, "ok", T0 + MIN)


def test_nonce_single_use_across_two_databases(make_db: MakeDb) -> None:
    db1, db2 = make_db(), make_db()
    nonce = db1.create_nonce("cmp1", "quote", T0 + MIN, now=T0)
    assert len(nonce) == api.NONCE_BYTES
    assert not db2.consume_nonce("cmp2", nonce, "quote", now=T0)  # other host
    assert not db2.consume_nonce("cmp1", nonce, "enroll", now=T0)  # other purpose
    assert db2.consume_nonce("cmp1", nonce, "quote", now=T0)
    assert not db1.consume_nonce("cmp1", nonce, "quote", now=T0)
    assert not db2.consume_nonce("cmp1", nonce, "quote", now=T0)
    late = db1.create_nonce("cmp1", "quote", T0 + MIN, now=T0)
    assert not db2.consume_nonce("cmp1", late, "quote", now=T0 + 2 * MIN)  # expired
    assert not db2.consume_nonce("cmp1", b"\x00" * 32, "quote", now=T0)  # unknown
    assert db1.purge_nonces(T0 + 2 * MIN) == 2


def test_nonce_race_one_winner(make_db: MakeDb) -> None:
    dbs = [make_db() for _ in range(4)]
    nonce = dbs[0].create_nonce("cmp1", "quote", T0 + MIN, now=T0)
    wins: list[bool] = []
    barrier = threading.Barrier(len(dbs))

    def run(db: api.Database) -> None:
        barrier.wait(timeout=10)
        wins.append(db.consume_nonce("cmp1", nonce, "quote", now=T0))
    threads = [threading.Thread(target=run, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(wins) == [False, False, False, True]


def test_vtpcm_optimistic_location_update(make_db: MakeDb) -> None:
    db1, db2 = make_db(), make_db()
    db1.create_vtpcm(INST, "vt-1", "src", now=T0)
    with pytest.raises(exception.AlreadyExists):
        db1.create_vtpcm(INST, "vt-1", "src")
    assert db1.set_vtpcm_state(INST, 0, "MIGRATING_OUT", expected_state="ACTIVE",
                               migration_id=MIG)
    assert not db2.set_vtpcm_state(INST, 0, "MIGRATING_OUT", expected_state="ACTIVE")
    assert db1.update_vtpcm_location(INST, "src", 0, "dst", 1, state="ACTIVE")
    # a second coordinator with stale expectations loses
    assert not db2.update_vtpcm_location(INST, "src", 0, "other", 1, state="ACTIVE")
    assert not db2.update_vtpcm_location(INST, "dst", 0, "other", 1)
    rec = db2.get_vtpcm(INST)
    assert (rec.host, rec.generation, rec.state) == ("dst", 1, "ACTIVE")
    with pytest.raises(exception.GenerationMismatch):
        db2.update_vtpcm_location(INST, "dst", 1, "src", 0)
    assert [v.instance_uuid for v in db2.list_vtpcms(host="dst")] == [INST]
    assert db2.list_vtpcms(host="src") == []
    assert not db2.delete_vtpcm(INST, 0)
    assert db2.delete_vtpcm(INST, 1)
    with pytest.raises(exception.NotFound):
        db2.get_vtpcm(INST)


def test_migration_crud(make_db: MakeDb) -> None:
    db1, db2 = make_db(), make_db()
    rec = db1.create_migration(MIG, INST, "src", "dst", 3, "BEGUN", T0 + 5 * MIN, now=T0)
    assert rec.created_at == T0 and rec.error is None
    with pytest.raises(exception.AlreadyExists):
        db1.create_migration(MIG, INST, "src", "dst", 3, "BEGUN", T0 + 5 * MIN)
    assert db1.update_migration_state(MIG, "BEGUN", "ABORTED", error="dest untrusted")
    assert not db2.update_migration_state(MIG, "BEGUN", "COMMITTED")
    got = db2.get_migration(MIG)
    assert got.state == "ABORTED" and got.error == "dest untrusted"
    assert [m.migration_id for m in db2.list_migrations(state="ABORTED")] == [MIG]
    assert db2.list_migrations(instance_uuid=INST, overdue_at=T0) == []
    assert len(db2.list_migrations(overdue_at=T0 + 6 * MIN)) == 1
    with pytest.raises(exception.NotFound):
        db2.get_migration("nope")


def test_audit_newest_first_and_filtered(make_db: MakeDb) -> None:
    db = make_db()
    for i in range(5):
        db.audit("attest", "TRUSTED", host="a" if i % 2 else "b", detail=str(i))
    db.audit("migration", "begun", instance=INST, migration_id=MIG)
    all_ = db.list_audit(limit=3)
    assert [a.event for a in all_] == ["migration", "attest", "attest"]
    assert [a.detail for a in db.list_audit(host="a")] == ["3", "1"]


def test_naive_datetime_refused(make_db: MakeDb) -> None:
    db = make_db()
    with pytest.raises(sqlalchemy.exc.StatementError, match="naive datetime refused"):
        db.audit("x", "y", now=datetime.datetime(2025, 1, 1))  # noqa: DTZ001
    assert db.list_audit() == []


def test_repr_hides_url(db_url: str, make_db: MakeDb) -> None:
    assert repr(make_db()) in ("<Database sqlite>", "<Database postgresql>")


def test_command_nonces_are_claimed_once_across_handles(make_db: MakeDb) -> None:
    """Two Database objects = two engine workers on one database."""
    first, second = make_db(), make_db()
    now = T0.timestamp()
    assert first.claim_nonce("ab" * 16, now + 150, now)
    assert not second.claim_nonce("ab" * 16, now + 150, now)
    assert not first.claim_nonce("ab" * 16, now + 150, now)
    assert second.claim_nonce("cd" * 16, now + 150, now)
    # purged only once past keep_until, then claimable (it is expired by then)
    assert first.purge_nonces(now=T0) == 0
    assert first.purge_nonces(now=T0 + datetime.timedelta(seconds=151)) == 2
    assert second.claim_nonce("ab" * 16, now + 400, now + 151)
    first.dispose()
    second.dispose()


def _keys(ak: bytes, command: bytes | None = None) -> dict[str, bytes | None]:
    return {"ak_public": b"ak", "ak_name": ak, "kem_public": b"k", "kem_name": b"kn",
            "command_public": command}


def test_a_key_stays_bound_to_its_first_host_name(make_db: MakeDb) -> None:
    db1, db2 = make_db(), make_db()
    db1.enroll_host("cmp1", **_keys(b"ak-1", b"\x01" * 32), approved=True,  # type: ignore[arg-type]
                    now=T0)
    db1.revoke_host("cmp1")
    with pytest.raises(exception.CertificationError, match="AK already enrolled for host cmp1"):
        db2.enroll_host("cmp2", **_keys(b"ak-1"), now=T0)  # type: ignore[arg-type]
    with pytest.raises(exception.CertificationError,
                       match="host command key already enrolled for host cmp1"):
        db2.enroll_host("cmp2", **_keys(b"ak-2", b"\x01" * 32), now=T0)  # type: ignore[arg-type]
    with pytest.raises(exception.NotFound):
        db2.get_host("cmp2")
    db2.enroll_host("cmp1", **_keys(b"ak-3"), now=T0)  # type: ignore[arg-type]
    assert (db1.key_owner("ak", b"ak-1"), db1.key_owner("ak", b"ak-3")) == ("cmp1", "cmp1")
    assert db1.key_owner("ak", b"ak-2") is None


def test_two_names_enrolling_one_ak_at_once_one_winner(make_db: MakeDb) -> None:
    dbs = [make_db() for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(dbs))

    def run(i: int, db: api.Database) -> None:
        barrier.wait(timeout=10)
        try:
            db.enroll_host(f"cmp{i}", **_keys(b"ak-shared"), now=T0)  # type: ignore[arg-type]
            outcomes.append("enrolled")
        except exception.CertificationError as err:
            assert "AK" in err.kwargs["reason"], err
            outcomes.append("refused")
    threads = [threading.Thread(target=run, args=(i, db)) for i, db in enumerate(dbs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["enrolled"] + ["refused"] * 3
    assert len(dbs[0].list_hosts()) == 1


def test_forget_host_keeps_a_tombstone_and_its_keys(make_db: MakeDb) -> None:
    """A host gone for good: its vTPCM records and verdict go in one
    transaction; the name stays FORGOTTEN with its keys bound (forgetting
    never undoes a revocation); only a REVOKED host, and only an enroll
    brings the name back."""
    db = make_db()
    enroll(db, "gone", approved=True)
    enroll(db, "stays", approved=True)
    db.create_vtpcm(INST, "v-1", "gone")
    db.create_vtpcm(MIG, "v-2", "stays")
    with pytest.raises(exception.InvalidTransition, match="from APPROVED to FORGOTTEN"):
        db.forget_host("gone")
    assert db.get_host("gone").status is HostStatus.APPROVED
    db.revoke_host("gone", now=T0)
    assert db.forget_host("gone") == [INST]
    assert db.get_host("gone").status is HostStatus.FORGOTTEN
    with pytest.raises(exception.NotFound):
        db.get_vtpcm(INST)
    assert db.get_verdict("gone") is None
    assert db.key_owner("ak", b"\x00\x0bak-gone") == "gone"
    assert db.get_vtpcm(MIG).host == "stays" and db.get_host("stays").name == "stays"
    with pytest.raises(exception.CertificationError, match="gone"):  # the moved TPM
        db.enroll_host("new-name", ak_public=b"ak", ak_name=b"\x00\x0bak-gone",
                       kem_public=b"k", kem_name=b"k", now=T0)
    with pytest.raises(exception.InvalidTransition, match="FORGOTTEN"):
        db.forget_host("gone")
    with pytest.raises(exception.InvalidTransition, match="FORGOTTEN"):
        db.approve_host("gone")
    with pytest.raises(exception.NotFound):  # revoke does not lift the tombstone
        db.revoke_host("gone", now=T0)
    again = enroll(db, "gone")  # the operator's enroll: the way back
    assert again.status is HostStatus.PENDING
