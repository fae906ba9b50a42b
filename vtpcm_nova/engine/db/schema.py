"""How the engine database is connected to, and whether an engine may use it.

Why one module: the per-backend engine options and SQLite's pragmas hold
for every connection (the engine's and ``vtpcm-manage db sync``'s), and
an engine checks the schema revision before its first query. Creating and
upgrading the schema is ``migration``'s job, run by the operator.
"""

from __future__ import annotations

import os
from typing import Any

from oslo_log import log as logging
from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine

from vtpcm_nova.engine.db.store import Store

LOG = logging.getLogger(__name__)


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
    """The schema check an engine runs before anything else."""

    def check_schema(self) -> None:
        """Refuse a database not at this code's alembic head (nothing is
        changed: the operator runs ``vtpcm-manage db sync``)."""
        from vtpcm_nova.engine.db import migration  # it imports this module
        migration.check_at_head(self.engine)

    def schema_revision(self) -> str | None:
        from vtpcm_nova.engine.db import migration
        with self.engine.connect() as conn:
            return migration.current(conn)
