"""Leases of engine runs: who may still finish a ``begin``.

Why the database's clock: a lease is written by one worker and judged by
another; with each worker's own clock a skew between two machines would
shorten or stretch every lease (the step bound this replaces had that
fault). Every time here is read from the database server in the
transaction that uses it (``db_now``), so only that one clock counts.
"""

from __future__ import annotations

import datetime

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.store import Store

# The database server's current UTC time, per backend, to the millisecond
# or better. SQLite's is the clock of the host the engine runs on (the
# database is a local file, so every worker on it shares that clock).
_NOW_SQL = {
    "sqlite": "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')",
    "postgresql": "SELECT timezone('UTC', clock_timestamp())",
    "mysql": "SELECT UTC_TIMESTAMP(6)",
    "mariadb": "SELECT UTC_TIMESTAMP(6)",  # a mariadb+pymysql:// URL
}
# Leases expired this long ago are dropped at a registration (kill -9
# leaves its row behind); a begin of a run without a row is abandoned too.
PURGE_AFTER = datetime.timedelta(days=1)


def _aware(value: object) -> datetime.datetime:
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    assert isinstance(value, datetime.datetime), value
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value.astimezone(datetime.UTC)


class WorkerStore(Store):
    """Register, renew, drop and list the leases of engine runs."""

    _backend: str

    def _db_now(self, s: Session) -> datetime.datetime:
        return _aware(s.execute(text(_NOW_SQL[self._backend])).scalar_one())

    def db_now(self) -> datetime.datetime:
        """The database server's clock (aware UTC)."""
        with self.session() as s:
            return self._db_now(s)

    def register_worker(self, worker_id: str, host: str, ttl: float) -> datetime.datetime:
        """Start the lease of engine run ``worker_id`` (``[engine] host``
        ``host``) for ``ttl`` seconds; drop leases long expired. Returns
        its expiry."""
        with self.session() as s:
            now = self._db_now(s)
            s.execute(delete(models.EngineWorker)
                      .where(models.EngineWorker.expires_at < now - PURGE_AFTER))
            expires = now + datetime.timedelta(seconds=ttl)
            s.add(models.EngineWorker(worker_id=worker_id, host=host, started_at=now,
                                      renewed_at=now, expires_at=expires))
            return expires

    def renew_worker(self, worker_id: str, host: str, ttl: float
                     ) -> tuple[datetime.datetime, datetime.timedelta | None]:
        """Extend the lease by ``ttl`` seconds from now. Returns the new
        expiry and, if the lease had lapsed (or its row was gone), for how
        long: another worker may have aborted this run's begins meanwhile
        (their next compare-and-set then fails: safe)."""
        with self.session() as s:
            now = self._db_now(s)
            expires = now + datetime.timedelta(seconds=ttl)
            old = s.scalar(select(models.EngineWorker.expires_at)
                           .where(models.EngineWorker.worker_id == worker_id))
            if old is None:
                s.add(models.EngineWorker(worker_id=worker_id, host=host, started_at=now,
                                          renewed_at=now, expires_at=expires))
                return expires, datetime.timedelta(0)
            s.execute(update(models.EngineWorker)
                      .where(models.EngineWorker.worker_id == worker_id)
                      .values(renewed_at=now, expires_at=expires))
            return expires, (now - old if old <= now else None)

    def deregister_worker(self, worker_id: str) -> None:
        """End the lease at a clean stop: the run's begins, if any were
        left, are abandoned at the next reconcile of any worker."""
        with self.session() as s:
            s.execute(delete(models.EngineWorker)
                      .where(models.EngineWorker.worker_id == worker_id))

    def live_workers(self) -> frozenset[str]:
        """The engine runs whose lease has not expired, by the database's clock."""
        with self.session() as s:
            now = self._db_now(s)
            return frozenset(s.scalars(select(models.EngineWorker.worker_id)
                                       .where(models.EngineWorker.expires_at > now)))
