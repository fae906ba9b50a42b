"""The durable VM-vTPCM association list of one compute node.

One row per instance. SQLite in WAL mode with synchronous=FULL: every change
is one transaction, so a kill -9 at any point leaves either the old or the
new row, never half of one. States move only along ``TRANSITIONS``; an
illegal move raises ``InvalidTransition`` and writes nothing. DESTROYED rows
stay as tombstones: they remember the last generation, so an older
generation of the same instance can never be brought back on this host.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime
import enum
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oslo_log import log as logging

from vtpcm_common import exception

LOG = logging.getLogger(__name__)

_UNSET: Any = object()  # 'leave this column as it is'


class VTPCMState(enum.StrEnum):
    CREATING = "CREATING"
    STOPPED = "STOPPED"
    ACTIVE = "ACTIVE"
    MIGRATING_OUT = "MIGRATING_OUT"
    MIGRATING_IN = "MIGRATING_IN"
    DESTROYED = "DESTROYED"


S = VTPCMState

# Allowed moves. A new row starts in CREATING (local create) or MIGRATING_IN
# (incoming migration); DESTROYED is final.
TRANSITIONS: dict[VTPCMState, frozenset[VTPCMState]] = {
    S.CREATING: frozenset({S.STOPPED, S.DESTROYED}),
    S.STOPPED: frozenset({S.ACTIVE, S.MIGRATING_OUT, S.DESTROYED}),
    S.ACTIVE: frozenset({S.STOPPED, S.MIGRATING_OUT}),
    S.MIGRATING_OUT: frozenset({S.ACTIVE, S.STOPPED, S.DESTROYED}),
    S.MIGRATING_IN: frozenset({S.ACTIVE, S.STOPPED, S.DESTROYED}),
    S.DESTROYED: frozenset(),
}
INITIAL_STATES = frozenset({S.CREATING, S.MIGRATING_IN})


def check_transition(instance_uuid: str, current: VTPCMState, target: VTPCMState) -> None:
    """Raise InvalidTransition unless ``current -> target`` is in the table."""
    if target not in TRANSITIONS[current]:
        raise exception.InvalidTransition(
            what="vTPCM of instance", key=instance_uuid, current=current.value,
            target=target.value)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


@dataclasses.dataclass(frozen=True)
class Association:
    """One VM-vTPCM record. Holds paths and ids, never key material."""

    instance_uuid: str
    vtpcm_id: str
    state: VTPCMState
    generation: int
    migration_id: str | None
    state_dir: str
    ctrl_socket: str
    pid: int | None
    created_at: str
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state"] = self.state.value
        return out


@dataclasses.dataclass(frozen=True)
class SealRecord:
    """One migration key sealed for a destination: which migration, never the key."""

    migration_id: str
    instance_uuid: str
    generation: int
    dest_host: str
    sealed_at: str


_COLUMNS = ("instance_uuid", "vtpcm_id", "state", "generation", "migration_id",
            "state_dir", "ctrl_socket", "pid", "created_at", "updated_at")

# The file's schema moves by ordered steps recorded in ``PRAGMA user_version``
# (0: a new file): STEPS[n - 1] moves it from version n - 1 to n, all in one
# transaction with the version bump. To change the schema, append a step;
# never edit one a release has shipped. Every step tolerates its objects
# existing already (the releases before user_version created them all).
_V1 = """
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
)"""
# v2: tombstone generations kept apart from the rows, so that discarding an
# aborted incoming cannot erase them (the DESTROYED rows there are move in)
_V2 = """
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
INSERT OR REPLACE INTO tombstones
    SELECT instance_uuid, generation, updated_at FROM associations
    WHERE state = 'DESTROYED'"""
# v3: engine-signed command nonces already accepted (replay across restarts)
_V3 = """
CREATE TABLE IF NOT EXISTS command_nonces (
    nonce TEXT PRIMARY KEY,
    keep_until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS command_nonces_keep_until ON command_nonces (keep_until)"""
# v4: the agent's own record of every migration key it sealed (never the key)
_V4 = """
CREATE TABLE IF NOT EXISTS seals (
    migration_id TEXT NOT NULL,
    instance_uuid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    dest_host TEXT NOT NULL,
    sealed_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS seals_instance ON seals (instance_uuid)"""
# v5: the unprivileged uid each instance's swtpm runs as ([agent]
# swtpm_uid_range), kept across restarts of swtpm and of the agent
_V5 = """
CREATE TABLE IF NOT EXISTS swtpm_uids (
    instance_uuid TEXT PRIMARY KEY,
    uid INTEGER NOT NULL UNIQUE,
    assigned_at TEXT NOT NULL
)"""
# v6: when each uid was last freed, so a freed uid is the last one given
# out again (a process of it the agent failed to see gets no new VM soon)
_V6 = """
CREATE TABLE IF NOT EXISTS swtpm_uids_freed (
    uid INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL
)"""
# v7: uids kept aside: their vTPCM is gone (destroyed, discarded) but
# something of the uid remained (a segment another process keeps
# attached); swept again periodically, then recorded as freed. With v7 a
# uid is never given out twice (swtpm_uids, _freed and _kept are every uid
# ever used); the uids an older agent kept in swtpm_uids move here.
_V7 = """
CREATE TABLE IF NOT EXISTS swtpm_uids_kept (
    uid INTEGER PRIMARY KEY,
    instance_uuid TEXT NOT NULL,
    kept_at TEXT NOT NULL
);
INSERT OR IGNORE INTO swtpm_uids_kept SELECT u.uid, u.instance_uuid, u.assigned_at
    FROM swtpm_uids u LEFT JOIN associations a ON a.instance_uuid = u.instance_uuid
    WHERE a.instance_uuid IS NULL OR a.state = 'DESTROYED';
DELETE FROM swtpm_uids WHERE uid IN (SELECT uid FROM swtpm_uids_kept)"""
# v8: a floor below which no uid is trusted as unused. A v5 list deleted
# a uid's row when it freed it, so a list upgraded from v5 knows none of
# the uids it freed: ``upgrade_schema`` records a floor whose uid (NULL
# until the agent's first start with a range) becomes that range's LAST
# (review round 2 of the sweep, P1). A v6 list gets the floor as well: a
# v5 list upgraded to v6 (main ran v6 for a while) lost the v5-era freed
# uids too, and a v6 list cannot tell whether it was one (review round 3
# of the sweep, LOW 5). A v7 list was made by an agent that set the floor.
_V8 = """
CREATE TABLE IF NOT EXISTS swtpm_uid_floor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    uid INTEGER,
    why TEXT NOT NULL,
    since TEXT NOT NULL
)"""
# v9: the FIRSTs of [agent] swtpm_uid_range and qemu_uid_range the uids in
# use were given under: a VM's QEMU uid is computed from both (Q = qemu
# FIRST + U - swtpm FIRST), so moving either while a uid is in use would
# kill and sweep another uid than the VM's QEMU (review of dacbuild round
# 2, LOW 5). qemu_first stays recorded while the range is unset.
_V9 = """
CREATE TABLE IF NOT EXISTS uid_range_firsts (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    swtpm_first INTEGER NOT NULL,
    qemu_first INTEGER,
    since TEXT NOT NULL
)"""
STEPS = (_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9)
# the schemas whose lists may lack the uids they freed: v5 recorded the
# uids it handed out but not those it freed; v6 added swtpm_uids_freed but
# a v6 list may be a v5 one upgraded (its v5-era freed uids lost)
_UIDS_WITHOUT_FREED = (5, 6)
SCHEMA_VERSION = len(STEPS)


def _schema_version(cur: sqlite3.Cursor) -> int:
    """The file's version; a file of a release before user_version keeps
    it in a ``schema_version`` table, which is adopted and dropped here."""
    version = int(cur.execute("PRAGMA user_version").fetchone()[0])
    legacy = cur.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                         "AND name = 'schema_version'").fetchone()
    if version == 0 and legacy is not None:
        row = cur.execute("SELECT version FROM schema_version").fetchone()
        version = 0 if row is None else int(row[0])
        if version <= SCHEMA_VERSION:
            cur.execute("DROP TABLE schema_version")
    return version


def upgrade_schema(cur: sqlite3.Cursor, path: Path) -> int:
    """Run the steps this file lacks (in the caller's transaction); refuse
    a file a newer agent wrote, changing nothing. Returns the old version."""
    found = _schema_version(cur)
    if found > SCHEMA_VERSION:
        raise exception.NewerSchema(what=f"Association list {path}", found=found,
                                    known=SCHEMA_VERSION)
    for step in STEPS[found:]:
        for statement in step.split(";"):
            cur.execute(statement)
    if found in _UIDS_WITHOUT_FREED:
        cur.execute("INSERT OR IGNORE INTO swtpm_uid_floor VALUES (1, NULL, ?, ?)",
                    (("upgraded from schema version 5, which kept no record of the uids "
                      "it freed" if found == 5 else
                      "upgraded from schema version 6, which may itself have been upgraded "
                      "from version 5 (no record of the uids it freed)"), _now()))
    cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
    return found


def _private(path: Path) -> None:
    """The list (and its WAL and shared-memory files, which SQLite creates
    with the database's mode) readable by the agent only, whatever the
    umask: the state dir is traversable by every swtpm uid."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    for name in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
        if name.exists():
            os.chmod(name, 0o600)


def floor_advice(first: int, last: int, floor: int, why: str) -> str:
    """What the operator must do about a floor at or above the range's end."""
    return ("[agent] swtpm_uid_range %d-%d cannot be used: the association list was %s, so "
            "every uid up to %d may have run a vTPCM and none of them is given out again; "
            "set a fresh [agent] swtpm_uid_range above %d (its FIRST at least %d)"
            % (first, last, why, floor, floor, floor + 1))


class AssociationList:
    """The association list backed by one SQLite file."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        _private(self._path)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self._path), isolation_level=None,
                                     check_same_thread=False, timeout=10.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._transaction() as cur:
            found = upgrade_schema(cur, self._path)
        if found not in (0, SCHEMA_VERSION):
            LOG.info("Association list %(path)s upgraded from schema version %(old)d to "
                     "%(new)d", {"path": self._path, "old": found, "new": SCHEMA_VERSION})

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")

    @staticmethod
    def _row(row: tuple[Any, ...]) -> Association:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["state"] = VTPCMState(values["state"])
        return Association(**values)

    def _fetch(self, cur: sqlite3.Cursor, instance_uuid: str) -> Association | None:
        row = cur.execute(
            "SELECT %s FROM associations WHERE instance_uuid = ?" % ", ".join(_COLUMNS),  # noqa: S608 (fixed column names)
            (instance_uuid,)).fetchone()
        return self._row(row) if row else None

    def get(self, instance_uuid: str) -> Association:
        with self._transaction() as cur:
            assoc = self._fetch(cur, instance_uuid)
        if assoc is None:
            raise exception.NotFound(what="vTPCM of instance", key=instance_uuid)
        return assoc

    def find(self, instance_uuid: str) -> Association | None:
        with self._transaction() as cur:
            return self._fetch(cur, instance_uuid)

    def list(self, include_destroyed: bool = False) -> list[Association]:
        sql = "SELECT %s FROM associations" % ", ".join(_COLUMNS)  # noqa: S608 (fixed column names)
        if not include_destroyed:
            sql += " WHERE state != 'DESTROYED'"
        with self._transaction() as cur:
            rows = cur.execute(sql + " ORDER BY created_at").fetchall()
        return [self._row(r) for r in rows]

    def add(self, *, instance_uuid: str, vtpcm_id: str, state: VTPCMState,
            generation: int, state_dir: str, ctrl_socket: str,
            migration_id: str | None = None) -> Association:
        """Insert a new record; a tombstone with a generation >= ours refuses it."""
        if state not in INITIAL_STATES:
            raise exception.InvalidTransition(
                what="vTPCM of instance", key=instance_uuid, current="(none)",
                target=state.value)
        now = _now()
        with self._transaction() as cur:
            existing = self._fetch(cur, instance_uuid)
            if existing is not None and existing.state is not S.DESTROYED:
                raise exception.AlreadyExists(what="vTPCM of instance", key=instance_uuid)
            tombstone = self._tombstone(cur, instance_uuid)
            if tombstone is not None and generation <= tombstone:
                raise exception.GenerationMismatch(
                    instance_uuid=instance_uuid, given=generation,
                    expected="> %d" % tombstone)
            if existing is not None:
                cur.execute("DELETE FROM associations WHERE instance_uuid = ?",
                            (instance_uuid,))
            cur.execute(
                "INSERT INTO associations (%s) VALUES (%s)"  # noqa: S608 (fixed column names)
                % (", ".join(_COLUMNS), ", ".join("?" * len(_COLUMNS))),
                (instance_uuid, vtpcm_id, state.value, generation, migration_id,
                 state_dir, ctrl_socket, None, now, now))
            created = self._fetch(cur, instance_uuid)
        assert created is not None
        LOG.info("vTPCM %(vtpcm)s of instance %(instance)s recorded as %(state)s "
                 "(generation %(gen)d)",
                 {"vtpcm": vtpcm_id, "instance": instance_uuid, "state": state.value,
                  "gen": generation})
        return created

    def transition(self, instance_uuid: str, target: VTPCMState, *,
                   expected: frozenset[VTPCMState] | None = None,
                   generation: int | None = None,
                   migration_id: Any = _UNSET, pid: Any = _UNSET) -> Association:
        """Move a record to ``target`` in one transaction.

        ``expected`` narrows the allowed current states further (a caller that
        only acts from MIGRATING_OUT says so). ``generation`` may only grow.
        """
        with self._transaction() as cur:
            current = self._fetch(cur, instance_uuid)
            if current is None:
                raise exception.NotFound(what="vTPCM of instance", key=instance_uuid)
            if expected is not None and current.state not in expected:
                raise exception.InvalidTransition(
                    what="vTPCM of instance", key=instance_uuid,
                    current=current.state.value, target=target.value)
            if current.state is not target:
                check_transition(instance_uuid, current.state, target)
            sets: dict[str, Any] = {"state": target.value, "updated_at": _now()}
            if generation is not None:
                if generation < current.generation:
                    raise exception.GenerationMismatch(
                        instance_uuid=instance_uuid, given=generation,
                        expected=">= %d" % current.generation)
                sets["generation"] = generation
            if migration_id is not _UNSET:
                sets["migration_id"] = migration_id
            if pid is not _UNSET:
                sets["pid"] = pid
            if target is S.DESTROYED:
                self._record_tombstone(cur, instance_uuid,
                                       max(current.generation, generation or 0))
            cur.execute(
                "UPDATE associations SET %s WHERE instance_uuid = ?"  # noqa: S608 (fixed column names)
                % ", ".join("%s = ?" % k for k in sets),
                (*sets.values(), instance_uuid))
            updated = self._fetch(cur, instance_uuid)
        assert updated is not None
        if current.state is not target:
            LOG.info("vTPCM of instance %(instance)s: %(old)s -> %(new)s "
                     "(generation %(gen)d)",
                     {"instance": instance_uuid, "old": current.state.value,
                      "new": target.value, "gen": updated.generation})
        return updated

    def set_pid(self, instance_uuid: str, pid: int | None) -> Association:
        """Record the swtpm pid without changing the state."""
        current = self.get(instance_uuid)
        return self.transition(instance_uuid, current.state,
                               expected=frozenset({current.state}), pid=pid)

    def forget(self, instance_uuid: str, vtpcm_id: str) -> None:
        """Delete a record that never went live (CREATING, MIGRATING_IN).

        Only those states: a live or destroyed vTPCM keeps its row (tombstone)."""
        with self._transaction() as cur:
            cur.execute(
                "DELETE FROM associations WHERE instance_uuid = ? AND vtpcm_id = ? "
                "AND state IN ('CREATING', 'MIGRATING_IN')", (instance_uuid, vtpcm_id))

    # --- tombstones and aborted migrations --------------------------------

    @staticmethod
    def _tombstone(cur: sqlite3.Cursor, instance_uuid: str) -> int | None:
        row = cur.execute("SELECT generation FROM tombstones WHERE instance_uuid = ?",
                          (instance_uuid,)).fetchone()
        return int(row[0]) if row else None

    def _record_tombstone(self, cur: sqlite3.Cursor, instance_uuid: str,
                          generation: int) -> None:
        previous = self._tombstone(cur, instance_uuid)
        cur.execute("INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?)",
                    (instance_uuid, max(generation, previous or 0), _now()))

    def tombstone(self, instance_uuid: str) -> int | None:
        """Highest generation of this instance that was live here and left."""
        with self._transaction() as cur:
            return self._tombstone(cur, instance_uuid)

    def record_aborted(self, migration_id: str, instance_uuid: str) -> None:
        """Remember an aborted migration: its late or replayed steps are refused."""
        with self._transaction() as cur:
            cur.execute("INSERT OR IGNORE INTO aborted_migrations VALUES (?, ?, ?)",
                        (migration_id, instance_uuid, _now()))

    def was_aborted(self, migration_id: str) -> bool:
        with self._transaction() as cur:
            return cur.execute("SELECT 1 FROM aborted_migrations WHERE migration_id = ?",
                               (migration_id,)).fetchone() is not None

    def record_seal(self, migration_id: str, instance_uuid: str, generation: int,
                    dest_host: str) -> None:
        """Remember that this host sealed an instance's migration key for
        ``dest_host``: the agent's own record of every key that left it
        (a retried seal adds a row), which audits and tests read."""
        with self._transaction() as cur:
            cur.execute("INSERT INTO seals VALUES (?, ?, ?, ?, ?)",
                        (migration_id, instance_uuid, generation, dest_host, _now()))

    def seals(self, instance_uuid: str) -> builtins.list[SealRecord]:
        """Every seal of ``instance_uuid``'s migration key, oldest first."""
        with self._transaction() as cur:
            rows = cur.execute("SELECT migration_id, instance_uuid, generation, dest_host, "
                               "sealed_at FROM seals WHERE instance_uuid = ? "
                               "ORDER BY rowid", (instance_uuid,)).fetchall()
        return [SealRecord(*row) for row in rows]

    # --- per-instance swtpm uids -------------------------------------------

    def assign_uid(self, instance_uuid: str, first: int, last: int) -> int:
        """The uid of ``instance_uuid``'s swtpm: the one it has, else the
        next never-used one of ``first``..``last``: one above the highest
        uid of the range this list ever recorded (assigned, kept or freed),
        recorded in the same transaction, so two instances never share one.

        A uid is never given out twice: a freed uid's previous holder may
        have left what the kernel still ties to it (a setuid file of the
        uid some other user holds open, review of the sweep, HIGH 1), which
        no sweep can reach. A used-up range is an error naming the option."""
        with self._transaction() as cur:  # a floor fixed here stays, whatever follows
            self._floor(cur, last)
        with self._transaction() as cur:
            row = cur.execute("SELECT uid FROM swtpm_uids WHERE instance_uuid = ?",
                              (instance_uuid,)).fetchone()
            if row is not None:
                return int(row[0])
            floor = self._floor(cur, last)
            mark = self._mark(cur, first, last)
            free = first if mark is None else mark + 1
            if floor is not None and floor[0] >= free:
                free = floor[0] + 1
                if free > last:
                    raise exception.InvalidInput(reason=floor_advice(first, last, *floor))
            if free > last:
                raise exception.InvalidInput(
                    reason="[agent] swtpm_uid_range %d-%d is used up: each of its %d uids "
                           "ran a vTPCM once and is never given out again; widen the range "
                           "(raise LAST, or give uids above it)"
                           % (first, last, last - first + 1))
            cur.execute("INSERT INTO swtpm_uids VALUES (?, ?, ?)",
                        (instance_uuid, free, _now()))
        LOG.info("swtpm of instance %(instance)s runs as uid %(uid)d",
                 {"instance": instance_uuid, "uid": free})
        return free

    @staticmethod
    def _mark(cur: sqlite3.Cursor, first: int, last: int) -> int | None:
        mark = cur.execute(
            "SELECT MAX(uid) FROM (SELECT uid FROM swtpm_uids UNION ALL "
            "SELECT uid FROM swtpm_uids_freed UNION ALL SELECT uid FROM swtpm_uids_kept) "
            "WHERE uid BETWEEN ? AND ?", (first, last)).fetchone()[0]
        return None if mark is None else int(mark)

    @staticmethod
    def _floor(cur: sqlite3.Cursor, last: int) -> tuple[int, str] | None:
        """The uid no uid at or below which is given out, and why (None:
        none); a floor an upgrade recorded before any range was known
        becomes ``last`` here, for good."""
        row = cur.execute("SELECT uid, why FROM swtpm_uid_floor WHERE id = 1").fetchone()
        if row is None:
            return None
        if row[0] is None:
            cur.execute("UPDATE swtpm_uid_floor SET uid = ? WHERE id = 1", (last,))
            return last, str(row[1])
        return int(row[0]), str(row[1])

    def uid_headroom(self, first: int, last: int) -> tuple[int, tuple[int, str] | None]:
        """At the agent's start: how many uids of ``first``..``last`` are
        left to give out, and the floor (uid, why) if one is recorded (the
        floor of an upgraded list is fixed to ``last`` here)."""
        with self._transaction() as cur:
            floor = self._floor(cur, last)
            mark = self._mark(cur, first, last)
        above = first if mark is None else mark + 1
        if floor is not None:
            above = max(above, floor[0] + 1)
        return max(0, last - max(above, first) + 1), floor

    def check_range_firsts(self, swtpm_first: int, qemu_first: int | None,
                           swtpm_last: int | None = None,
                           qemu_last: int | None = None) -> None:
        """Record the ranges' FIRSTs the uids are given under; refuse
        (``InvalidInput``, nothing changed):

        - a FIRST that moved once any uid was given out (in use, kept
          aside or freed; not a floor, whose advice is a FIRST above it):
          a VM's QEMU uid is the qemu
          FIRST plus its swtpm uid's offset, so a moved FIRST would pair a
          new swtpm uid with a QEMU uid some VM already ran as, or with a
          freed swtpm uid (review of the DAC label round 3, LOW 2);
        - a swtpm LAST below a uid in use or kept aside (round 3, LOW 3);
        - a swtpm range over the QEMU uids given out;
        - a qemu range set where none was recorded that holds a uid once
          given out as a swtpm uid.

        A qemu FIRST recorded stays while ``qemu_uid_range`` is unset once
        any uid was given out (guests may still run labelled, and their
        QEMU uids are computed from it: ``InstanceManager.qemu_uid_for``)."""
        with self._transaction() as cur:
            in_use = cur.execute("SELECT (SELECT COUNT(*) FROM swtpm_uids) + "
                                 "(SELECT COUNT(*) FROM swtpm_uids_kept)").fetchone()[0]
            freed = cur.execute("SELECT COUNT(*) FROM swtpm_uids_freed").fetchone()[0]
            # a floor does not count: it comes from a v5/v6 list, whose uids
            # never had a QEMU uid, and its advice is a FIRST above it
            given = bool(in_use or freed)
            row = cur.execute("SELECT swtpm_first, qemu_first FROM uid_range_firsts "
                              "WHERE id = 1").fetchone()
            if given and row is not None:
                for option, was, now in (("swtpm_uid_range", row[0], swtpm_first),
                                         ("qemu_uid_range", row[1], qemu_first)):
                    if was is not None and now is not None and was != now:
                        raise exception.InvalidInput(reason=(
                            "[agent] %s starts at %d, but uids were given out while it "
                            "started at %d (%d in use or kept aside, %d freed; a freed "
                            "uid and the QEMU uid paired with it are never given out "
                            "again): a VM's QEMU uid is computed from both FIRSTs, and a "
                            "moved FIRST would give one out again; set its FIRST back to "
                            "%d and widen the range by raising LAST only"
                            % (option, now, was, in_use, freed, was)))
            if swtpm_last is not None and in_use:
                highest = int(cur.execute(
                    "SELECT MAX(uid) FROM (SELECT uid FROM swtpm_uids UNION ALL "
                    "SELECT uid FROM swtpm_uids_kept)").fetchone()[0])
                if highest > swtpm_last:
                    raise exception.InvalidInput(reason=(
                        "[agent] swtpm_uid_range ends at %d, below swtpm uid %d, in use or "
                        "kept aside (a range shrinks only above the uids it has in use); "
                        "set its LAST back to at least %d" % (swtpm_last, highest, highest)))
            recorded_qemu = None if row is None else row[1]
            if given and row is not None and recorded_qemu is not None \
                    and swtpm_last is not None:
                # the QEMU uids given out: never a swtpm uid (LAST raised
                # into them while qemu_uid_range is unset)
                top = int(cur.execute(
                    "SELECT MAX(uid) FROM (SELECT uid FROM swtpm_uids UNION ALL SELECT uid "
                    "FROM swtpm_uids_kept UNION ALL SELECT uid FROM swtpm_uids_freed)"
                ).fetchone()[0])
                low, high = recorded_qemu, recorded_qemu + top - row[0]
                if swtpm_first <= high and low <= swtpm_last:
                    raise exception.InvalidInput(reason=(
                        "[agent] swtpm_uid_range %d-%d overlaps the QEMU uids given out "
                        "(%d-%d: qemu_uid_range started at %d); a QEMU uid is never given "
                        "out again, as a swtpm uid either: keep the range's LAST below %d"
                        % (swtpm_first, swtpm_last, low, high, low, low)))
            if qemu_first is not None and qemu_last is not None and recorded_qemu is None:
                clash = cur.execute(
                    "SELECT MIN(uid) FROM (SELECT uid FROM swtpm_uids UNION ALL "
                    "SELECT uid FROM swtpm_uids_kept UNION ALL SELECT uid FROM "
                    "swtpm_uids_freed) WHERE uid BETWEEN ? AND ?",
                    (qemu_first, qemu_last)).fetchone()[0]
                if clash is not None:
                    raise exception.InvalidInput(reason=(
                        "[agent] qemu_uid_range %d-%d holds uid %d, once given out as a "
                        "swtpm uid (never given out again); choose a qemu_uid_range no "
                        "swtpm uid was ever given from" % (qemu_first, qemu_last, clash)))
            if qemu_first is None:
                qemu_first = recorded_qemu if given else None
            cur.execute("INSERT OR REPLACE INTO uid_range_firsts VALUES (1, ?, ?, ?)",
                        (swtpm_first, qemu_first, _now()))

    def range_firsts(self) -> tuple[int, int | None] | None:
        """The recorded FIRSTs (swtpm, qemu) the uids were given under
        (None: none recorded yet)."""
        with self._transaction() as cur:
            row = cur.execute("SELECT swtpm_first, qemu_first FROM uid_range_firsts "
                              "WHERE id = 1").fetchone()
        if row is None:
            return None
        return int(row[0]), None if row[1] is None else int(row[1])

    def held_uids(self) -> tuple[builtins.list[int], builtins.list[int]]:
        """The swtpm uids in use (assigned to an instance) and those kept
        aside, each ascending: every uid whose processes and files the agent
        must still kill and sweep (a freed uid is clean)."""
        with self._transaction() as cur:
            in_use = cur.execute("SELECT uid FROM swtpm_uids ORDER BY uid").fetchall()
            kept = cur.execute("SELECT uid FROM swtpm_uids_kept ORDER BY uid").fetchall()
        return [int(r[0]) for r in in_use], [int(r[0]) for r in kept]

    def uid_of(self, instance_uuid: str) -> int | None:
        with self._transaction() as cur:
            row = cur.execute("SELECT uid FROM swtpm_uids WHERE instance_uuid = ?",
                              (instance_uuid,)).fetchone()
        return int(row[0]) if row else None

    def kept_uids(self) -> builtins.list[tuple[str, int]]:
        """(instance, uid) of the uids kept aside (``keep_uid``) and of those
        still recorded for an instance that has no vTPCM here any more (an
        agent that died between forgetting a record and freeing its uid)."""
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT instance_uuid, uid FROM swtpm_uids_kept UNION "
                "SELECT u.instance_uuid, u.uid FROM swtpm_uids u LEFT JOIN associations a "
                "ON a.instance_uuid = u.instance_uuid WHERE a.instance_uuid IS NULL "
                "OR a.state = ? ORDER BY 2", (VTPCMState.DESTROYED.value,)).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    def keep_uid(self, instance_uuid: str) -> int | None:
        """Set the uid of an instance whose vTPCM went aside: something of
        it remains, so it is neither freed nor the instance's any more (a
        new vTPCM of the instance gets a new uid). Returns the uid."""
        with self._transaction() as cur:
            row = cur.execute("SELECT uid FROM swtpm_uids WHERE instance_uuid = ?",
                              (instance_uuid,)).fetchone()
            if row is None:
                return None
            cur.execute("INSERT OR REPLACE INTO swtpm_uids_kept VALUES (?, ?, ?)",
                        (int(row[0]), instance_uuid, _now()))
            cur.execute("DELETE FROM swtpm_uids WHERE instance_uuid = ?", (instance_uuid,))
        return int(row[0])

    def release_kept(self, uid: int) -> None:
        """A kept uid found clean: recorded as freed (never given out again)."""
        with self._transaction() as cur:
            seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM swtpm_uids_freed"
                              ).fetchone()[0]
            cur.execute("INSERT OR REPLACE INTO swtpm_uids_freed VALUES (?, ?)",
                        (uid, int(seq)))
            cur.execute("DELETE FROM swtpm_uids_kept WHERE uid = ?", (uid,))
            cur.execute("DELETE FROM swtpm_uids WHERE uid = ?", (uid,))

    def release_uid(self, instance_uuid: str) -> None:
        """Free the uid of an instance whose vTPCM left this host (its swtpm
        stopped, every process of its uid was killed and its files are gone);
        recorded as freed, so it is never given out again."""
        with self._transaction() as cur:
            row = cur.execute("SELECT uid FROM swtpm_uids WHERE instance_uuid = ?",
                              (instance_uuid,)).fetchone()
            if row is None:
                return
            seq = cur.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM swtpm_uids_freed"
                              ).fetchone()[0]
            cur.execute("INSERT OR REPLACE INTO swtpm_uids_freed VALUES (?, ?)",
                        (int(row[0]), int(seq)))
            cur.execute("DELETE FROM swtpm_uids WHERE instance_uuid = ?", (instance_uuid,))

    def claim_nonce(self, nonce: str, keep_until: float, now: float) -> bool:
        """Record an engine command's nonce; False if it was seen before.

        Durable (synchronous=FULL), so a command replayed after an agent
        restart is still refused; entries past ``keep_until`` are dropped in
        the same transaction."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM command_nonces WHERE keep_until < ?", (now,))
            cur.execute("INSERT OR IGNORE INTO command_nonces VALUES (?, ?)",
                        (nonce, keep_until))
            return cur.rowcount == 1
