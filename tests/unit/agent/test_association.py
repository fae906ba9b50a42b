"""The association list: transition table, tombstones, atomicity."""

import itertools
import os
import sqlite3
import stat
import subprocess
import sys
import uuid

import pytest

from tests import spec_tables as spec
from tests.refusal import refused
from vtpcm_agent import association
from vtpcm_agent.association import AssociationList, VTPCMState
from vtpcm_common import exception

S = VTPCMState


@pytest.fixture
def alist(tmp_path):
    al = AssociationList(tmp_path / "assoc.sqlite")
    yield al
    al.close()


def _add(al, state=S.CREATING, generation=0, instance=None):
    instance = instance or str(uuid.uuid4())
    return al.add(instance_uuid=instance, vtpcm_id=str(uuid.uuid4()), state=state,
                  generation=generation, state_dir="/x", ctrl_socket="/x.ctrl")


def _drive_to(al, instance, path):
    for target in path:
        al.transition(instance, target)


# A path from CREATING to every state, used to reach each start state.
PATHS = {
    S.CREATING: [],
    S.STOPPED: [S.STOPPED],
    S.ACTIVE: [S.STOPPED, S.ACTIVE],
    S.MIGRATING_OUT: [S.STOPPED, S.ACTIVE, S.MIGRATING_OUT],
    S.DESTROYED: [S.DESTROYED],
}


@pytest.mark.parametrize(("current", "target"),
                         list(itertools.product(list(S), list(S))))
def test_every_pair_of_the_transition_table(alist, current, target):
    if current is S.MIGRATING_IN:
        rec = _add(alist, state=S.MIGRATING_IN)
    else:
        rec = _add(alist)
        _drive_to(alist, rec.instance_uuid, PATHS[current])
    before = alist.get(rec.instance_uuid)
    assert before.state is current
    if target is current:
        # Re-asserting the current state is a no-op (idempotent retries).
        assert alist.transition(rec.instance_uuid, target).state is current
    elif target.value in spec.ASSOCIATION_MOVES[current.value]:
        assert alist.transition(rec.instance_uuid, target).state is target
    else:
        with pytest.raises(exception.InvalidTransition) as err:
            alist.transition(rec.instance_uuid, target)
        assert current.value in str(err.value) and target.value in str(err.value)
        after = alist.get(rec.instance_uuid)
        assert after.state is current and after.updated_at == before.updated_at


def test_the_code_table_is_the_spec_both_ways():
    """The hand-written spec (the design document's table) and the code's
    table hold the same moves and the same initial states."""
    code = {cur.value: {t.value for t in targets}
            for cur, targets in association.TRANSITIONS.items()}
    assert code == {cur: set(targets) for cur, targets in spec.ASSOCIATION_MOVES.items()}
    assert {s.value for s in association.INITIAL_STATES} == spec.ASSOCIATION_INITIAL
    assert {s.value for s in S} == set(spec.ASSOCIATION_MOVES)


@pytest.mark.parametrize("state", list(S))
def test_only_the_initial_states_start_a_row(alist, state):
    instance = str(uuid.uuid4())
    if state.value in spec.ASSOCIATION_INITIAL:
        assert _add(alist, state=state, instance=instance).state is state
    else:
        with pytest.raises(exception.InvalidTransition) as err:
            _add(alist, state=state, instance=instance)
        assert "from (none)" in str(err.value) and state.value in str(err.value)
        with pytest.raises(exception.NotFound):
            alist.get(instance)


def test_destroyed_is_final(alist):
    rec = _add(alist)
    alist.transition(rec.instance_uuid, S.DESTROYED)
    for target in S:
        if target is S.DESTROYED:
            continue
        with pytest.raises(exception.InvalidTransition):
            alist.transition(rec.instance_uuid, target)


def test_expected_states_narrow_the_table(alist):
    rec = _add(alist)
    alist.transition(rec.instance_uuid, S.STOPPED)
    with pytest.raises(exception.InvalidTransition):
        alist.transition(rec.instance_uuid, S.ACTIVE,
                         expected=frozenset({S.MIGRATING_OUT}))
    assert alist.get(rec.instance_uuid).state is S.STOPPED


def test_duplicate_add_refused(alist):
    rec = _add(alist)
    with pytest.raises(exception.AlreadyExists):
        _add(alist, instance=rec.instance_uuid)
    assert alist.get(rec.instance_uuid).vtpcm_id == rec.vtpcm_id


def test_tombstone_refuses_old_generation(alist):
    rec = _add(alist, state=S.MIGRATING_IN, generation=3)
    alist.transition(rec.instance_uuid, S.DESTROYED)
    for gen in (0, 3):
        with pytest.raises(exception.GenerationMismatch):
            _add(alist, state=S.MIGRATING_IN, generation=gen, instance=rec.instance_uuid)
    newer = _add(alist, state=S.MIGRATING_IN, generation=4, instance=rec.instance_uuid)
    assert newer.generation == 4 and newer.state is S.MIGRATING_IN


def test_generation_never_decreases(alist):
    rec = _add(alist, state=S.MIGRATING_IN, generation=2)
    with pytest.raises(exception.GenerationMismatch):
        alist.transition(rec.instance_uuid, S.ACTIVE, generation=1)
    assert alist.get(rec.instance_uuid).state is S.MIGRATING_IN


def test_unknown_instance(alist):
    with pytest.raises(exception.NotFound):
        alist.transition(str(uuid.uuid4()), S.ACTIVE)


def test_survives_reopen_and_lists_without_tombstones(tmp_path):
    path = tmp_path / "a.sqlite"
    al = AssociationList(path)
    keep = _add(al)
    gone = _add(al)
    al.transition(gone.instance_uuid, S.DESTROYED)
    al.close()
    al = AssociationList(path)
    assert [a.instance_uuid for a in al.list()] == [keep.instance_uuid]
    assert len(al.list(include_destroyed=True)) == 2
    al.close()


def test_kill_9_mid_write_leaves_no_half_record(tmp_path):
    """A writer killed at random points leaves only whole rows behind."""
    path = tmp_path / "k.sqlite"
    AssociationList(path).close()
    script = (
        "import sys, uuid\n"
        "from vtpcm_agent.association import AssociationList, VTPCMState as S\n"
        "al = AssociationList(sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    i = str(uuid.uuid4())\n"
        "    al.add(instance_uuid=i, vtpcm_id=str(uuid.uuid4()), state=S.CREATING,\n"
        "           generation=0, state_dir='/d', ctrl_socket='/c')\n"
        "    al.transition(i, S.STOPPED)\n"
        "    print('row', flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for rows_before_kill in (1, 7, 40):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)],
                                stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            for _ in range(rows_before_kill):  # killed while it writes the next rows
                assert proc.stdout.readline().strip() == b"row"
        finally:
            proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
    al = AssociationList(path)
    rows = al.list(include_destroyed=True)
    assert rows, "the writer made no progress"
    for row in rows:
        assert row.state in (S.CREATING, S.STOPPED)
        assert row.vtpcm_id and row.state_dir == "/d" and row.ctrl_socket == "/c"
    al.close()


def test_discarding_an_incoming_keeps_the_tombstone(alist):
    """Review finding: an aborted incoming must not erase the generation memory."""
    rec = _add(alist, state=S.MIGRATING_IN, generation=1)
    alist.transition(rec.instance_uuid, S.ACTIVE)
    alist.transition(rec.instance_uuid, S.MIGRATING_OUT)
    alist.transition(rec.instance_uuid, S.DESTROYED)  # left this host at generation 1
    again = _add(alist, state=S.MIGRATING_IN, generation=2, instance=rec.instance_uuid)
    alist.forget(again.instance_uuid, again.vtpcm_id)  # that incoming was aborted
    assert alist.tombstone(rec.instance_uuid) == 1
    for old in (0, 1):
        with pytest.raises(exception.GenerationMismatch):
            _add(alist, state=S.MIGRATING_IN, generation=old, instance=rec.instance_uuid)
    assert _add(alist, state=S.MIGRATING_IN, generation=2,
                instance=rec.instance_uuid).generation == 2


def test_aborted_migrations_are_remembered(tmp_path):
    path = tmp_path / "a.sqlite"
    al = AssociationList(path)
    al.record_aborted("m-1", "i-1")
    al.record_aborted("m-1", "i-1")
    al.close()
    al = AssociationList(path)
    assert al.was_aborted("m-1") and not al.was_aborted("m-2")
    al.close()


# The file a v3 agent of the release before ``PRAGMA user_version`` made
# (its whole schema, run at every start; v1 and v2 files were its prefixes).
LEGACY_V3_DDL = """
CREATE TABLE IF NOT EXISTS associations (
    instance_uuid TEXT PRIMARY KEY,
    vtpcm_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL CHECK (generation >= 0),
    migration_id TEXT,
    state_dir TEXT NOT NULL,
    ctrl_socket TEXT NOT NULL,
    pid INTEGER,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tombstones (
    instance_uuid TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    destroyed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS aborted_migrations (
    migration_id TEXT PRIMARY KEY,
    instance_uuid TEXT NOT NULL,
    aborted_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS command_nonces (
    nonce TEXT PRIMARY KEY,
    keep_until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS command_nonces_keep_until ON command_nonces (keep_until);
"""


def legacy_file(path, version, *rows):
    """A file as the agent of schema ``version`` (1-3) left it."""
    cut = {1: "CREATE TABLE IF NOT EXISTS tombstones",
           2: "CREATE TABLE IF NOT EXISTS command_nonces"}.get(version)
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_V3_DDL.split(cut)[0] if cut else LEGACY_V3_DDL)
    conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    for row in rows:
        conn.execute("INSERT INTO associations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        if version >= 2 and row[2] == "DESTROYED":  # v2 agents wrote both
            conn.execute("INSERT INTO tombstones VALUES (?, ?, ?)", (row[0], row[3], row[9]))
    conn.commit()
    conn.close()


def file_schema(path):
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'index') "
            "AND name NOT LIKE 'sqlite_%'")}
        return version, tables
    finally:
        conn.close()


V3_TABLES = {"associations", "tombstones", "aborted_migrations", "command_nonces",
             "command_nonces_keep_until"}
# v4 adds the agent's record of seals, v5 the swtpm uid of each instance
# v6 when each uid was last freed
CURRENT_TABLES = V3_TABLES | {"seals", "seals_instance", "swtpm_uids", "swtpm_uids_freed",
                                "swtpm_uids_kept", "swtpm_uid_floor", "uid_range_firsts"}
DESTROYED = ("i", "v", "DESTROYED", 4, None, "/d", "/c", None, "t", "t")
ACTIVE = ("j", "w", "ACTIVE", 2, None, "/d2", "/c2", 77, "t", "t")


def test_a_new_file_is_at_the_last_version(tmp_path):
    AssociationList(tmp_path / "a.sqlite").close()
    assert file_schema(tmp_path / "a.sqlite") == (association.SCHEMA_VERSION, CURRENT_TABLES)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_file_of_the_release_before_user_version_is_upgraded_with_its_rows(
        tmp_path, version):
    path = tmp_path / f"v{version}.sqlite"
    legacy_file(path, version, DESTROYED, ACTIVE)
    al = AssociationList(path)
    try:
        assert al.get("j").state is VTPCMState.ACTIVE and al.get("j").pid == 77
        assert al.tombstone("i") == 4  # from v1: the v2 step moved it apart
        assert al.claim_nonce("n1", 100.0, 50.0)  # v3's table
    finally:
        al.close()
    # the legacy version table is gone: user_version says where the file is
    assert file_schema(path) == (association.SCHEMA_VERSION, CURRENT_TABLES)


def test_command_nonces_are_claimed_once_and_survive_a_reopen(tmp_path):
    path = tmp_path / "a.sqlite"
    al = AssociationList(path)
    assert al.claim_nonce("n1", 100.0, 50.0)
    assert not al.claim_nonce("n1", 100.0, 51.0)
    al.close()
    al = AssociationList(path)  # an agent restart
    assert not al.claim_nonce("n1", 100.0, 52.0)
    assert al.claim_nonce("n2", 100.0, 52.0)
    # forgotten only once past keep_until (the command is expired by then)
    assert al.claim_nonce("n1", 300.0, 100.5)
    al.close()


def test_a_newer_schema_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "v99.sqlite"
    AssociationList(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(exception.NewerSchema) as refused:
        AssociationList(path)
    assert str(refused.value) == (f"Association list {path} has schema version 99, this "
                                  f"release knows up to {association.SCHEMA_VERSION} (a "
                                  "newer release wrote it)")
    assert file_schema(path) == (99, CURRENT_TABLES)


def test_a_legacy_file_of_a_newer_release_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "legacy99.sqlite"
    legacy_file(path, 3)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(exception.NewerSchema, match="schema version 99"):
        AssociationList(path)
    assert file_schema(path) == (0, V3_TABLES | {"schema_version"})


def test_seals_are_recorded_durably_and_per_instance(tmp_path):
    path = tmp_path / "s.sqlite"
    al = AssociationList(path)
    one, other = str(uuid.uuid4()), str(uuid.uuid4())
    assert al.seals(one) == []
    al.record_seal("m-1", one, 0, "host-b")
    al.record_seal("m-1", one, 0, "host-b")  # a retried seal is a second record
    al.record_seal("m-2", other, 3, "host-c")
    al.close()
    al = AssociationList(path)
    try:
        seals = al.seals(one)
        assert [(s.migration_id, s.instance_uuid, s.generation, s.dest_host) for s in seals] \
            == [("m-1", one, 0, "host-b")] * 2
        assert seals[0].sealed_at <= seals[1].sealed_at
        assert [s.dest_host for s in al.seals(other)] == ["host-c"]
    finally:
        al.close()


def test_a_v3_file_gains_the_seal_record(tmp_path):
    path = tmp_path / "v3.sqlite"
    legacy_file(path, 3, ACTIVE)
    al = AssociationList(path)
    try:
        al.record_seal("m-1", "j", 2, "host-b")
        assert [s.migration_id for s in al.seals("j")] == ["m-1"]
    finally:
        al.close()
    assert file_schema(path) == (association.SCHEMA_VERSION, CURRENT_TABLES)


# -- found by mutation testing (tools/mutation.sh association) -----------------

def test_refusals_name_the_instance(alist):
    missing = str(uuid.uuid4())
    with refused(exception.NotFound, "vTPCM of instance %s not found" % missing):
        alist.get(missing)
    with refused(exception.NotFound, "vTPCM of instance %s not found" % missing):
        alist.transition(missing, S.STOPPED)
    rec = _add(alist)
    with refused(exception.AlreadyExists, "vTPCM of instance %s already exists"
                 % rec.instance_uuid):
        _add(alist, instance=rec.instance_uuid)
    with refused(exception.InvalidTransition, "Illegal transition of vTPCM of instance %s "
                 "from CREATING to ACTIVE" % rec.instance_uuid):
        alist.transition(rec.instance_uuid, S.ACTIVE)
    with refused(exception.InvalidTransition, "Illegal transition of vTPCM of instance %s "
                 "from CREATING to STOPPED" % rec.instance_uuid):
        alist.transition(rec.instance_uuid, S.STOPPED, expected=frozenset({S.ACTIVE}))
    with refused(exception.InvalidTransition, "Illegal transition of vTPCM of instance %s "
                 "from (none) to ACTIVE" % missing):
        _add(alist, state=S.ACTIVE, instance=missing)


def test_generation_moves_forward_only_and_is_stored(alist):
    rec = _add(alist, state=S.MIGRATING_IN, generation=3)
    with refused(exception.GenerationMismatch, "vTPCM of instance %s: generation 2 refused, "
                 "authoritative generation is >= 3" % rec.instance_uuid):
        alist.transition(rec.instance_uuid, S.ACTIVE, generation=2)
    assert alist.get(rec.instance_uuid).state is S.MIGRATING_IN
    same = alist.transition(rec.instance_uuid, S.ACTIVE, generation=3, migration_id="m-1",
                            pid=42)
    assert (same.state, same.generation, same.migration_id, same.pid) == \
        (S.ACTIVE, 3, "m-1", 42)
    moved = alist.transition(rec.instance_uuid, S.STOPPED, generation=4, pid=None)
    assert (moved.generation, moved.pid, moved.migration_id) == (4, None, "m-1")
    assert alist.get(rec.instance_uuid).generation == 4


def test_a_tombstone_refusal_names_both_generations(alist):
    rec = _add(alist, generation=2)
    alist.transition(rec.instance_uuid, S.DESTROYED)
    with refused(exception.GenerationMismatch, "vTPCM of instance %s: generation 2 refused, "
                 "authoritative generation is > 2" % rec.instance_uuid):
        _add(alist, state=S.MIGRATING_IN, generation=2, instance=rec.instance_uuid)


def test_a_destroyed_generation_0_lets_generation_1_in(alist):
    rec = _add(alist)
    alist.transition(rec.instance_uuid, S.DESTROYED)
    assert alist.tombstone(rec.instance_uuid) == 0
    again = _add(alist, state=S.MIGRATING_IN, generation=1, instance=rec.instance_uuid)
    assert again.generation == 1


def test_timestamps_are_utc(alist):
    rec = _add(alist)
    assert rec.created_at.endswith("+00:00") and rec.updated_at.endswith("+00:00")


def test_list_leaves_out_tombstones_in_creation_order(alist):
    first, second = _add(alist), _add(alist)
    third = _add(alist)
    alist.transition(second.instance_uuid, S.DESTROYED)
    assert [r.instance_uuid for r in alist.list()] == [first.instance_uuid, third.instance_uuid]
    assert [r.instance_uuid for r in alist.list(include_destroyed=True)] == \
        [first.instance_uuid, second.instance_uuid, third.instance_uuid]


def test_a_list_in_a_new_nested_directory_is_used_from_other_threads(tmp_path):
    import threading
    al = AssociationList(tmp_path / "a" / "b" / "assoc.sqlite")
    try:
        rec = _add(al)
        seen: list[object] = []
        worker = threading.Thread(target=lambda: seen.append(al.get(rec.instance_uuid).state))
        worker.start()
        worker.join(10)
        assert seen == [S.CREATING]
    finally:
        al.close()


def test_a_v4_file_gains_the_swtpm_uids_and_keeps_its_rows(tmp_path):
    path = tmp_path / "v4.sqlite"
    legacy_file(path, 3, ACTIVE)
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE schema_version")
    for statement in association.STEPS[3].split(";"):  # the v4 step, as v4 left it
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    al = AssociationList(path)
    try:
        assert al.get("j").pid == 77
        assert al.assign_uid("j", 5000, 5001) == 5000
    finally:
        al.close()
    assert file_schema(path) == (association.SCHEMA_VERSION, CURRENT_TABLES)


def test_swtpm_uids_are_per_instance_durable_and_freed(tmp_path):
    path = tmp_path / "a.sqlite"
    al = AssociationList(path)
    assert al.assign_uid("a", 5000, 5002) == 5000
    assert al.assign_uid("b", 5000, 5002) == 5001
    assert al.assign_uid("a", 5000, 5002) == 5000  # the one it has
    al.close()
    al = AssociationList(path)  # an agent restart keeps them
    assert (al.uid_of("a"), al.uid_of("b")) == (5000, 5001)
    al.release_uid("a")
    assert al.uid_of("a") is None
    assert al.assign_uid("c", 5000, 5002) == 5002
    al.close()


def test_a_uid_is_never_given_out_twice(tmp_path):
    """Review of the sweep, HIGH 1: a freed uid's previous holder may have
    left a setuid file of the uid that another user holds open: the next
    VM given the uid would be open to that user. Freed, kept or assigned,
    a uid once used is never handed out again; a used-up range names the
    option to widen and records nothing."""
    path = tmp_path / "a.sqlite"
    al = AssociationList(path)
    try:
        assert [al.assign_uid(i, 5000, 5003) for i in "ab"] == [5000, 5001]
        al.release_uid("a")
        assert al.keep_uid("b") == 5001
        assert al.uid_of("b") is None and al.kept_uids() == [("b", 5001)]
        assert al.assign_uid("b", 5000, 5003) == 5002  # not its kept one
        al.release_kept(5001)
        assert 5001 not in [uid for _inst, uid in al.kept_uids()]
        assert al.assign_uid("d", 5000, 5003) == 5003
        with pytest.raises(exception.InvalidInput) as used_up:
            al.assign_uid("e", 5000, 5003)
        assert ("[agent] swtpm_uid_range 5000-5003 is used up: each of its 4 uids ran a "
                "vTPCM once and is never given out again; widen the range") in str(used_up.value)
        assert al.uid_of("e") is None  # the refusal recorded nothing
        assert al.assign_uid("e", 5000, 5004) == 5004  # widened
        al.release_uid("nobody")  # no uid: nothing recorded
    finally:
        al.close()


def test_a_v6_list_starts_above_every_uid_it_recorded_and_moves_kept_ones(tmp_path):
    """A list an older agent wrote: its freed uids were handed out again
    (lowest never-used first, then freed longest ago); from v7 on the
    next uid is above all it recorded, and a uid it kept for an instance
    without a live vTPCM moves aside (so the instance's next vTPCM does not
    get it back)."""
    path = tmp_path / "a.sqlite"
    conn = sqlite3.connect(path)
    for step in association.STEPS[:6]:
        for statement in step.split(";"):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 6")
    conn.execute("INSERT INTO swtpm_uids VALUES ('gone', 5001, 'x')")
    conn.execute("INSERT INTO swtpm_uids_freed VALUES (5003, 1)")
    conn.commit()
    conn.close()
    al = AssociationList(path)
    try:
        assert al.kept_uids() == [("gone", 5001)] and al.uid_of("gone") is None
        # a v6 list gets the floor at the first range's LAST (LOW 5 of review
        # round 3 of the sweep): the next range starts above it
        assert al.uid_headroom(5000, 5009)[0] == 0
        assert al.assign_uid("new", 5000, 5019) == 5010
        assert al.assign_uid("gone", 5000, 5019) == 5011
    finally:
        al.close()
    assert file_schema(path) == (association.SCHEMA_VERSION, CURRENT_TABLES)


def test_the_list_and_its_wal_and_shm_are_the_agents_alone(tmp_path):
    """Every swtpm uid may traverse the state dir: a -wal or -shm file left
    0644 (a umask, another tool) would hand them the list's recent writes.
    An open agent keeps both files, so they are made private at start."""
    path = tmp_path / "a.sqlite"
    holder = AssociationList(path)  # a second connection keeps -wal/-shm
    try:
        holder.add(instance_uuid="i", vtpcm_id="v", state=VTPCMState.CREATING,
                   generation=0, state_dir="/d", ctrl_socket="/c")
        for suffix in ("", "-wal", "-shm"):
            os.chmod(str(path) + suffix, 0o644)
        al = AssociationList(path)
        try:
            for suffix in ("", "-wal", "-shm"):
                assert stat.S_IMODE(os.stat(str(path) + suffix).st_mode) == 0o600, suffix
        finally:
            al.close()
    finally:
        holder.close()


def _older(path, version, assigned=(), freed=()):
    """A list as the agent of schema ``version`` (5 or 6) left it."""
    conn = sqlite3.connect(path)
    for step in association.STEPS[:version]:
        for statement in step.split(";"):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = %d" % version)
    for inst, uid in assigned:
        conn.execute("INSERT INTO swtpm_uids VALUES (?, ?, 'x')", (inst, uid))
    for seq, uid in enumerate(freed, 1):
        conn.execute("INSERT INTO swtpm_uids_freed VALUES (?, ?)", (uid, seq))
    conn.commit()
    conn.close()


def test_a_v5_list_trusts_no_uid_of_the_range_it_ran_with(tmp_path):
    """Review round 2 of the sweep, P1 (p1_upgrade a): a v5 list deleted a
    uid's row when it freed it. Its VMs got 5000, 5001, 5002 (lowest free);
    5002's was destroyed. Upgraded, the list handed out 5002 again. Now no
    uid up to the range's LAST is given out, the error says to take a fresh
    range above it, the floor survives a restart and a fresh range works."""
    path = tmp_path / "v5.sqlite"
    _older(path, 5, assigned=[("A", 5000), ("B", 5001)])
    message = ("Invalid input: [agent] swtpm_uid_range 5000-5999 cannot be used: the "
               "association list was upgraded from schema version 5, which kept no record of "
               "the uids it freed, so every uid up to 5999 may have run a vTPCM and none of "
               "them is given out again; set a fresh [agent] swtpm_uid_range above 5999 (its "
               "FIRST at least 6000)")
    al = AssociationList(path)
    try:
        with refused(exception.InvalidInput, message):
            al.assign_uid("C", 5000, 5999)
        assert al.uid_of("C") is None
    finally:
        al.close()
    al = AssociationList(path)  # a restart keeps the floor at the first LAST
    try:
        with refused(exception.InvalidInput, message):
            al.assign_uid("C", 5000, 5999)
        assert al.assign_uid("C", 6000, 6999) == 6000
        assert al.assign_uid("D", 5000, 7999) == 6001  # uids above the old LAST are fresh
        assert al.uid_headroom(6000, 6999) == (998, (5999, "upgraded from schema version 5, "
                                                     "which kept no record of the uids it "
                                                     "freed"))
    finally:
        al.close()
    assert file_schema(path) == (association.SCHEMA_VERSION, CURRENT_TABLES)


def test_a_v6_list_gets_the_floor_too(tmp_path):
    """Review round 3 of the sweep, LOW 5: main ran schema v6 for a while, so
    a v6 list may be a v5 one upgraded, its v5-era freed uids (here 5001)
    lost. A v6 list cannot tell: it gets the floor, and the error says why."""
    path = tmp_path / "v6.sqlite"
    _older(path, 6, assigned=[("A", 5000)], freed=[5002])
    why = ("upgraded from schema version 6, which may itself have been upgraded from "
           "version 5 (no record of the uids it freed)")
    al = AssociationList(path)
    try:
        with refused(exception.InvalidInput,
                     "Invalid input: [agent] swtpm_uid_range 5000-5009 cannot be used: the "
                     "association list was %s, so every uid up to 5009 may have run a vTPCM "
                     "and none of them is given out again; set a fresh [agent] "
                     "swtpm_uid_range above 5009 (its FIRST at least 5010)" % why):
            al.assign_uid("C", 5000, 5009)
        assert al.uid_headroom(5000, 5009) == (0, (5009, why))
        assert al.assign_uid("C", 5010, 5019) == 5010
    finally:
        al.close()


def test_a_new_list_has_no_floor(tmp_path):
    al = AssociationList(tmp_path / "new.sqlite")
    try:
        left, floor = al.uid_headroom(5000, 5009)
        assert (left, floor) == (10, None)
        assert al.assign_uid("C", 5000, 5009) == 5000
    finally:
        al.close()
