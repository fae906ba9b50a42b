"""Typed access to the engine database: ``Database`` and its records.

Why a thin function layer: callers (attestation, migration coordinator,
scheduler filter) get frozen records, never ORM objects bound to a session,
and every check-then-change that guards a security property (single-use
nonce, vTPCM location/generation, migration state) is ONE conditional UPDATE
whose rowcount decides, so it stays correct with several engine processes on
one database. Where a change needs several statements (a verdict and the
host it speaks for), the transaction starts with a conditional UPDATE of the
host row (``store.Store._update_host``).

Why a facade: the queries live per area, one mixin each (``schema``,
``hosts``, ``keys``, ``trust``, ``policies``, ``vtpcms``, ``migrations``,
``nonces``, ``audit``, ``workers``, on ``store.Store``); ``Database`` composes them, so a
method spanning areas still runs in one session, and callers keep importing
everything from here.
"""

from __future__ import annotations

import secrets  # noqa: F401 - tests patch api.secrets.token_bytes

from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import sessionmaker

from vtpcm_nova.engine.db import schema
from vtpcm_nova.engine.db.audit import AuditStore
from vtpcm_nova.engine.db.hosts import HostStore
from vtpcm_nova.engine.db.keys import KEY_KINDS
from vtpcm_nova.engine.db.migrations import (
    AuditEntry,
    BeginView,
    CommitPoint,
    MigrationStore,
    VtpcmClaim,
)
from vtpcm_nova.engine.db.nonces import NONCE_BYTES, NonceStore
from vtpcm_nova.engine.db.policies import PolicyStore
from vtpcm_nova.engine.db.records import (
    AbandonedRecord,
    AuditRecord,
    HostRecord,
    MigrationRecord,
    PolicyRecord,
    TrustBasis,
    VerdictRecord,
    VtpcmRecord,
)
from vtpcm_nova.engine.db.schema import SchemaStore
from vtpcm_nova.engine.db.store import utcnow
from vtpcm_nova.engine.db.vtpcms import VtpcmStore
from vtpcm_nova.engine.db.witnesses import WitnessRecord, WitnessStore
from vtpcm_nova.engine.db.workers import WorkerStore

__all__ = ["DEFAULT_URL", "KEY_KINDS", "NONCE_BYTES", "AbandonedRecord", "AuditEntry",
           "AuditRecord", "BeginView", "CommitPoint", "Database", "HostRecord",
           "MigrationRecord", "PolicyRecord", "TrustBasis", "VerdictRecord", "VtpcmClaim",
           "VtpcmRecord", "WitnessRecord", "utcnow"]

DEFAULT_URL = "sqlite:////var/lib/vtpcm/engine.sqlite"


class Database(SchemaStore, HostStore, PolicyStore, VtpcmStore, MigrationStore, NonceStore,
               AuditStore, WorkerStore, WitnessStore):
    """One engine database; safe to have several (processes or objects) on one URL."""

    def __init__(self, url: str = DEFAULT_URL, *, check_schema: bool = True) -> None:
        """``check_schema``: refuse (``SchemaNotAtHead``) a database not at
        this code's revision; the schema is moved by ``migration.db_sync``
        (``vtpcm-manage db sync``), never here."""
        parsed: URL = make_url(url)
        self.engine: Engine = schema.connect(parsed)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._backend = parsed.get_backend_name()
        if check_schema:
            try:
                self.check_schema()
            except BaseException:
                self.engine.dispose()
                raise

    def __repr__(self) -> str:
        # never show credentials from the URL
        return f"<Database {self._backend}>"

    def dispose(self) -> None:
        self.engine.dispose()
