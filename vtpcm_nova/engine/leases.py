"""Which engine run began a migration, and whether that run is gone.

Each engine run holds a lease in the database (``service``); a begin it
recorded is abandoned once the run stops running it or loses its lease.
Plain functions of records and callables, apart from the coordinator."""

import datetime
import uuid
from collections.abc import Callable

from vtpcm_nova.engine.db import api as db_api


def worker_id(engine_host: str) -> str:
    """This engine run's name in ``begun_by`` and its lease: its
    ``[engine] host`` (for the operator) and a fresh id per start (what
    tells runs apart, also two live runs sharing one host name)."""
    return "%s/%s" % (engine_host, uuid.uuid4().hex[:12])


def begin_abandoned(rec: db_api.MigrationRecord, worker: str | None,
                    live_workers: Callable[[], frozenset[str]],
                    running_here: Callable[[str], bool],
                    now: datetime.datetime, step_bound: float) -> str | None:
    """Why the ``begin`` of ``rec`` (SEALING, PREPARING) will never return
    to its caller, or None while it may still.

    * Recorded by this engine run: abandoned iff this run no longer runs
      it (``running_here``; its thread ended without moving the state).
    * Recorded by another run: abandoned iff that run holds no live lease
      (``live_workers``, judged by the database's clock): it stopped, or
      was killed and its lease lapsed. Never because another live run
      shares its ``[engine] host``, and never for a slow step of a live
      run.
    * No run recorded (a row from before 0004, or an engine built without
      a worker id): idle in one step longer than ``step_bound``.

    Aborting a begin that was alive after all is safe: its worker's next
    compare-and-set fails, its caller gets an error and aborts, and both
    agents refuse a late command of an aborted migration."""
    if rec.begun_by is not None and rec.begun_by == worker:
        if running_here(rec.migration_id):
            return None
        return ("its begin never returned: this engine run (%s) recorded it and no "
                "longer runs it" % rec.begun_by)
    if rec.begun_by is not None:
        if rec.begun_by in live_workers():
            return None
        return ("its begin never returned: the engine run that ran it (%s) holds no live "
                "lease (stopped, or killed and its lease lapsed)" % rec.begun_by)
    idle = (now - rec.updated_at).total_seconds()
    if idle > step_bound:
        return ("its begin never returned: no step for %d s (one step takes at most "
                "%d s)" % (idle, step_bound))
    return None
