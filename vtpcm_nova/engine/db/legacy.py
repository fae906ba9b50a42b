"""Databases of the releases before alembic (schema versions 1 to 3).

Why kept: an engine of those releases created and upgraded its schema
itself and recorded it in ``schema_version``. ``vtpcm-manage db sync``
brings such a database to v3 here, with the rows there are, then stamps it
at the first alembic revision (the v3 schema). The definitions below are
frozen copies of what v2 and v3 added: they must not follow the models.
"""

from __future__ import annotations

import datetime
from typing import Any

from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from oslo_log import log as logging
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine

from vtpcm_common import exception
from vtpcm_nova.engine.db.keys import KEY_KINDS, host_keys

LOG = logging.getLogger(__name__)

LAST_VERSION = 3

_frozen = MetaData()
_v2_command_nonces = Table(
    "command_nonces", _frozen,
    Column("nonce", String(64), primary_key=True),
    Column("keep_until", Float, nullable=False, index=True))
_v3_enrolled_keys = Table(
    "enrolled_keys", _frozen,
    Column("kind", String(16), primary_key=True),
    Column("digest", String(64), primary_key=True),
    Column("host", String(255), nullable=False, index=True),
    Column("enrolled_at", DateTime, nullable=False))


def _added_columns() -> list[tuple[str, Column[Any]]]:
    """(table, column) v2 and v3 added to tables there were (new objects:
    a Column belongs to the one table it is added to)."""
    return [("hosts", Column("command_public", LargeBinary, nullable=True)),
            ("hosts", Column("revision", Integer, nullable=False, server_default=text("0"))),
            ("policies", Column("revision", Integer, nullable=False,
                                server_default=text("0")))]


_schema_version = Table("schema_version", MetaData(),
                        Column("id", Integer, primary_key=True),
                        Column("version", Integer))


def version(conn: Connection) -> int | None:
    """The hand-recorded schema version, None if there is none."""
    if not inspect(conn).has_table("schema_version"):
        return None
    found = conn.execute(select(_schema_version.c.version)
                         .where(_schema_version.c.id == 1)).scalar()
    # no row: that engine stopped between creating its tables and recording
    # their version; every step below tolerates what it finds, so start at 1
    return 1 if found is None else int(found)


def upgrade_to_v3(engine: Engine, found: int) -> None:
    """Bring a v1/v2/v3 database to v3 with its rows (what the v3 engine
    did at start): the tables and columns later versions added, then, from
    v1 or v2, the binding of the enrolled keys to their host names."""
    if found > LAST_VERSION:
        raise exception.SchemaNotAtHead(
            found=f"schema version {found} of a release before alembic",
            head=f"schema version {LAST_VERSION} to start from",
            action="no release made that version; restore the database from a backup")
    with engine.begin() as conn:
        ops = Operations(MigrationContext.configure(conn))
        present = set(inspect(conn).get_table_names())
        for table in (_v2_command_nonces, _v3_enrolled_keys):
            if table.name not in present:
                table.create(conn)
        for table_name, column in _added_columns():
            have = {c["name"] for c in inspect(conn).get_columns(table_name)}
            if column.name not in have:
                ops.add_column(table_name, column)
    if found < 3:
        _record_enrolled_keys(engine)
    with engine.begin() as conn:
        conn.execute(_schema_version.delete())
        conn.execute(_schema_version.insert().values(id=1, version=LAST_VERSION))


def _record_enrolled_keys(engine: Engine) -> None:
    """v2 -> v3: bind the keys of the hosts there are to their names.
    Where old rules let two names share a key, a host in service wins
    over a REVOKED one, then the first enrolled. EK certificates are not
    bound: v2 never proved them (no credential activation), and binding
    one would let that name squat the TPM's enrollment."""
    with engine.begin() as conn:
        hosts = conn.execute(text(
            "SELECT name, ak_name, command_public, enrolled_at FROM hosts "
            "ORDER BY CASE WHEN status = 'REVOKED' THEN 1 ELSE 0 END, enrolled_at, id")).all()
        owners: dict[tuple[str, str], str] = {
            (kind, digest): host for kind, digest, host in conn.execute(
                select(_v3_enrolled_keys.c.kind, _v3_enrolled_keys.c.digest,
                       _v3_enrolled_keys.c.host))}
        bound = set(owners)
        for name, ak_name, command_public, enrolled_at in hosts:
            for kind, digest in host_keys(ak_name, command_public, None, None):
                owner = owners.setdefault((kind, digest), name)
                if owner != name:
                    LOG.warning("Hosts %(a)s and %(b)s share an %(what)s; it stays bound "
                                "to %(a)s", {"a": owner, "b": name, "what": KEY_KINDS[kind]})
                    continue
                if (kind, digest) in bound:
                    continue
                bound.add((kind, digest))
                conn.execute(_v3_enrolled_keys.insert().values(
                    kind=kind, digest=digest, host=name, enrolled_at=_naive(enrolled_at)))


def _naive(at: datetime.datetime | str) -> datetime.datetime:
    """Stored naive UTC on every backend, as the engine writes it."""
    if isinstance(at, str):  # SQLite through a text() query
        at = datetime.datetime.fromisoformat(at)
    return at.replace(tzinfo=None)
