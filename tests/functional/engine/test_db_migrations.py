"""Engine schema migrations (alembic) on real SQLite, PostgreSQL and MariaDB.

From an empty database and from the DDL the releases before alembic
created (``legacy/engine-v*.sql``, see make_fixtures.py), ``db_sync``
reaches head with the rows kept and the schema equal to the models; an
engine refuses any database not at head and changes nothing in it.
"""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import OperationalError

from vtpcm_common import exception
from vtpcm_lab.daemons import EngineDaemon
from vtpcm_nova.engine import verifier
from vtpcm_nova.engine.db import api, migration, models, witnesses
from vtpcm_nova.engine.db.models import HostStatus

pytestmark = pytest.mark.functional

LEGACY = Path(__file__).with_name("legacy")
T0 = datetime.datetime(2025, 1, 1, 12, 0)  # naive UTC, as the old engines stored it
AWARE_T0 = T0.replace(tzinfo=datetime.UTC)
MARIADB_ADMIN_URL = "mysql+pymysql://root@127.0.0.1:3306/mysql"


@pytest.fixture(scope="module")
def mariadb_admin() -> Iterator[sqlalchemy.engine.Engine]:
    try:  # PyMySQL comes with the test extra; the server may be absent
        admin = sqlalchemy.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT",
                                         connect_args={"connect_timeout": 5})
        with admin.connect():
            pass
    except (OperationalError, ImportError) as err:
        pytest.skip(f"MariaDB at {MARIADB_ADMIN_URL} unusable: {err}")
    yield admin
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An EMPTY database on each backend (PostgreSQL: a schema of this run's
    database, dropped with it; MariaDB: one database per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/engine.sqlite"
        return
    if request.param == "postgresql":
        yield _pg(request)
        return
    admin = request.getfixturevalue("mariadb_admin")
    name = "vtpcm_mig_" + uuid.uuid4().hex[:12]
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    try:
        yield f"mysql+pymysql://root@127.0.0.1:3306/{name}?charset=utf8mb4"
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))


def _pg(request: pytest.FixtureRequest) -> str:
    base: str = request.getfixturevalue("pg_url")
    schema = "m_" + uuid.uuid4().hex[:12]
    eng = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    eng.dispose()
    return f"{base}?options=-csearch_path%3D{schema}"


def engine_of(url: str) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(url)


def diff_with_models(url: str) -> list[object]:
    eng = engine_of(url)
    try:
        with eng.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
            return list(compare_metadata(ctx, models.Base.metadata))
    finally:
        eng.dispose()


def load_legacy(url: str, version: int) -> None:
    """The schema a v``version`` engine created, by its own DDL, and its
    schema_version row."""
    eng = engine_of(url)
    dialect = eng.dialect.name
    ddl = (LEGACY / f"engine-v{version}.{dialect}.sql").read_text()
    try:
        with eng.begin() as conn:
            for statement in ddl.split(";\n"):
                if statement.strip(" \n-") and "CREATE" in statement:
                    conn.execute(sqlalchemy.text(statement))
            conn.execute(sqlalchemy.text(
                "INSERT INTO schema_version (id, version) VALUES (1, :v)"), {"v": version})
    finally:
        eng.dispose()


def insert(url: str, table: str, **values: object) -> None:
    eng = engine_of(url)
    try:
        with eng.begin() as conn:
            conn.execute(sqlalchemy.text(
                f"INSERT INTO {table} ({', '.join(values)}) "
                f"VALUES ({', '.join(':' + k for k in values)})"), values)
    finally:
        eng.dispose()


def tables(url: str) -> set[str]:
    eng = engine_of(url)
    try:
        return set(sqlalchemy.inspect(eng).get_table_names())
    finally:
        eng.dispose()


def old_host(url: str, name: str, ak_name: bytes, status: str = "APPROVED",
             at: datetime.datetime = T0, **more: object) -> None:
    insert(url, "hosts", name=name, ak_public=b"ak", ak_name=ak_name, kem_public=b"k",
           kem_name=b"k-" + name.encode(), status=status, enrolled_at=at, **more)


def test_empty_database_to_head_equals_the_models(any_url: str) -> None:
    result = migration.db_sync(any_url)
    assert result.before == "empty (no engine schema)"
    assert result.after == f"revision {migration.head()}"
    assert diff_with_models(any_url) == []
    db = api.Database(any_url)
    try:
        assert db.schema_revision() == migration.head()
        db.enroll_host("cmp1", ak_public=b"ak", ak_name=b"n", kem_public=b"k",
                       kem_name=b"kn", now=AWARE_T0)
        assert db.get_host("cmp1").revision == 0
    finally:
        db.dispose()
    assert migration.db_sync(any_url).before == f"revision {migration.head()}"  # no-op


def test_previous_release_v3_database_upgraded_with_its_rows(any_url: str) -> None:
    load_legacy(any_url, 3)
    insert(any_url, "policies", name="golden", bank="sha256",
           pcrs='{"16": "' + "16" * 32 + '"}', description="boot", created_at=T0, revision=2)
    old_host(any_url, "cmp1", b"\x00\x0bak-cmp1", policy_name="golden", approved_at=T0,
             command_public=b"\x01" * 32, revision=5)
    insert(any_url, "enrolled_keys", kind="ak", digest="ab" * 32, host="cmp1",
           enrolled_at=T0)
    insert(any_url, "vtpcms", instance_uuid="6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11",
           vtpcm_id="v1", host="cmp1", generation=7, state="ACTIVE", updated_at=T0)
    insert(any_url, "audit", at=T0, event="enroll", host="cmp1", outcome="ok", detail="d")
    with pytest.raises(exception.SchemaNotAtHead,
                       match="schema version 3 of a release before alembic, this engine "
                             f"needs revision {migration.head()}: run 'vtpcm-manage db sync'"):
        api.Database(any_url)

    result = migration.db_sync(any_url)

    assert result.before == "schema version 3 of a release before alembic"
    assert result.after == f"revision {migration.head()}"
    assert diff_with_models(any_url) == []
    db = api.Database(any_url)
    try:
        host = db.get_host("cmp1")
        assert (host.status, host.policy_name, host.revision) == (HostStatus.APPROVED,
                                                                  "golden", 5)
        assert host.command_public == b"\x01" * 32 and host.enrolled_at == AWARE_T0
        policy = db.get_policy("golden")
        assert policy.revision == 2 and policy.pcrs == {16: b"\x16" * 32}
        assert db.get_vtpcm("6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11").generation == 7
        assert [a.event for a in db.list_audit(host="cmp1")] == ["enroll"]
        with db.session() as s:  # engines before alembic refuse it now
            fence = s.get(models.SchemaVersion, 1)
            assert fence is not None and fence.version == 4
    finally:
        db.dispose()


def test_v1_database_upgraded_keys_bound_revisions_start_at_zero(any_url: str) -> None:
    load_legacy(any_url, 1)
    insert(any_url, "policies", name="golden", bank="sha256",
           pcrs='{"16": "' + "16" * 32 + '"}', description="", created_at=T0)
    old_host(any_url, "cmp1", b"\x00\x0bak-cmp1", policy_name="golden")
    # old rules let a later name share the AK
    old_host(any_url, "cmp0", b"\x00\x0bak-cmp1", at=T0 + datetime.timedelta(minutes=1))
    migration.db_sync(any_url)
    assert diff_with_models(any_url) == []
    db = api.Database(any_url)
    try:
        assert db.get_host("cmp1").command_public is None  # re-enrol to learn its key
        assert db.get_host("cmp1").revision == 0 and db.get_policy("golden").revision == 0
        basis = api.TrustBasis("cmp1", 0, "golden", 0, AWARE_T0)
        assert db.record_attestation(basis, verifier.TrustStatus.TRUSTED, "ok",
                                     AWARE_T0 + datetime.timedelta(minutes=1)).trusted
        assert db.claim_nonce("ef" * 16, AWARE_T0.timestamp() + 10, AWARE_T0.timestamp())
        assert db.key_owner("ak", b"\x00\x0bak-cmp1") == "cmp1"
        with pytest.raises(exception.CertificationError,
                           match="AK already enrolled for host cmp1"):
            db.enroll_host("cmp9", ak_public=b"ak", ak_name=b"\x00\x0bak-cmp1",
                           kem_public=b"k", kem_name=b"k9")
    finally:
        db.dispose()


def test_v2_upgrade_binds_only_proven_keys_and_live_hosts_first(any_url: str) -> None:
    """v2 -> v3 binds the keys of the hosts there are. An EK certificate a
    v2 host merely reported was never proven: binding it would let that
    name squat the TPM. Where old rules let a new name take the AK of a
    revoked host, the host in service keeps it."""
    load_legacy(any_url, 2)
    old_host(any_url, "cmp-revoked", b"\x00\x0bshared", status="REVOKED",
             ek_certificate=b"ek-cert-1", command_public=b"\x01" * 32)
    old_host(any_url, "cmp-live", b"\x00\x0bshared", at=T0 + datetime.timedelta(minutes=1),
             ek_certificate=b"ek-cert-2", command_public=b"\x02" * 32)
    migration.db_sync(any_url)
    db = api.Database(any_url)
    try:
        assert db.key_owner("ak", b"\x00\x0bshared") == "cmp-live"
        assert db.key_owner("command", b"\x01" * 32) == "cmp-revoked"
        assert db.key_owner("command", b"\x02" * 32) == "cmp-live"
        for cert in (b"ek-cert-1", b"ek-cert-2"):
            assert db.key_owner("ek-cert", cert) is None
    finally:
        db.dispose()


@pytest.mark.parametrize("where", ["empty", "base", "newer"])
def test_engine_refuses_a_database_not_at_head_and_changes_nothing(
        db_url: str, where: str) -> None:
    if where == "base":
        migration.db_sync(db_url, migration.BASE_REVISION)
        found, action = f"revision {migration.BASE_REVISION}", "run 'vtpcm-manage db sync'"
    elif where == "newer":
        migration.db_sync(db_url)
        eng = engine_of(db_url)
        with eng.begin() as conn:
            conn.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = '9999'"))
        eng.dispose()
        found, action = "revision 9999", "migrated by a newer release"
    else:
        found, action = "empty (no engine schema)", "run 'vtpcm-manage db sync'"
    before = tables(db_url)
    with pytest.raises(exception.SchemaNotAtHead) as refused:
        api.Database(db_url)
    assert f"schema is {found}, this engine needs revision {migration.head()}" \
        in str(refused.value)
    assert action in str(refused.value)
    assert tables(db_url) == before
    if where == "newer":  # and db sync does not touch it either
        with pytest.raises(exception.SchemaNotAtHead, match="migrated by a newer release"):
            migration.db_sync(db_url)


def test_a_legacy_version_no_release_made_is_refused(db_url: str) -> None:
    load_legacy(db_url, 3)
    eng = engine_of(db_url)
    with eng.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE schema_version SET version = 7"))
    eng.dispose()
    with pytest.raises(exception.SchemaNotAtHead, match="schema version 7 .*backup"):
        migration.db_sync(db_url)
    assert "alembic_version" not in tables(db_url)


def test_engine_process_refuses_to_start_on_a_database_not_at_head(tmp_path: Path) -> None:
    """The real vtpcm-engine: one clear line naming where the schema is,
    the revision it needs and the command to run; exit 1; nothing made."""
    url = f"sqlite:///{tmp_path}/engine.sqlite"
    migration.db_sync(url, migration.BASE_REVISION)
    before = tables(url)
    engine = EngineDaemon(tmp_path, "vtpcm-refuse-" + uuid.uuid4().hex[:6], url,
                          db_sync=False)
    engine.start()
    try:
        assert engine.proc is not None
        assert engine.proc.wait(timeout=120) == 1
    finally:
        engine.stop()
    log = engine.log_text()
    assert (f"vtpcm-engine cannot start: Engine database schema is revision "
            f"{migration.BASE_REVISION}, this engine needs revision {migration.head()}: "
            f"run 'vtpcm-manage db sync' first") in log
    assert "Traceback" not in log
    assert tables(url) == before
    assert migration.db_version(url) == f"revision {migration.BASE_REVISION}"


def test_a_legacy_database_without_its_version_row_is_upgraded(db_url: str) -> None:
    """An engine of those releases stopped between creating its tables and
    recording their version: every legacy step tolerates what it finds."""
    load_legacy(db_url, 2)
    old_host(db_url, "cmp1", b"\x00\x0bak-cmp1", command_public=b"\x01" * 32)
    eng = engine_of(db_url)
    with eng.begin() as conn:
        conn.execute(sqlalchemy.text("DELETE FROM schema_version"))
    eng.dispose()
    assert migration.db_sync(db_url).before == "schema version 1 of a release before alembic"
    assert diff_with_models(db_url) == []
    db = api.Database(db_url)
    try:
        assert db.key_owner("command", b"\x01" * 32) == "cmp1"
    finally:
        db.dispose()


def test_0003_keeps_migrations_and_adds_abandoned_vtpcms(any_url: str) -> None:
    """A database at 0002 with a migration row: kept, with no prior state
    (its abort restores ACTIVE, as before); no abandoned vTPCMs."""
    migration.db_sync(any_url, "0002")
    mid = str(uuid.uuid4())
    insert(any_url, "migrations", migration_id=mid,
           instance_uuid="6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11", source="a", dest="b",
           generation=3, state="ABORTED", created_at=T0, updated_at=T0, deadline=T0)
    assert "abandoned_vtpcms" not in tables(any_url)
    assert migration.db_sync(any_url, "0003").after == "revision 0003"
    migration.db_sync(any_url)  # the engine opens only a database at head
    db = api.Database(any_url)
    try:
        rec = db.get_migration(mid)
        assert (rec.generation, rec.state, rec.prior_state) == (3, "ABORTED", None)
        assert db.list_abandoned() == []
    finally:
        db.dispose()


def test_0004_adds_begun_by_and_keeps_migrations(any_url: str) -> None:
    """A database at 0003 with a begin in flight: kept, with no recorded
    worker (reconcile then applies the step bound, not the worker rule)."""
    migration.db_sync(any_url, "0003")
    mid = str(uuid.uuid4())
    insert(any_url, "migrations", migration_id=mid,
           instance_uuid="6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11", source="a", dest="b",
           generation=3, state="PREPARING", created_at=T0, updated_at=T0, deadline=T0)
    assert migration.db_sync(any_url, "0004").after == "revision 0004"
    migration.db_sync(any_url)  # the engine opens only a database at head
    assert diff_with_models(any_url) == []
    db = api.Database(any_url)
    try:
        rec = db.get_migration(mid)
        assert (rec.state, rec.begun_by) == ("PREPARING", None)
    finally:
        db.dispose()


def test_0005_indexes_the_reaper_tombstone_lookup(any_url: str) -> None:
    """A database at 0004 with audit rows: kept; ``create_vtpcm``'s
    tombstone lookup (instance, event) is served by an index, not a scan of
    the append-only audit table."""
    migration.db_sync(any_url, "0004")
    inst = "6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11"
    insert(any_url, "audit", at=T0, event="vtpcm.reap", host="a", instance=inst,
           outcome="destroyed", detail="")
    eng = engine_of(any_url)
    try:
        before = {ix["name"] for ix in sqlalchemy.inspect(eng).get_indexes("audit")}
    finally:
        eng.dispose()
    assert "ix_audit_instance_event" not in before
    assert migration.db_sync(any_url, "0005").after == "revision 0005"
    migration.db_sync(any_url)  # the engine opens only a database at head
    assert diff_with_models(any_url) == []
    eng = engine_of(any_url)
    try:
        indexes = {ix["name"]: ix["column_names"]
                   for ix in sqlalchemy.inspect(eng).get_indexes("audit")}
        if any_url.startswith("sqlite"):
            with eng.connect() as conn:
                plan = " ".join(str(row) for row in conn.execute(sqlalchemy.text(
                    "EXPLAIN QUERY PLAN SELECT id FROM audit WHERE instance = :i "
                    "AND event = :e AND outcome = :o LIMIT 1"),
                    {"i": inst, "e": "vtpcm.reap", "o": "destroyed"}))
            assert "USING INDEX ix_audit_instance_event" in plan, plan
    finally:
        eng.dispose()
    assert indexes["ix_audit_instance_event"] == ["instance", "event"]
    db = api.Database(any_url)
    try:
        assert db.has_audit(inst, "vtpcm.reap", "destroyed")
        assert not db.has_audit(inst, "vtpcm.reap", "refused")
    finally:
        db.dispose()


def test_0006_adds_engine_run_leases_on_the_databases_clock(any_url: str) -> None:
    """A database at 0005 with a begin in flight: kept. At head each engine
    run holds a lease written and judged with the database server's clock
    (never a worker's): live until it expires, renewed (saying how long it
    had lapsed), gone at a clean stop."""
    migration.db_sync(any_url, "0005")
    mid = str(uuid.uuid4())
    insert(any_url, "migrations", migration_id=mid,
           instance_uuid="6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11", source="a", dest="b",
           generation=3, state="PREPARING", created_at=T0, updated_at=T0, deadline=T0,
           begun_by="engine-1/0123456789ab")
    assert migration.db_sync(any_url, "0006").after == "revision 0006"
    migration.db_sync(any_url)  # the engine opens only a database at head
    assert diff_with_models(any_url) == []
    db = api.Database(any_url)
    try:
        assert db.get_migration(mid).begun_by == "engine-1/0123456789ab"
        assert db.live_workers() == frozenset()  # that run is gone: its begin abandoned
        now = db.db_now()
        assert now.tzinfo is not None
        assert abs((now - api.utcnow()).total_seconds()) < 5  # one machine here
        expires = db.register_worker("engine-1/aaaa", "engine-1", 60)
        assert 59 < (expires - now).total_seconds() < 65
        # same host name; MariaDB keeps whole seconds (DATETIME), so a
        # lease may end up to 1 s early there: harmless for a 60 s lease
        db.register_worker("engine-1/bbbb", "engine-1", 2.0)
        assert db.live_workers() == {"engine-1/aaaa", "engine-1/bbbb"}
        time.sleep(2.5)
        assert db.live_workers() == {"engine-1/aaaa"}
        _, lapsed = db.renew_worker("engine-1/bbbb", "engine-1", 60)
        assert lapsed is not None and lapsed.total_seconds() > 0
        _, lapsed = db.renew_worker("engine-1/aaaa", "engine-1", 60)
        assert lapsed is None
        assert db.live_workers() == {"engine-1/aaaa", "engine-1/bbbb"}
        db.deregister_worker("engine-1/aaaa")
        assert db.live_workers() == {"engine-1/bbbb"}
        _, lapsed = db.renew_worker("engine-1/aaaa", "engine-1", 60)  # its row was gone
        assert lapsed == datetime.timedelta(0)
    finally:
        db.dispose()


def test_0008_adds_api_witnesses_each_used_once(any_url: str) -> None:
    """A database at 0007 with a vTPCM shelved: kept. At head nova-api's
    witnesses are kept, each used once (also by two callers), and a flood
    for one instance keeps a bounded number."""
    migration.db_sync(any_url, "0007")
    inst = "6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11"
    insert(any_url, "vtpcms", instance_uuid=inst, vtpcm_id=str(uuid.uuid4()), host="a",
           generation=2, state="SHELVED", migration_id=None, updated_at=T0)
    assert migration.db_sync(any_url).after == f"revision {migration.head()}"
    assert diff_with_models(any_url) == []
    db = api.Database(any_url)
    try:
        assert db.get_vtpcm(inst).state == "SHELVED"
        now = api.utcnow().replace(microsecond=0)
        for i in range(witnesses.MAX_PER_INSTANCE + 3):
            db.record_witness("k:%02d" % i, inst, "unshelve", None, "k",
                              now - datetime.timedelta(seconds=i), now)
        assert len(db.list_witnesses(inst)) == witnesses.MAX_PER_INSTANCE
        not_before = now - datetime.timedelta(seconds=60)
        first = db.use_witness(inst, "unshelve", "b", not_before, "unshelve m1", now)
        assert first is not None and first.id == "k:00" and first.used_by == "unshelve m1"
        second = db.use_witness(inst, "unshelve", "b", not_before, "unshelve m2", now)
        assert second is not None and second.id == "k:01"
        assert db.use_witness(inst, "delete", None, not_before, "reap", now) is None
        db.release_witness(first.id)
        assert db.use_witness(inst, "unshelve", "b", not_before, "again", now).id == "k:00"
    finally:
        db.dispose()


def test_0009_adds_vtpcms_owner_project(any_url: str) -> None:
    """A database at 0008 with a vTPCM shelved: kept, its owner unknown
    (None: the engine falls back to Nova's current view). At head a new
    vTPCM keeps the owner project recorded at create."""
    migration.db_sync(any_url, "0008")
    inst = "0c7d2a4e-5b1f-4d8e-8a3c-6e9f1b2d3c44"
    insert(any_url, "vtpcms", instance_uuid=inst, vtpcm_id=str(uuid.uuid4()), host="a",
           generation=2, state="SHELVED", migration_id=None, updated_at=T0)
    assert migration.db_sync(any_url).after == "revision 0009"
    assert diff_with_models(any_url) == []
    db = api.Database(any_url)
    try:
        old = db.get_vtpcm(inst)
        assert (old.state, old.generation, old.owner_project) == ("SHELVED", 2, None)
        new = "1d8e3b5f-6c2a-4e9f-9b4d-7f0a2c3e4d55"
        db.create_vtpcm(new, str(uuid.uuid4()), "b", owner_project="p-tenant")
        assert db.get_vtpcm(new).owner_project == "p-tenant"
    finally:
        db.dispose()


def test_leases_work_on_a_mariadb_dialect_url(mariadb_admin: sqlalchemy.engine.Engine) -> None:
    """``mariadb+pymysql://`` (SQLAlchemy's own MariaDB dialect, backend
    name "mariadb") reads the database clock as ``mysql+pymysql://`` does:
    the lease registered before the RPC server starts must not fail."""
    name = "vtpcm_mdb_" + uuid.uuid4().hex[:12]
    with mariadb_admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    try:
        url = f"mariadb+pymysql://root@127.0.0.1:3306/{name}?charset=utf8mb4"
        migration.db_sync(url)
        db = api.Database(url)
        try:
            now = db.db_now()
            assert abs((now - api.utcnow()).total_seconds()) < 5
            db.register_worker("engine-1/aaaa", "engine-1", 60)
            assert db.live_workers() == {"engine-1/aaaa"}
        finally:
            db.dispose()
    finally:
        with mariadb_admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
