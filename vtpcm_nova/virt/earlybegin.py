"""A live migration's engine begin, started at the source's check and taken
over by the source's ``live_migration``, so that it runs while Nova's own
steps (the rest of the checks, the conductor, the destination's
``pre_live_migration``) do.

Only the source begins (the destination merely names itself in its check
data, and a begin for another migration or destination than the one
``live_migration`` gets is aborted, never used). The engine refuses a begin
under an id it has seen with other hosts or after it ended, and Nova keeps
its migration uuid when the conductor retries another destination: so the
first begin of a Nova migration uses Nova's uuid (what operators look up),
and a later one (a retry to another host, or a begin again after an early
begin failed or was given up) a uuid derived from it and the destination.

An early begin that ``live_migration`` does not take over is aborted: when a
check for another destination of the instance arrives, when Nova's migration
record is terminal, or after ``[vtpcm] early_begin_timeout``. Nothing here
imports Nova: the driver passes what it reads from Nova as callables.
"""

import collections
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_nova.virt import livemigration

LOG = logging.getLogger(__name__)

# Nova's live-migration statuses after which nobody takes an early begin over
TERMINAL = frozenset({"error", "failed", "cancelled", "completed", "done", "aborted"})
_DERIVED = uuid.UUID("5d0c3b9e-8a0f-4c55-9a36-2f1e7b3c0d11")
POLL_S = 1.0
# ids of one Nova migration looked up at the engine when this host does not
# remember them (a restarted nova-compute): Nova's uuid and derived ones
LOOKUP_ATTEMPTS = 4
MAX_THREADS = 16  # concurrent early begins; a check beyond them begins nothing early
ABORTED_REMEMBERED = 4096  # ids aborted from here, never taken over nor chosen


def attempt_id(nova_id: str, dest: str, attempt: int) -> str:
    """The protocol's id of the ``attempt``-th begin of Nova migration
    ``nova_id`` (0: Nova's own uuid)."""
    if attempt == 0:
        return nova_id
    return str(uuid.uuid5(_DERIVED, "%s %s %d" % (nova_id, dest, attempt)))


@dataclasses.dataclass(eq=False)
class _Early:
    instance_uuid: str
    dest: str
    previous: "_Early | None"
    nova_id: str | None = None
    vtpcm_id: str | None = None
    prepared: bool = False
    joined: bool = False  # live_migration came for it (under the lock)
    taken: bool = False  # ... and begins with its id
    superseded: bool = False  # a check for another destination came
    abandoned: bool = False  # its own thread aborts it: never taken (backstop; under the lock)
    wanted: tuple[str, str] | None = None  # join's (Nova migration, destination)
    found: bool = False  # its id was found PREPARED at the engine (a restart)
    answered: threading.Event = dataclasses.field(default_factory=threading.Event)
    wake: threading.Event = dataclasses.field(default_factory=threading.Event)
    decided: threading.Event = dataclasses.field(default_factory=threading.Event)  # taken?
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)


class EarlyBegins:
    """The source host's early begins, one at a time per instance."""

    def __init__(self, engine: Callable[[], livemigration.Engine], source: Callable[[], str],
                 find_migration: Callable[[str], str | None],
                 migration_status: Callable[[str], str | None],
                 timeout: Callable[[], float], *, poll: float = POLL_S,
                 wait_previous: Callable[[], float] = lambda: 150.0) -> None:
        self._engine = engine
        self._source = source
        self._find = find_migration  # instance uuid -> Nova's in-progress migration
        self._status = migration_status  # Nova migration uuid -> its status
        self._timeout = timeout
        self._poll = poll
        self._wait_previous = wait_previous
        self._lock = threading.Lock()
        self._pending: dict[str, _Early] = {}
        self._used: dict[str, set[str]] = {}  # Nova migration -> ids begun with
        self._ids: dict[str, str] = {}  # Nova migration -> id live_migration began
        self._aborting: dict[str, _Early] = {}  # instance -> given up, abort under way
        # ids this process sent an abort for (remember_abort: the watchdog's,
        # the lookup's, a failed begin's, a rollback's), newest last
        # (bounded): never taken over nor begun with again, whatever the
        # engine answers meanwhile, since an abort that failed or timed out
        # here may still be carried out there
        self._aborted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._slots = threading.BoundedSemaphore(MAX_THREADS)
        # status reads still under way (a late one is left to end by itself)
        self._reads = threading.BoundedSemaphore(MAX_THREADS)
        # Nova migrations whose next id is being chosen: one choice at a time
        self._choosing: set[str] = set()
        self._choice = threading.Condition()

    def start(self, instance_uuid: str, dest: str) -> None:
        """Start the begin to ``dest`` in the background (the source's check
        passed). A pending early begin of the instance to another
        destination is superseded: aborted before this one begins."""
        if self._timeout() <= 0:
            return
        if not self._slots.acquire(blocking=False):
            LOG.info("vTPCM: %(n)d early begins under way; instance %(i)s to %(dest)s "
                     "begins in live_migration", {"n": MAX_THREADS, "i": instance_uuid,
                                                  "dest": dest})
            return
        with self._lock:
            previous = self._pending.get(instance_uuid)
            if previous is not None:
                if previous.dest == dest and not previous.superseded:
                    self._slots.release()
                    return
                previous.superseded = True
                previous.wake.set()
            early = _Early(instance_uuid, dest, previous)
            self._pending[instance_uuid] = early
        threading.Thread(target=self._run, args=(early,), daemon=True,
                         name="vtpcm-early-begin-%s" % instance_uuid).start()

    def join(self, instance_uuid: str, nova_id: str, dest: str, timeout: float) -> str:
        """The id ``live_migration`` begins with: the early begin's if it
        answered PREPARED for this migration and destination, else a fresh
        one. Waits at most ``timeout`` in all: for the early begin's answer,
        and for the abort of an early begin of the instance that is not
        taken (it holds the vTPCM; the engine would refuse the fresh begin).
        Raises MigrationError (the caller rolls back, as after a failed
        begin) when the early begin has not answered within ``timeout``:
        its thread may still look up or begin, so choosing an id here too
        could take over what it then aborts."""
        deadline = time.monotonic() + timeout
        with self._lock:
            early = self._pending.pop(instance_uuid, None)
            if early is not None:
                early.joined = True
                early.wanted = (nova_id, dest)
                early.wake.set()
            aborting = self._aborting.get(instance_uuid)
        if early is not None:
            early.answered.wait(_left(deadline))
            with self._lock:
                early.taken = (early.answered.is_set() and early.prepared
                               and not early.abandoned
                               and (early.nova_id, early.dest) == (nova_id, dest))
                early.decided.set()
                if early.taken:
                    assert early.vtpcm_id is not None
                    self._ids[nova_id] = early.vtpcm_id
                    return early.vtpcm_id
            # another migration or destination (or no answer yet): its own
            # thread aborts it
            if early.prepared:
                aborting = early
            elif not early.answered.is_set():
                raise exception.MigrationError(migration_id=nova_id, reason=(
                    "the early begin of instance %s did not answer within %.1f s"
                    % (instance_uuid, timeout)))
        if aborting is not None:
            aborting.finished.wait(_left(deadline))
        fresh = self._choose(instance_uuid, nova_id, dest, wait=_left(deadline))
        if fresh is None:
            raise exception.MigrationError(migration_id=nova_id, reason=(
                "another choice of an id for Nova migration %s did not end within %.1f s"
                % (nova_id, timeout)))
        with self._lock:
            self._ids[nova_id] = fresh
        return fresh

    def migration_id(self, nova_id: str) -> str:
        """The protocol's id of Nova migration ``nova_id`` (Nova's own uuid
        unless this host began it under a derived one)."""
        with self._lock:
            return self._ids.get(nova_id, nova_id)

    def forget(self, nova_id: str) -> None:
        """The migration ended (committed or rolled back) on this host."""
        with self._lock:
            self._ids.pop(nova_id, None)
            self._used.pop(nova_id, None)

    # --- the background thread ---------------------------------------------------
    def _choose(self, instance_uuid: str, nova_id: str, dest: str, *, wait: float,
                early: _Early | None = None) -> str | None:
        """The next id to begin Nova migration ``nova_id`` to ``dest`` with,
        None if another choice for it did not end within ``wait`` or (an
        early begin's choice) it is not to be begun. One choice per Nova
        migration at a time. Without a memory of the migration (nova-compute
        restarted since it began one), the engine is asked which of its ids
        it knows (an unsigned, advisory read: begin and abort stay signed and
        the engine decides): a begin PREPARED for this instance and hosts is
        taken over (its caller's begin again answers PREPARED); one PREPARED
        for another destination is aborted by ``join``, whose destination is
        the conductor's final one, while an early begin gives up on it
        without beginning (it would abort what ``join`` takes over); the
        first id the engine does not know is the next."""
        with self._choice:
            if not self._choice.wait_for(lambda: nova_id not in self._choosing, wait):
                return None
            self._choosing.add(nova_id)
        try:
            return self._choose_alone(instance_uuid, nova_id, dest, early)
        finally:
            with self._choice:
                self._choosing.discard(nova_id)
                self._choice.notify_all()

    def _choose_alone(self, instance_uuid: str, nova_id: str, dest: str,
                      early: _Early | None) -> str | None:
        with self._lock:
            # one critical section: an abort's end (``_abort``) may forget
            # the migration's ids between a test and a choice apart
            if nova_id in self._used:
                return self._next_id(nova_id, dest)
        seen: set[str] = set()
        source = self._source()
        try:
            for attempt in range(LOOKUP_ATTEMPTS):
                candidate = attempt_id(nova_id, dest, attempt)
                try:
                    info = self._engine().get_migration(candidate)
                except exception.NotFound:
                    break
                seen.add(candidate)
                if (info.state != "PREPARED" or info.instance_uuid != instance_uuid
                        or info.source != source):
                    continue
                with self._lock:
                    aborted = candidate in self._aborted
                if info.dest == dest and aborted:
                    LOG.info("vTPCM migration %(mig)s of Nova migration %(nova)s is "
                             "PREPARED at the engine but its abort was sent from here: "
                             "not taken over", {"mig": candidate, "nova": nova_id})
                    continue
                if info.dest == dest:
                    LOG.info("vTPCM migration %(mig)s of Nova migration %(nova)s is "
                             "PREPARED at the engine: taken over", {"mig": candidate,
                                                                    "nova": nova_id})
                    with self._lock:
                        self._used.setdefault(nova_id, set()).update(seen)
                        if early is not None:
                            early.found = True
                    return candidate
                if early is not None:
                    LOG.info("vTPCM migration %(mig)s of Nova migration %(nova)s is "
                             "PREPARED at the engine for another destination: no early "
                             "begin to %(dest)s", {"mig": candidate, "nova": nova_id,
                                                   "dest": dest})
                    return None
                self.remember_abort(candidate)
                livemigration.abort(self._engine(), candidate,
                                    "early begin for another destination, found after "
                                    "a restart", instance_uuid=instance_uuid)
        except exception.VTPCMException as err:
            LOG.warning("vTPCM: the ids of Nova migration %(nova)s could not be looked up "
                        "at the engine: %(err)s", {"nova": nova_id, "err": err})
        with self._lock:
            self._used.setdefault(nova_id, set()).update(seen)
            return self._next_id(nova_id, dest)

    def _next_id(self, nova_id: str, dest: str) -> str:
        """Under the lock: the first id neither used for the migration nor
        aborted from here (whatever the engine answered, or did not)."""
        used = self._used.setdefault(nova_id, set())
        attempt = 0
        while (attempt_id(nova_id, dest, attempt) in used
               or attempt_id(nova_id, dest, attempt) in self._aborted):
            attempt += 1
        chosen = attempt_id(nova_id, dest, attempt)
        used.add(chosen)
        return chosen

    def _run(self, early: _Early) -> None:
        try:
            if early.previous is not None:
                early.previous.finished.wait(self._wait_previous())
            nova_id = self._find(early.instance_uuid)
            with self._lock:
                if nova_id is None or early.joined or early.superseded:
                    return
            vtpcm_id = self._choose(early.instance_uuid, nova_id, early.dest,
                                    wait=self._wait_previous(), early=early)
            if vtpcm_id is None:
                return
            with self._lock:
                early.nova_id = nova_id
                early.vtpcm_id = vtpcm_id
                unwanted = (early.superseded or early.decided.is_set()
                            or (early.joined and early.wanted != (nova_id, early.dest)))
                if unwanted and not early.found:
                    # live_migration chooses its own id; this one is unused
                    self._used.get(nova_id, set()).discard(vtpcm_id)
                    return
            # a begin found PREPARED is this thread's now: begun again (one
            # round trip), then taken over by join or aborted by _watch
            self._begin(early)
            if early.prepared:
                self._watch(early)
        except Exception as err:  # a thread of its own: nothing above to catch it
            LOG.warning("vTPCM early begin of instance %(i)s to %(dest)s failed; the live "
                        "migration, if it comes, begins itself: %(err)s",
                        {"i": early.instance_uuid, "dest": early.dest, "err": err})
        finally:
            with self._lock:
                if self._aborting.get(early.instance_uuid) is early:
                    del self._aborting[early.instance_uuid]
            early.answered.set()
            early.finished.set()
            self._slots.release()

    def _begin(self, early: _Early) -> None:
        assert early.vtpcm_id is not None and early.nova_id is not None
        try:
            with livemigration.timed("early begin", early.vtpcm_id, early.instance_uuid):
                livemigration.begin(self._engine(), early.vtpcm_id, early.instance_uuid,
                                    self._source(), early.dest)
        except exception.VTPCMException as err:
            # begin aborted itself (or tried to); live_migration's own begin
            # decides (and logs)
            self.remember_abort(early.vtpcm_id)
            LOG.info("vTPCM early begin %(mig)s of Nova migration %(nova)s to %(dest)s "
                     "failed, live_migration begins again: %(err)s",
                     {"mig": early.vtpcm_id, "nova": early.nova_id, "dest": early.dest,
                      "err": err})
            return
        early.prepared = True
        early.answered.set()

    def _watch(self, early: _Early) -> None:
        """Abort the PREPARED early begin unless live_migration takes it.
        The lock protocol is what keeps the two apart: ``join`` pops the
        entry and marks it joined, then decides ``taken`` under the lock;
        this thread gives up only under the lock, an unjoined entry (out of
        ``_pending`` before ``join`` can pop it) or one ``join`` decided not
        to take. ``abandoned`` is a backstop on top of that."""
        deadline = time.monotonic() + self._timeout()
        while True:
            early.wake.wait(min(self._poll, _left(deadline)))
            if early.joined:
                # join decides at once: this begin answered
                early.decided.wait(self._wait_previous())
            with self._lock:
                reason = self._reason(early, deadline)
                if reason is not None:
                    self._give_up(early)
            if reason == "":
                return  # taken over
            if reason is None:
                status = self._read_status(early, deadline)
                if status not in TERMINAL:
                    continue  # a read cut short by the deadline: given up at once
                with self._lock:
                    if early.joined:
                        continue  # live_migration came meanwhile: join decides
                    reason = "Nova's migration %s is %s" % (early.nova_id, status)
                    self._give_up(early)
            self._abort(early, reason)
            return

    def _read_status(self, early: _Early, deadline: float) -> str | None:
        """Nova's status of the early begin's migration, None if unreadable
        or not read by ``deadline``: a conductor read takes up to
        ``rpc_response_timeout``, which must not keep the begin PREPARED past
        ``early_begin_timeout``. The read runs in a thread of its own, left
        to end by itself if late (at most two per early begin: a join can
        start one more after the deadline; at most MAX_THREADS in all, none
        started when that many hang). The wait heeds a join or a
        superseding check within a poll, not only the read's end."""
        nova_id = early.nova_id
        assert nova_id is not None
        answer: list[str | None] = []
        read = threading.Event()

        def status() -> None:
            try:
                answer.append(self._status(nova_id))
            except Exception as err:
                LOG.debug("Nova migration %(nova)s unreadable: %(err)s",
                          {"nova": nova_id, "err": err})
            finally:
                self._reads.release()
                read.set()
        if not self._reads.acquire(blocking=False):
            return None  # MAX_THREADS late reads under way: the deadline still holds
        try:
            threading.Thread(target=status, daemon=True,
                             name="vtpcm-early-status-%s" % early.instance_uuid).start()
        except RuntimeError as err:  # no thread left: the deadline still holds
            self._reads.release()
            LOG.debug("Nova migration %(nova)s not read: %(err)s",
                      {"nova": nova_id, "err": err})
            return None
        # a join or a superseding check is heeded within a poll, not after the read
        while (not read.wait(min(self._poll, _left(deadline))) and not early.wake.is_set()
               and _left(deadline) > 0):
            pass
        return answer[0] if answer else None

    def _reason(self, early: _Early, deadline: float) -> str | None:
        """Why to give the early begin up ("" when taken, None: not yet);
        under the lock."""
        if early.taken:
            return ""
        if early.joined:
            if not early.decided.is_set():
                return None  # join has not decided yet
            # live_migration gave up waiting, or it is for another
            # migration or destination: it began under another id
            return "not taken over by live_migration"
        if early.superseded:
            return "superseded by a check for another destination"
        if time.monotonic() > deadline:
            return ("not taken over by live_migration within %.0f s "
                    "([vtpcm] early_begin_timeout)" % self._timeout())
        return None

    def _give_up(self, early: _Early) -> None:
        """Under the lock: nobody takes ``early`` over any more, and a join
        for the instance waits for its abort."""
        if early.taken:
            return
        early.abandoned = True
        if self._pending.get(early.instance_uuid) is early:
            del self._pending[early.instance_uuid]
        self._aborting[early.instance_uuid] = early

    def _abort(self, early: _Early, reason: str) -> None:
        assert early.vtpcm_id is not None
        self.remember_abort(early.vtpcm_id)
        LOG.info("vTPCM early begin %(mig)s of instance %(i)s to %(dest)s aborted: "
                 "%(reason)s", {"mig": early.vtpcm_id, "i": early.instance_uuid,
                                "dest": early.dest, "reason": reason})
        try:
            livemigration.abort(self._engine(), early.vtpcm_id, "early begin: " + reason,
                                instance_uuid=early.instance_uuid)
        except exception.VTPCMException as err:
            LOG.warning("vTPCM abort of the early begin %(mig)s failed (the engine's "
                        "deadline finishes it): %(err)s", {"mig": early.vtpcm_id, "err": err})
        finally:
            with self._lock:
                # the ids of a migration nobody took over: the engine knows
                # them, a later choice looks them up again
                if early.nova_id is not None and early.nova_id not in self._ids:
                    self._used.pop(early.nova_id, None)

    def remember_abort(self, vtpcm_id: str) -> None:
        """An abort of ``vtpcm_id`` is sent from this process (or was, by a
        failed ``livemigration.begin``): the id is never taken over nor
        chosen again here (the last ``ABORTED_REMEMBERED`` of them)."""
        with self._lock:
            self._aborted[vtpcm_id] = None
            self._aborted.move_to_end(vtpcm_id)
            while len(self._aborted) > ABORTED_REMEMBERED:
                self._aborted.popitem(last=False)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
