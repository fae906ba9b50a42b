"""What every area of the engine database runs on: its clock and its
transactions.

Why one base: each area (``hosts``, ``trust``, ``vtpcms`` ...) is a mixin
of ``api.Database``; all of them open their transactions through the one
``session`` here, so a method that spans areas still runs in ONE
transaction, exactly as when they were one class.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


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
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()
