"""What every area of the engine database runs on: its clock, its
transactions and the host-row lock that opens a multi-area one.

Why one base: each area (``hosts``, ``trust``, ``vtpcms`` ...) is a mixin
of ``api.Database``; all of them open their transactions through the one
``session`` here, so a method that spans areas still runs in ONE
transaction, exactly as when they were one class. Where a change needs
several statements (a verdict and the host it speaks for), the
transaction starts with a conditional UPDATE of the host row
(``_update_host``): it takes the row lock on PostgreSQL/MySQL and, as the
first write, the database write lock on SQLite (whose driver starts a
transaction only at the first write), so every later read in it is
current.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from vtpcm_common import spans
from vtpcm_nova.engine.db import models


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Store:
    """The state ``api.Database`` sets up and every area mixin uses."""

    engine: Engine
    _sessions: sessionmaker[Session]

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commit on success, roll back on any error."""
        s = self._sessions()
        try:
            yield s
            with spans.span("db:commit"):
                s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read in SQLAlchemy Core: no ORM session, identity map or unit of
        work, which cost ~0.2 ms of CPU per read against ~0.04 ms for the
        same SELECT (the host and trust reads run several times in every
        migration step). Nothing is written through it (rolled back at the
        end). It is NOT a snapshot: on SQLite each SELECT reads on its own,
        on PostgreSQL READ COMMITTED each sees the newest commit, so two
        statements here may see another worker's write between them; a
        caller whose decision needs them consistent re-checks in its
        conditional write (as ``create_migration``'s claim does)."""
        with spans.span("db:read"), self.engine.connect() as c:
            yield c

    @staticmethod
    def _update_host(s: Session | Connection, name: str, *conditions: Any, bump: bool = True,
                     **values: Any) -> bool:
        """Change the host row iff ``conditions`` hold; True if it did.

        Run first in a transaction it locks the row (and, on SQLite, takes
        the write lock), so the checks after it see no concurrent change.
        ``bump``: the revision grows, which makes attestations in flight
        stale (their verdicts are dropped). ``s``: a session, or a session's
        connection (Core: no autoflush, no ORM round)."""
        revision = models.Host.revision
        values["revision"] = revision + 1 if bump else revision
        q = (update(models.Host).where(models.Host.name == name, *conditions)
             .values(**values).execution_options(synchronize_session=False))
        return s.execute(q).rowcount == 1  # type: ignore[attr-defined,no-any-return]
