"""How the engine database is connected to, created and upgraded.

Why one module: the per-backend engine options, SQLite's pragmas and the
schema version checks decide together whether an engine may use a
database at all (it refuses a newer schema before changing anything),
and several engine processes may run them at once on one URL, so every
step tolerates another process having done it first.
"""

from __future__ import annotations

import os
from typing import Any

from oslo_log import log as logging
from sqlalchemy import Column, create_engine, event, inspect, select, text
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.schema import CreateColumn

from vtpcm_common import exception
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.keys import KEY_KINDS, host_keys
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.db.store import Store

LOG = logging.getLogger(__name__)

# columns added to tables of older schemas, which create_all cannot add
ADDED_COLUMNS = (("hosts", "command_public"),  # v2
                 ("hosts", "revision"),  # v3
                 ("policies", "revision"))  # v3


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
    finally:
        cur.close()


def connect(parsed: URL) -> Engine:
    """An engine for ``parsed``: SQLite gets its directory, a lock timeout
    and its pragmas on every connection; other backends a pre-ping."""
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)) or ".",
                        mode=0o700, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class SchemaStore(Store):
    """Create missing tables and columns, upgrade, and report the version."""

    def create_schema(self) -> None:
        """Create missing tables and record the schema version (refuse a newer DB
        before changing anything in it)."""
        if inspect(self.engine).has_table("schema_version"):
            with self.session() as s:
                found = s.get(models.SchemaVersion, 1)
                if found is not None and found.version > models.SCHEMA_VERSION:
                    raise exception.InvalidInput(
                        reason=f"database schema version {found.version} is newer than "
                               f"this engine's {models.SCHEMA_VERSION}")
        models.Base.metadata.create_all(self.engine)
        self._add_missing_columns()
        with self.session() as s:
            row = s.get(models.SchemaVersion, 1)
            if row is None:
                s.add(models.SchemaVersion(id=1, version=models.SCHEMA_VERSION))
                try:
                    s.flush()
                except IntegrityError:
                    s.rollback()  # another process created it first
                    row = s.get(models.SchemaVersion, 1)
            if row is not None and row.version > models.SCHEMA_VERSION:
                raise exception.InvalidInput(
                    reason=f"database schema version {row.version} is newer than this "
                           f"engine's {models.SCHEMA_VERSION}")
            if row is not None and row.version < models.SCHEMA_VERSION:
                # upgrades add tables (create_all made them), columns
                # (_add_missing_columns) and, for v3, fill enrolled_keys
                if row.version < 3:
                    self._record_enrolled_keys()
                LOG.info("Engine database schema upgraded from version %d to %d",
                         row.version, models.SCHEMA_VERSION)
                row.version = models.SCHEMA_VERSION

    def _add_missing_columns(self) -> None:
        """Upgrade step create_all cannot do: new columns of old tables
        (``ADDED_COLUMNS``; each nullable or with a server default)."""
        for table, name in ADDED_COLUMNS:
            self._add_column(models.Base.metadata.tables[table].c[name])

    def _add_column(self, column: Column[Any]) -> None:
        table = column.table.name
        if column.name in self._columns(table):
            return
        ddl = "ALTER TABLE %s ADD COLUMN %s" % (
            table, CreateColumn(column).compile(dialect=self.engine.dialect))
        try:
            with self.engine.begin() as conn:
                conn.execute(text(ddl))
        except DBAPIError:
            # another engine process added it first
            if column.name not in self._columns(table):
                raise

    def _columns(self, table: str) -> set[str]:
        return {c["name"] for c in inspect(self.engine).get_columns(table)}

    def _record_enrolled_keys(self) -> None:
        """v2 -> v3: bind the keys of the hosts there are to their names.
        Where old rules let two names share a key, a host in service wins
        over a REVOKED one, then the first enrolled. EK certificates are
        not bound: v2 never proved them (no credential activation), and
        binding one would let that name squat the TPM's enrollment."""
        revoked = models.Host.status == HostStatus.REVOKED.value
        with self.session() as s:
            hosts = [(h.name, host_keys(h.ak_name, h.command_public, None, None),
                      h.enrolled_at)
                     for h in s.scalars(select(models.Host)
                                        .order_by(revoked, models.Host.enrolled_at))]
        for name, keys, at in hosts:
            for kind, digest in keys:
                try:
                    with self.session() as s:
                        owner = s.get(models.EnrolledKey, (kind, digest))
                        if owner is None:
                            s.add(models.EnrolledKey(kind=kind, digest=digest, host=name,
                                                     enrolled_at=at))
                        elif owner.host != name:
                            LOG.warning("Hosts %(a)s and %(b)s share an %(what)s; it stays "
                                        "bound to %(a)s", {"a": owner.host, "b": name,
                                                            "what": KEY_KINDS[kind]})
                except IntegrityError:
                    continue  # another engine process recorded it first

    def schema_version(self) -> int:
        with self.session() as s:
            row = s.get(models.SchemaVersion, 1)
            return 0 if row is None else row.version
