"""Where the engine database's schema is, and moving it to head (alembic).

Why operator-run: an engine never changes its schema on its own. During a
rolling upgrade the operator stops the engines, runs ``vtpcm-manage db
sync`` once, then starts the new engines; an engine finding its database
at any other revision refuses to start and says what to run
(``check_at_head``), so two releases never share one schema by accident.

Databases of the hand-versioned releases (a ``schema_version`` table, v1
to v3, no ``alembic_version``) are brought to v3 by ``legacy`` and stamped
at ``BASE_REVISION``, which is exactly that schema; alembic takes them on
from there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from oslo_log import log as logging
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError

from vtpcm_common import exception
from vtpcm_nova.engine.db import legacy, schema

LOG = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("schema_migrations")
# the first revision: the v3 schema of the last hand-versioned release
BASE_REVISION = "0001"
SYNC_COMMAND = "vtpcm-manage db sync"


def _connect(url: str) -> Engine:
    """An engine for ``url``; a URL that does not parse is an ArgumentError
    that does not repeat the URL (it may hold the password)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ArgumentError("not a database URL") from None
    return schema.connect(parsed)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for our revisions, running on ``connection``
    (also what a contributor drafts a new revision with)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The revision this code's models are at."""
    found = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert found is not None, "no alembic revisions"
    return found


def revisions() -> list[str]:
    """Every revision this code knows, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def current(conn: Connection) -> str | None:
    """The database's alembic revision; None if alembic never ran on it."""
    return MigrationContext.configure(conn).get_current_revision()


def describe(conn: Connection) -> str:
    """Where the schema is, in an operator's words."""
    rev = current(conn)
    if rev is not None:
        return f"revision {rev}"
    old = legacy.version(conn)
    if old is not None:
        return f"schema version {old} of a release before alembic"
    return "empty (no engine schema)"


@dataclasses.dataclass(frozen=True)
class SyncResult:
    before: str
    after: str


def db_sync(url: str, revision: str = "head") -> SyncResult:
    """Upgrade the database at ``url`` to ``revision`` (data kept); what an
    operator runs as ``vtpcm-manage db sync``. Refuses a database at a
    revision this code does not know (a newer release migrated it)."""
    engine = _connect(url)
    try:
        with engine.connect() as conn:
            before = describe(conn)
            _refuse_unknown(conn)
            old = legacy.version(conn) if current(conn) is None else None
        if old is not None:
            legacy.upgrade_to_v3(engine, old)
            with engine.begin() as conn:
                command.stamp(alembic_config(conn), BASE_REVISION)
            LOG.info("Legacy engine schema version %(old)d upgraded to v3, stamped "
                     "%(base)s", {"old": old, "base": BASE_REVISION})
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), revision)
        with engine.connect() as conn:
            after = describe(conn)
    finally:
        engine.dispose()
    if before != after:
        LOG.info("Engine database schema: %(before)s -> %(after)s",
                 {"before": before, "after": after})
    return SyncResult(before, after)


def db_version(url: str) -> str:
    engine = _connect(url)
    try:
        with engine.connect() as conn:
            return describe(conn)
    finally:
        engine.dispose()


def _refuse_unknown(conn: Connection) -> None:
    rev = current(conn)
    if rev is not None and rev not in revisions():
        raise exception.SchemaNotAtHead(
            found=f"revision {rev}", head=head(),
            action="it was migrated by a newer release; run that release's engine "
                   "and vtpcm-manage")


def check_at_head(engine: Engine) -> None:
    """Refuse a database not at this code's head, naming where it is, the
    revision wanted and the command to run (nothing is changed)."""
    with engine.connect() as conn:
        rev = current(conn)
        if rev == head():
            return
        _refuse_unknown(conn)
        found = describe(conn)
    raise exception.SchemaNotAtHead(found=found, head=head(),
                                    action=f"run '{SYNC_COMMAND}' first")
