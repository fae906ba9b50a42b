"""The vTPCM's part of a live migration, step by step, for whoever drives
libvirt: the Nova driver's hooks and the lab.

check (on the destination) -> begin (source, before libvirt starts) ->
libvirt migrates; QEMU carries the blobs swtpm encrypted under the migration
key -> commit (source, after the switchover) or abort (either side, on any
rollback). Plain functions over the host-signed engine client; nothing here
imports Nova or libvirt, and the engine decides everything that matters.
"""

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em
from vtpcm_nova.virt import tpmxml
from vtpcm_nova.virt.lifecycle import AgentReader

LOG = logging.getLogger(__name__)

COMMITTED = "COMMITTED"
# Past the commit point with the destination committed: the vTPCM is the
# destination's; the engine shreds the source's copy after its answer
# (commit ``shred_later``, engine API 1.11).
DONE_STATES = frozenset({COMMITTED, "SHREDDING"})
ABORTED_STATES = frozenset({"ABORTED", "REFUSED"})
COMMIT_ATTEMPTS = 6  # sleeps 1 + 2 + 4 + 5 + 5 s between them
# The engine's post-import check refused the commit: a retry is refused
# again (and audited again); the migration waits for an operator.
IMPORT_CHECK_REFUSALS = (exception.ImportedStateMismatch,
                         exception.ImportedStateUnverified)
# An abort the engine did not answer (timeout, transport) is sent again:
# sleeps 1 + 2 + 4 s between the attempts. Then reconcile owns it. Each
# attempt waits at most ABORT_ATTEMPT_TIMEOUT (or the client's own timeout,
# [vtpcm] engine_timeout, if shorter), so the whole sequence, inside Nova's
# rollback, ends within ABORT_BOUND (127 s by default), not 4 x 120 s.
ABORT_ATTEMPTS = 4
ABORT_ATTEMPT_TIMEOUT = 30.0
ABORT_BOUND = ABORT_ATTEMPTS * ABORT_ATTEMPT_TIMEOUT + 1.0 + 2.0 + 4.0
_MAX_REASON = 900


class Engine(Protocol):
    def check_destination(self, instance_uuid: str, dest: str) -> em.Verdict: ...
    def begin(self, migration_id: str, instance_uuid: str, source: str,
              dest: str) -> em.MigrationInfo: ...
    def commit(self, migration_id: str, shred_later: bool = False) -> em.MigrationInfo: ...
    def abort(self, migration_id: str, reason: str, instance_uuid: str | None = None,
              timeout: float | None = None) -> em.MigrationInfo: ...
    def get_migration(self, migration_id: str) -> em.MigrationInfo: ...


@contextlib.contextmanager
def timed(step: str, migration_id: str, instance_uuid: str) -> Iterator[None]:
    """DEBUG line with the wall time of one vTPCM step of a migration (what
    the vTPCM adds to Nova's own steps; ``benchmarks/nova_real_phases.py``
    reads it). Logged whether the step succeeded or raised."""
    started = time.monotonic()
    try:
        yield
    finally:
        LOG.debug("vTPCM %(step)s of migration %(mig)s took %(ms).0f ms (instance "
                  "%(i)s)", {"step": step, "mig": migration_id, "i": instance_uuid,
                             "ms": (time.monotonic() - started) * 1000.0})


def check_destination(engine: Engine, instance_uuid: str, dest: str) -> em.Verdict:
    """The attestation gate: a fresh TRUSTED verdict for ``dest`` or
    ``HostNotTrusted`` with the verdict's reason (the engine attests now if
    the verdict is stale). Fails closed: an unreachable engine is an error."""
    return engine.check_destination(instance_uuid, dest)


def begin(engine: Engine, migration_id: str, instance_uuid: str, source: str,
          dest: str) -> em.MigrationInfo:
    """Seal the migration key to ``dest``'s TPM and prepare its incoming vTPCM.

    A begin that failed or whose answer was lost may have half-prepared the
    destination: it is aborted at once (retried while unanswered), then the
    error is raised. The abort names the instance: if the engine never
    recorded the begin (it was still attesting when the caller gave up), it
    leaves a tombstone, and the begin, should it arrive late, is refused."""
    try:
        info = engine.begin(migration_id, instance_uuid, source, dest)
    except exception.VTPCMException as err:
        _abort_after_failed_begin(engine, migration_id, instance_uuid,
                                  "begin failed: %s" % err)
        raise
    if info.state != "PREPARED":
        _abort_after_failed_begin(engine, migration_id, instance_uuid,
                                  "begin answered %s" % info.state)
        raise exception.MigrationError(migration_id=migration_id,
                                       reason="begin answered %s, not PREPARED" % info.state)
    return info


def _abort_after_failed_begin(engine: Engine, migration_id: str, instance_uuid: str,
                              reason: str) -> None:
    """Best effort: the begin's own error is what the caller must see."""
    try:
        abort(engine, migration_id, reason, instance_uuid=instance_uuid)
    except exception.VTPCMException as err:
        LOG.warning("Migration %(mig)s: abort after a failed begin failed too (reconcile "
                    "finishes it): %(err)s", {"mig": migration_id, "err": err})


def destination_socket(agents: AgentReader, dest: str, instance_uuid: str,
                       socket_dirs: Sequence[str]) -> str:
    """Where the destination's incoming vTPCM listens, for the migration XML.

    With one ``[vtpcm] socket_dirs`` entry (a normal deployment: the same
    run dir on every host) it is ``<dir>/<instance uuid>.ctrl``, the only
    answer ``tpmxml.checked_socket_path`` accepts, so the destination's agent
    is not asked: its answer (two round trips, the agent's and the engine's
    for the agent's reply key) could only confirm that path or fail, and
    begin's PREPARED already says the engine saw the destination start its
    incoming vTPCM there. A socket that is gone by the time libvirt starts
    fails the migration at the destination's QEMU, and Nova's rollback
    aborts it, as a failed lookup would have. With several dirs (two lab
    hosts on one machine) the path is read from the destination's agent
    after begin, checked to be MIGRATING_IN and this instance's socket."""
    dirs = sorted({os.path.normpath(d) for d in socket_dirs if d})
    if len(dirs) == 1:
        return tpmxml.checked_socket_path(
            os.path.join(dirs[0], instance_uuid + tpmxml.SOCKET_SUFFIX), instance_uuid,
            socket_dirs)
    info = agents.get(dest, instance_uuid)
    if info.state != "MIGRATING_IN":
        raise exception.MigrationError(
            migration_id=info.migration_id or "?",
            reason="the destination's vTPCM of instance %s is %s, not MIGRATING_IN"
                   % (instance_uuid, info.state))
    return tpmxml.checked_socket_path(info.ctrl_socket, instance_uuid, socket_dirs)


def commit(engine: Engine, migration_id: str, *, attempts: int = COMMIT_ATTEMPTS,
           sleep: Callable[[float], None] = time.sleep) -> em.MigrationInfo:
    """Make the destination's vTPCM the live one and shred the source's.

    Called once the guest runs on the destination, so giving up is not an
    option the guest can afford: an unreachable engine or a busy record is
    retried (bounded), and a commit that went through while its answer was
    lost, or that reconcile finished, is success. The engine answers once
    the destination committed (SHREDDING) and shreds the source's copy
    after its answer (``shred_later``): Nova's post-migration steps do not
    wait for the shred. A refusal by the engine's post-import check
    (``IMPORT_CHECK_REFUSALS``) is raised at once: not retried."""
    last: exception.VTPCMException | None = None
    for attempt in range(attempts):
        try:
            info = engine.commit(migration_id, shred_later=True)
            if info.state in DONE_STATES:
                return info
            last = exception.MigrationError(migration_id=migration_id,
                                            reason="commit answered %s" % info.state)
        except IMPORT_CHECK_REFUSALS:
            raise
        except exception.VTPCMException as err:
            last = err
        try:
            now = engine.get_migration(migration_id)
        except exception.VTPCMException:
            now = None
        if now is not None and now.state in DONE_STATES:
            return now
        if now is not None and now.state in ABORTED_STATES:
            break
        if attempt + 1 < attempts:
            sleep(min(2.0 ** attempt, 5.0))
    assert last is not None
    raise last


def abort(engine: Engine, migration_id: str, reason: str, *,
          instance_uuid: str | None = None, attempts: int = ABORT_ATTEMPTS,
          sleep: Callable[[float], None] = time.sleep) -> em.MigrationInfo | None:
    """Undo a begun migration: the destination's incoming vTPCM is destroyed,
    the source's is ACTIVE again. None when the engine never recorded the
    migration (begin never reached it; with ``instance_uuid`` the engine
    records a tombstone instead and answers ABORTED). The engine refuses
    after the commit point, and that refusal is raised: then the vTPCM
    follows the guest.

    An abort the engine did not answer (timeout, transport error) is sent
    again, ``attempts`` times in all with a growing pause, each waiting at
    most ``ABORT_ATTEMPT_TIMEOUT`` (``ABORT_BOUND`` in all); then the error
    is logged as given up and raised: the engine's reconcile (or the
    deadline) owns the migration from there. An engine older than API 1.10
    (it cannot take ``instance_uuid``) is sent the abort without it."""
    for attempt in range(attempts):
        try:
            return _abort_once(engine, migration_id, reason, instance_uuid)
        except exception.ServiceUnreachable as err:
            if attempt + 1 >= attempts:
                LOG.error("Migration %(mig)s: gave up aborting after %(n)d unanswered "
                          "attempts (%(err)s); the engine's reconcile finishes the abort "
                          "(a begin it never recorded expires unanswered)",
                          {"mig": migration_id, "n": attempts, "err": err})
                raise
            LOG.warning("Migration %(mig)s: abort unanswered (%(err)s), attempt %(a)d of "
                        "%(n)d; retrying", {"mig": migration_id, "err": err,
                                            "a": attempt + 1, "n": attempts})
            sleep(min(2.0 ** attempt, 5.0))
    raise AssertionError("unreachable")  # the last attempt returned or raised


def _abort_once(engine: Engine, migration_id: str, reason: str,
                instance_uuid: str | None) -> em.MigrationInfo | None:
    try:
        if instance_uuid is not None:
            try:
                return engine.abort(migration_id, reason[:_MAX_REASON], instance_uuid,
                                    timeout=ABORT_ATTEMPT_TIMEOUT)
            except exception.RPCVersionUnsupported as err:
                # an engine of API 1.9 or older in a rolling update: it
                # knows no tombstone, but aborts a recorded migration
                LOG.info("Migration %(mig)s: the engine cannot take the instance in an "
                         "abort (%(err)s); aborting without it",
                         {"mig": migration_id, "err": err})
        return engine.abort(migration_id, reason[:_MAX_REASON],
                            timeout=ABORT_ATTEMPT_TIMEOUT)
    except exception.NotFound:
        return None
    except exception.InvalidTransition:
        # refused or aborted already (by begin itself, the other side, or
        # reconcile): done, as the caller wanted; anything else is raised
        info = engine.get_migration(migration_id)
        if info.state in ABORTED_STATES:
            return info
        raise


def settle(engine: Engine, migration_id: str, *, running_on_dest: bool,
           reason: str, instance_uuid: str | None = None) -> em.MigrationInfo | None:
    """After libvirt reported a failure: if the guest runs on the destination
    anyway (it finished as we gave up), the vTPCM must follow it (commit);
    an abort would leave the guest without its TPM. Otherwise abort."""
    if running_on_dest:
        LOG.warning("Migration %(mig)s reported %(reason)s but the guest runs on the "
                    "destination: committing", {"mig": migration_id, "reason": reason})
        return commit(engine, migration_id)
    LOG.warning("Live migration %(mig)s failed, aborting: %(reason)s",
                {"mig": migration_id, "reason": reason})
    return abort(engine, migration_id, reason, instance_uuid=instance_uuid)
