"""The migration coordinator: drives the pure protocol with real I/O.

For each migration the coordinator loads the protocol state from the
database, feeds it one event, writes the new state with a compare-and-set
(several engine workers may share the database) and only then carries out
the actions. Every action is idempotent on the agent side, so a coordinator
that dies half-way is finished by ``reconcile`` in any worker.

The engine is the authority on where each vTPCM lives and its generation:
``begin`` refuses unless the source is that location and the source agent
holds that generation; the commit point moves the authority to the
destination with generation + 1 in one compare-and-set.

A migration whose deadline abort found the destination holding the state
is in doubt (``IN_DOUBT``): the guest may run there. It passes the commit
point only on the source's signed commit and is undone only by an explicit
abort; what the agents say about the switchover (``_switchover``) is only
logged: their replies are signed (agent API 1.6), but a stopped source
swtpm is no proof the guest runs on the destination (a guest powered off on
the source looks the same).

Every agent reply the coordinator acts on is verified against the
answering host's enrolled command key (``replykeys``); one that does not
verify is a ``ReplyNotAuthenticated`` (a ``ServiceUnreachable``): the step's
outcome is unknown, so it is retried (reconcile) and never taken as done.
"""

import collections
import dataclasses
import datetime
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol, cast

from oslo_log import log as logging

from vtpcm_common import authn, exception, rpc, statedigest
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.agent.rpcapi import STATE_DIGEST_VERSION, STREAM_DIGEST_VERSION
from vtpcm_nova.engine import protocol as p

# re-exported (``x as x``): callers and tests name them on the coordinator
from vtpcm_nova.engine.background import BackgroundJobs as BackgroundJobs
from vtpcm_nova.engine.db import api as db_api
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.leases import begin_abandoned as begin_abandoned
from vtpcm_nova.engine.leases import worker_id as worker_id
from vtpcm_nova.engine.protocol import MigrationState as M
from vtpcm_nova.engine.resolve import POST_IMPORT_REFUSED, ImportCheck
from vtpcm_nova.engine.shelving import (
    NO_WITNESS,
    REAPED,
    NovaLookup,
    ShelvingMixin,
    WitnessPolicy,
)
from vtpcm_nova.engine.shelving import NOT_ADMIN as NOT_ADMIN
from vtpcm_nova.engine.shelving import NOVA_NOT_CONFIGURED as NOVA_NOT_CONFIGURED
from vtpcm_nova.engine.shelving import ORPHAN as ORPHAN
from vtpcm_nova.engine.shelving import ORPHAN_WATCHED as ORPHAN_WATCHED
from vtpcm_nova.engine.shelving import REAPABLE as REAPABLE
from vtpcm_nova.engine.states import CREATING, DESTROYING, RESERVED_PREFIX, SHELVED

LOG = logging.getLogger(__name__)

# How long a signed agent command may still run after the engine sent it:
# its validity plus the agents' clock allowance (authn.CommandVerifier).
COMMAND_LIFETIME = authn.DEFAULT_TTL + authn.DEFAULT_MAX_SKEW
# The states a migration is in only while its ``begin`` runs: the caller has
# no PREPARED answer, so libvirt never started and nothing depends on it.
BEGIN_STATES = frozenset({M.SEALING, M.PREPARING})
# an abort's steps left to run, and the states on its way (IN_DOUBT: the
# destination's copy was in use, an operator decides)
UNDOING_ABORT = frozenset({M.ABORTING, M.DISCARDING, M.RESTORING})
ABORT_PATH = UNDOING_ABORT | {M.ABORTED, M.IN_DOUBT}
# Added to the agent RPC timeout for one begin step's own database writes
# and checks (the destination's recheck, a compare-and-set under load):
# the step bound, only for begins that recorded no engine run.
BEGIN_STEP_SLACK = 30.0
# The ``error`` of an ABORTED tombstone: an abort of a migration id the
# engine had no record of (its caller's begin timed out before the record
# was written); a begin of that id arriving later is refused.
TOMBSTONE_REASON = "aborted before its begin was recorded"
# The states whose commit passes the commit point after a live migration's
# QEMU stream, so the post-import check runs first (TRANSFERRING cannot be
# committed). Not TRANSFERRED (cold migration, resize, unshelve): the engine
# carried the blobs itself through the agents' signed, generation-checked
# export_state/import_state, there is no stream to distrust, and the confirm
# may come days later, after the guest booted (its CMD_INIT supersedes the
# capture, so the check could only refuse). An IN_DOUBT migration is checked
# only if it never transferred (``_came_live``).
IMPORT_CHECKED = frozenset({M.PREPARED, M.IN_DOUBT})
# The audit entry the protocol writes when a cold transfer lands
# (TRANSFERRING -> TRANSFERRED): how an IN_DOUBT record tells its path
TRANSFER_AUDIT = ("migration.transfer", "state transferred")


class AgentClient(Protocol):
    def get(self, host: str, instance_uuid: str) -> am.VTPCMInfo: ...
    def create(self, host: str, instance_uuid: str) -> am.VTPCMInfo: ...
    def destroy(self, host: str, instance_uuid: str) -> am.VTPCMInfo: ...
    def start(self, host: str, instance_uuid: str) -> am.VTPCMInfo: ...
    def stop(self, host: str, instance_uuid: str) -> am.VTPCMInfo: ...
    def health(self, host: str, timeout: float | None = None) -> am.Health: ...
    def seal_migration_key(self, host: str, context: am.MigrationContext,
                           dest_kem_public: bytes) -> am.SealedKey: ...
    def prepare_incoming(self, host: str, context: am.MigrationContext,
                         envelope: bytes) -> am.VTPCMInfo: ...
    def export_state(self, host: str, instance_uuid: str) -> am.StateBlobs: ...
    def import_state(self, host: str, blobs: am.StateBlobs) -> am.VTPCMInfo: ...
    def commit_incoming(self, host: str, context: am.MigrationContext) -> Any: ...
    def commit_outgoing(self, host: str, context: am.MigrationContext) -> Any: ...
    def abort_incoming(self, host: str, context: am.MigrationContext,
                       only_if_unused: bool = False) -> Any: ...
    def abort_outgoing(self, host: str, context: am.MigrationContext) -> Any: ...
    def reclaim_outgoing(self, host: str, context: am.MigrationContext,
                         generation: int) -> Any: ...
    def incoming_state(self, host: str,
                       context: am.MigrationContext) -> am.IncomingState: ...
    def state_digest(self, host: str, context: am.MigrationContext, side: str,
                     nonce: bytes, streams: bool = True) -> am.StateDigest: ...


class TrustChecker(Protocol):
    def check_fresh(self, host: str) -> db_api.VerdictRecord: ...


# Shreds queued after their commits' answers; more are left to reconcile
AFTER_COMMIT_QUEUE = 256


# How long a begin waits for the shred of the vTPCM's old copy on its
# destination (an earlier shred_later commit's) before it refuses, retryable
PRE_SHRED_WAIT = 5.0


class Coordinator(ShelvingMixin):
    def __init__(self, db: db_api.Database, agents: AgentClient, trust: TrustChecker, *,
                 timeout: float = 900.0,
                 now: Callable[[], datetime.datetime] = db_api.utcnow,
                 nova: NovaLookup | None = None,
                 deleted_confirmations: int = 2,
                 worker: str | None = None, begin_step_bound: float = 90.0,
                 reconcile_interval: float = 0.0,
                 reap_interval: float | None = None, reap_max_checks: int = 50,
                 reap_budget: float = 60.0,
                 witness: WitnessPolicy = NO_WITNESS,
                 post_import_check: bool = True,
                 require_stream_check: bool = False) -> None:
        """``worker``: this engine run (``worker_id``), recorded by each
        ``begin`` and holding a lease (``service``); ``begin_step_bound``:
        the longest one begin step can take (the agent RPC timeout +
        ``BEGIN_STEP_SLACK``), for begins that recorded no run.
        ``post_import_check``: ``[engine] post_import_check``
        (``_check_imported_state``); ``require_stream_check``: ``[engine]
        require_stream_check`` (the proxies' stream digests must both be
        there)."""
        self.post_import_check = post_import_check
        self.require_stream_check = require_stream_check
        self.db = db
        self.agents = agents
        self.trust = trust
        self.timeout = timeout
        self.now = now
        self.worker = worker
        self.begin_step_bound = begin_step_bound
        # the begins this run is executing now, counted (a retried begin of
        # one id may run beside the first one) (``begin_abandoned``)
        self._begins_here: collections.Counter[str] = collections.Counter()
        self._begins_lock = threading.Lock()
        self._init_shelving(
            nova, deleted_confirmations,
            reconcile_interval if reap_interval is None else reap_interval,
            reap_max_checks, reap_budget, witness)
        # the sources' shreds a commit left to run after its answer
        # (``commit(shred_later=True)``); reconcile finishes any it loses
        self._after_commit = BackgroundJobs(workers=2, limit=AFTER_COMMIT_QUEUE)

    # --- vTPCM lifecycle through the authority ---------------------------------

    def create_vtpcm(self, instance_uuid: str, host: str) -> db_api.VtpcmRecord:
        """Reserve the record, then ask the agent: of two creates for one
        instance (or a create while it has a vTPCM) only the one holding the
        reservation reaches an agent, so no VM gets a second vTPCM.

        The reservation carries a token of its own (``vtpcm_id``), so a late
        answer completes only its own reservation. A create that failed at
        the agent (signed) frees it. If the answer is lost or unverifiable
        (unreachable, timeout, unsigned, a replay, a refusal decided by the
        clock), the command was refused at verification (``CommandRefused``:
        it may have run before, or run later) or the agent already holds a
        vTPCM of the instance (``AlreadyExists``), the record stays
        CREATING: the vTPCM may exist, and ``destroy_vtpcm`` removes both.

        The host needs a fresh TRUSTED verdict (attested now if it has none)
        and APPROVED status, as a migration's destination does: a forced
        boot skips the scheduler filter, and a tenant's new TPM must not
        start life on an unattested platform.

        The record keeps the project Nova shows owning the instance now
        (``_owner_project``): an unshelve witness must come from it later.

        Never for an instance whose vTPCM the reaper destroyed (its audit
        entry is the tombstone): a fresh TPM would silently stand in for
        the one the guest had."""
        if self.db.has_audit(instance_uuid, REAPED, "destroyed"):
            why = ("its vTPCM was destroyed when Nova showed the instance deleted; "
                   "a fresh one would silently replace the guest's TPM")
            self.db.audit("vtpcm.create", "refused", host=host, instance=instance_uuid,
                          detail=why)
            raise exception.CommandRefused(method="create_vtpcm", reason=why)
        host_rec, why = self._trusted_destination(host, self.trust.check_fresh(host))
        if host_rec is None:
            self.db.audit("vtpcm.create", "refused", host=host, instance=instance_uuid,
                          detail="host not trusted: %s" % why)
            raise exception.HostNotTrusted(host=host, reason=why)
        owner = self._owner_project(instance_uuid)
        token = RESERVED_PREFIX + str(uuid.uuid4())
        self.db.create_vtpcm(instance_uuid, token, host, state=CREATING, now=self.now(),
                             owner_project=owner)
        try:
            info = self.agents.create(host, instance_uuid)
        except exception.ServiceUnreachable:
            self.db.audit("vtpcm.create", "unknown", host=host, instance=instance_uuid,
                          detail="agent did not answer; record left CREATING")
            raise
        except exception.AlreadyExists as err:
            # The agent holds a vTPCM of this instance (an earlier create of
            # this reservation may have run): never orphan it.
            self.db.audit("vtpcm.create", "exists", host=host, instance=instance_uuid,
                          detail="%s; record left CREATING until destroyed" % err)
            raise
        except exception.CommandRefused as err:
            # Refused at verification (signature, keys, addressing): signed,
            # but it does not prove that this create never ran (an earlier
            # delivery may have) or cannot run later (a key reload, a clock).
            self.db.audit("vtpcm.create", "unknown", host=host, instance=instance_uuid,
                          detail="%s; record left CREATING until destroyed" % err)
            raise
        except exception.VTPCMException as err:
            # The agent's signed word that this create ran and failed (and
            # cleaned up) or was refused by the agent's own checks; a replay
            # of it is never signed, so it cannot stand for a create that ran.
            self.db.delete_vtpcm(instance_uuid, 0, expected_state=CREATING,
                                 expected_vtpcm_id=token)
            self.db.audit("vtpcm.create", "refused", host=host, instance=instance_uuid,
                          detail=str(err))
            raise
        except BaseException:
            self.db.audit("vtpcm.create", "unknown", host=host, instance=instance_uuid,
                          detail="create interrupted; record left CREATING")
            raise
        return self._complete_create(instance_uuid, host, token, info)

    def _complete_create(self, instance_uuid: str, host: str, token: str,
                         info: am.VTPCMInfo) -> db_api.VtpcmRecord:
        """Fill in reservation ``token`` with what ``host``'s agent made."""
        if not self.db.complete_vtpcm(instance_uuid, token, info.vtpcm_id, info.generation,
                                      info.state):
            # our reservation was destroyed meanwhile: undo what the agent made
            LOG.warning("vTPCM of instance %(i)s was created on %(h)s after its "
                        "reservation was dropped: destroying it",
                        {"i": instance_uuid, "h": host})
            self.agents.destroy(host, instance_uuid)
            raise exception.VTPCMBusy(instance_uuid=instance_uuid,
                                      reason="its reservation was destroyed during the create")
        self.db.audit("vtpcm.create", "created", host=host, instance=instance_uuid,
                      detail="generation %d" % info.generation)
        return self.db.get_vtpcm(instance_uuid)

    def destroy_vtpcm(self, instance_uuid: str, requested_by: str | None = None) -> None:
        """Crypto-shred the vTPCM where it lives, then drop the record.

        ``requested_by``: the host that asked (signed); the vTPCM must still
        live there. The record is first claimed (DESTROYING, same generation,
        no migration), so a migration cannot start or move it meanwhile and a
        destroy meant for the old place never reaches the new one."""
        rec = self.db.get_vtpcm(instance_uuid)
        if rec.migration_id is not None:
            raise exception.MigrationError(
                migration_id=rec.migration_id, reason="vTPCM is migrating; abort first")
        if requested_by is not None and rec.host != requested_by:
            raise exception.CommandRefused(
                method="destroy_vtpcm",
                reason="the vTPCM lives on %s, not on %s" % (rec.host, requested_by))
        if rec.state == CREATING:
            self._destroy_reservation(rec)
            return
        if not self.db.set_vtpcm_state(instance_uuid, rec.generation, DESTROYING,
                                       expected_state=rec.state, expected_migration_id=None):
            raise exception.VTPCMBusy(instance_uuid=instance_uuid,
                                      reason="its record changed meanwhile; retry")
        self.agents.destroy(rec.host, instance_uuid)
        self.db.delete_vtpcm(instance_uuid, rec.generation, expected_state=DESTROYING)
        self.db.audit("vtpcm.destroy", "destroyed", host=rec.host, instance=instance_uuid)

    def replace_vtpcm(self, instance_uuid: str, host: str,
                      requested_by: str | None = None) -> db_api.VtpcmRecord:
        """Evacuation with state loss, which the operator allowed on the
        target's nova-compute (``[vtpcm] evacuate_with_fresh_vtpcm``): the
        vTPCM of a failed host is abandoned and ``host`` gets a fresh one.

        Only ``host`` itself may ask, never during a migration, creation or
        destruction, only with a fresh TRUSTED verdict (checked before the
        record changes), and only once the operator decided the holder is
        gone: its host must be REVOKED (``vtpcm-manage hosts revoke``). A
        silent agent is no such decision (a restart or a partition looks
        the same). The old record becomes the target's reservation and an
        abandoned record in one transaction: the engine never starts the
        old copy again, and reconcile destroys it on its host once that
        agent answers. A refused create puts the old record back. Audited
        as state loss once the fresh vTPCM exists."""
        rec = self.db.get_vtpcm(instance_uuid)
        refusal = ""
        if requested_by not in (None, host):
            refusal = "signed by %s, not by %s" % (requested_by, host)
        elif rec.host == host:
            refusal = "the vTPCM already lives on %s" % host
        elif rec.migration_id is not None:
            refusal = "migration %s holds the vTPCM" % rec.migration_id
        elif rec.state in (CREATING, DESTROYING):
            refusal = "the vTPCM is %s" % rec.state
        else:
            refusal = self._holder_gone(rec.host)
        if refusal:
            self.db.audit("vtpcm.evacuate", "refused", host=host, instance=instance_uuid,
                          detail=refusal[:1000])
            raise exception.CommandRefused(method="replace_vtpcm", reason=refusal)
        host_rec, why = self._trusted_destination(host, self.trust.check_fresh(host))
        if host_rec is None:
            self.db.audit("vtpcm.evacuate", "refused", host=host, instance=instance_uuid,
                          detail="host not trusted: %s" % why)
            raise exception.HostNotTrusted(host=host, reason=why)
        token = RESERVED_PREFIX + str(uuid.uuid4())
        if not self.db.abandon_vtpcm(rec, host, token, now=self.now()):
            self.db.audit("vtpcm.evacuate", "refused", host=host, instance=instance_uuid,
                          detail="its record changed meanwhile")
            raise exception.VTPCMBusy(instance_uuid=instance_uuid,
                                      reason="its record changed meanwhile; retry")
        try:
            info = self.agents.create(host, instance_uuid)
        except (exception.ServiceUnreachable, exception.AlreadyExists) as err:
            # as in create_vtpcm: a vTPCM may exist on ``host``; never orphan it
            self.db.audit("vtpcm.evacuate", "unknown", host=host, instance=instance_uuid,
                          detail=("create on %s not confirmed (%s); record left CREATING, "
                                  "the old vTPCM %s abandoned"
                                  % (host, err, rec.vtpcm_id))[:1000])
            raise
        except exception.VTPCMException as err:
            # the agent's signed word that the create did not run
            self.db.unabandon_vtpcm(rec, token)
            self.db.audit("vtpcm.evacuate", "refused", host=host, instance=instance_uuid,
                          detail=("create refused: %s" % err)[:1000])
            raise
        except BaseException:
            self.db.audit("vtpcm.evacuate", "unknown", host=host, instance=instance_uuid,
                          detail="create interrupted; record left CREATING, the old "
                                 "vTPCM %s abandoned" % rec.vtpcm_id)
            raise
        new = self._complete_create(instance_uuid, host, token, info)
        self.db.audit("vtpcm.evacuate", "state lost", host=rec.host, instance=instance_uuid,
                      detail="vTPCM %s (generation %d) on revoked host %s abandoned; a fresh "
                             "vTPCM on %s" % (rec.vtpcm_id, rec.generation, rec.host, host))
        LOG.warning("Instance %(i)s evacuated from %(old)s to %(new)s with a fresh vTPCM: "
                    "its TPM state (generation %(gen)d) is lost",
                    {"i": instance_uuid, "old": rec.host, "new": host, "gen": rec.generation})
        return new

    def _past_commit_point(self, migration_id: str) -> bool:
        try:
            state = self.db.get_migration(migration_id).state
        except exception.NotFound:
            return False
        return state in (M.COMMITTING.value, M.SHREDDING.value, M.COMMITTED.value)

    def _holder_gone(self, holder: str) -> str:
        """A refusal unless the operator revoked the holder's host."""
        try:
            status = self.db.get_host(holder).status
        except exception.NotFound:
            return ""
        if status is HostStatus.REVOKED:
            return ""
        return ("the holder %s is %s: evacuating a vTPCM instance with a fresh vTPCM "
                "needs the failed host revoked first (vtpcm-manage hosts revoke)"
                % (holder, status.value))

    def start_vtpcm(self, instance_uuid: str,
                    requested_by: str | None = None) -> tuple[str, am.VTPCMInfo]:
        """Start the swtpm where the vTPCM lives, only at the authoritative
        generation (an older one is never activated again). Idempotent: the
        agent leaves a running swtpm as it is. Returns (host, agent's answer)."""
        rec = self._powered_record("start_vtpcm", instance_uuid, requested_by)

        def start(host: str, instance: str) -> am.VTPCMInfo:
            held = self.agents.get(host, instance)
            if held.generation != rec.generation:
                raise exception.GenerationMismatch(
                    instance_uuid=instance, given=held.generation, expected=rec.generation)
            return self.agents.start(host, instance)
        return rec.host, self._power("start", rec, start)

    def stop_vtpcm(self, instance_uuid: str,
                   requested_by: str | None = None) -> tuple[str, am.VTPCMInfo]:
        """Stop the swtpm where the vTPCM lives (its state stays on disk).
        Idempotent: a stopped vTPCM stays stopped. Returns (host, answer)."""
        rec = self._powered_record("stop_vtpcm", instance_uuid, requested_by)
        return rec.host, self._power("stop", rec, self.agents.stop)

    def _powered_record(self, method: str, instance_uuid: str,
                        requested_by: str | None) -> db_api.VtpcmRecord:
        """The record of a vTPCM its holder may start or stop now:
        ``requested_by`` (the signing host) must still hold it, and no
        creation, destruction or migration may hold the record."""
        rec = self.db.get_vtpcm(instance_uuid)
        if requested_by is not None and rec.host != requested_by:
            raise exception.CommandRefused(
                method=method,
                reason="the vTPCM lives on %s, not on %s" % (rec.host, requested_by))
        if rec.migration_id is not None:
            raise exception.MigrationError(migration_id=rec.migration_id,
                                           reason="vTPCM is migrating")
        if rec.state in (CREATING, DESTROYING):
            raise exception.VTPCMBusy(
                instance_uuid=instance_uuid,
                reason="its %s is unfinished" % ("creation" if rec.state == CREATING
                                                 else "destruction"))
        return rec

    def _power(self, action: str, rec: db_api.VtpcmRecord,
               call: Callable[[str, str], am.VTPCMInfo]) -> am.VTPCMInfo:
        """Ask the holder's agent; audit its answer or its refusal."""
        event = "vtpcm." + action
        try:
            info = call(rec.host, rec.instance_uuid)
        except exception.VTPCMException as err:
            self.db.audit(event, "refused", host=rec.host, instance=rec.instance_uuid,
                          detail=str(err)[:1000])
            raise
        self.db.audit(event, "running" if info.running else "stopped", host=rec.host,
                      instance=rec.instance_uuid,
                      detail="generation %d, agent state %s" % (info.generation, info.state))
        return info

    def _destroy_reservation(self, rec: db_api.VtpcmRecord) -> None:
        """A create whose answer was lost: destroy what the agent may have
        made. If the agent knows nothing, a queued create could still run
        until its signature expires, so the reservation outlives that."""
        try:
            self.agents.destroy(rec.host, rec.instance_uuid)
        except exception.NotFound:
            age = (self.now() - rec.updated_at).total_seconds()
            if age < COMMAND_LIFETIME:
                raise exception.VTPCMBusy(
                    instance_uuid=rec.instance_uuid,
                    reason="its create may still reach host %s; retry in %d s"
                           % (rec.host, COMMAND_LIFETIME - age + 1)) from None
        self.db.delete_vtpcm(rec.instance_uuid, rec.generation, expected_state=CREATING,
                             expected_vtpcm_id=rec.vtpcm_id)
        self.db.audit("vtpcm.destroy", "destroyed", host=rec.host,
                      instance=rec.instance_uuid, detail="unfinished creation")

    def _record_incoming_id(self, ctx: am.MigrationContext) -> None:
        """The destination made a vTPCM of its own (new id): record it. Only
        bookkeeping for operators, so a failure here does not fail the commit."""
        try:
            info = self.agents.get(ctx.dest_host, ctx.instance_uuid)
            self.db.set_vtpcm_id(ctx.instance_uuid, ctx.dest_host, ctx.generation + 1,
                                 info.vtpcm_id)
        except exception.VTPCMException as err:
            LOG.warning("Migration %(m)s: could not record the destination's vTPCM id "
                        "of instance %(i)s: %(err)s",
                        {"m": ctx.migration_id, "i": ctx.instance_uuid, "err": err})

    # --- protocol steps -----------------------------------------------------------

    def check_destination(self, instance_uuid: str, dest: str) -> db_api.VerdictRecord:
        """Fail closed unless ``dest`` has a fresh TRUSTED verdict (attest now if stale)."""
        verdict = self.trust.check_fresh(dest)
        if not _trusted(verdict):
            self.db.audit("migration.check_destination", "refused", host=dest,
                          instance=instance_uuid, detail=_reason(verdict))
            raise exception.HostNotTrusted(host=dest, reason=_reason(verdict))
        return verdict

    def begin(self, migration_id: str, instance_uuid: str, source: str,
              dest: str, *, unshelve: bool = False) -> db_api.MigrationRecord:
        """``_begin``, known to this run's reconcile as running here from
        before its record is written until it returns."""
        with self._begins_lock:
            self._begins_here[migration_id] += 1
        try:
            return self._begin(migration_id, instance_uuid, source, dest, unshelve=unshelve)
        finally:
            with self._begins_lock:
                self._begins_here[migration_id] -= 1
                if not self._begins_here[migration_id]:
                    del self._begins_here[migration_id]

    def _tombstoned(self, rec: db_api.MigrationRecord, instance_uuid: str,
                    dest: str) -> exception.MigrationError:
        detail = ("its caller aborted it before the engine recorded its begin; a new "
                  "migration needs a new id")
        self._refuse_audit(rec.migration_id, instance_uuid, dest, detail)
        return exception.MigrationError(migration_id=rec.migration_id,
                                        reason="this migration was aborted (%s)" % detail)

    def _reused_id(self, migration_id: str, instance_uuid: str,
                   dest: str) -> exception.MigrationError:
        self._refuse_audit(migration_id, instance_uuid, dest,
                           "migration id reused with other parameters")
        return exception.MigrationError(
            migration_id=migration_id,
            reason="this migration id was used for another instance or hosts")

    def _running_here(self, migration_id: str) -> bool:
        with self._begins_lock:
            return self._begins_here[migration_id] > 0

    def _begin(self, migration_id: str, instance_uuid: str, source: str,
               dest: str, *, unshelve: bool = False) -> db_api.MigrationRecord:
        """Seal the key for dest's TPM and prepare dest; idempotent per
        migration id while it is PREPARED. Any other state of a known id is
        refused: a begin answered with a finished or committing migration
        would tell the driver to start libvirt for nothing.

        A SHELVED vTPCM moves only through ``unshelve_vtpcm`` (``unshelve``):
        a migration begun on it would end, on abort, with the shelve undone.
        The record's state before the claim is kept with the migration, and
        an abort restores it."""
        view = self.db.begin_view(migration_id, instance_uuid)  # one read, not a snapshot
        rec = view.migration
        if (rec is not None and rec.error == TOMBSTONE_REASON
                and rec.instance_uuid == instance_uuid):
            raise self._tombstoned(rec, instance_uuid, dest)
        if rec is not None:  # a tombstone of another instance: a reused id
            if (rec.instance_uuid, rec.source, rec.dest) != (instance_uuid, source, dest):
                raise self._reused_id(migration_id, instance_uuid, dest)
            if rec.state == M.PREPARED:
                return rec  # a retried begin whose answer was lost
            if rec.state in p.TERMINAL:
                raise exception.MigrationError(
                    migration_id=migration_id,
                    reason="this migration already ended (%s); a new migration needs "
                           "a new id" % rec.state)
            raise exception.MigrationError(migration_id=migration_id,
                                           reason="migration is %s" % rec.state)
        if source == dest:
            raise exception.MigrationError(migration_id=migration_id,
                                           reason="source and destination are the same host")
        # only the shreds on the host about to receive the vTPCM wait for
        # this begin; others run in the background (or reconcile)
        back = tuple(mid for mid, state, old_source in view.unfinished
                     if state == M.SHREDDING.value and old_source == dest)
        if back:
            self._finish_shreds(instance_uuid, back)
            view = self.db.begin_view(migration_id, instance_uuid)
        # Any other earlier migration of this vTPCM still unfinished refuses
        # the begin before anything is claimed (review M2, M3): one
        # COMMITTING (a worker killed past the commit point) has the record
        # on its destination already, with no claim left to lose; a shred
        # not confirmed on the host about to receive the vTPCM would send
        # it back to a host still holding its old copy. Retryable: reconcile
        # finishes the earlier one.
        for earlier, state, old_source in view.unfinished:
            if state == M.SHREDDING.value and old_source != dest:
                continue  # shredded in the background; not on dest
            detail = ("an earlier migration %s of this vTPCM is unfinished (%s%s); "
                      "retry once it has ended (reconcile finishes it)"
                      % (earlier, state,
                         ", its shred on the destination is unconfirmed"
                         if state == M.SHREDDING.value else ""))
            self._refuse_audit(migration_id, instance_uuid, dest, detail)
            raise exception.MigrationError(migration_id=migration_id, reason=detail)
        if view.vtpcm is None:
            raise exception.NotFound(what="vTPCM of instance", key=instance_uuid)
        vtpcm = view.vtpcm
        if vtpcm.state == CREATING:
            raise exception.MigrationError(
                migration_id=migration_id,
                reason="the vTPCM's creation is unfinished (state CREATING); "
                       "destroy the vTPCM and create it again")
        if vtpcm.state == DESTROYING:
            raise exception.MigrationError(migration_id=migration_id,
                                           reason="the vTPCM is being destroyed")
        if vtpcm.state == SHELVED and not unshelve:
            detail = "the vTPCM is shelved: only an unshelve moves it"
            self._refuse_audit(migration_id, instance_uuid, dest, detail)
            raise exception.MigrationError(migration_id=migration_id, reason=detail)
        dest_host, distrust = self._destination_gate(dest)
        # The source agent must hold this generation ACTIVE or STOPPED
        # before anything is claimed: a source without it (reinstalled, its
        # association lost) refuses the begin cleanly. Claimed first, the
        # seal's refusal would leave an abort that cannot restore a copy the
        # source does not have, the record claimed for good (review M1).
        # The seal checks it again in the step that marks it MIGRATING_OUT.
        source_gen_ok = False
        if vtpcm.host == source and vtpcm.migration_id is None:
            info = self.agents.get(source, instance_uuid)
            source_gen_ok = (info.generation == vtpcm.generation
                             and info.state in ("ACTIVE", "STOPPED"))
        trusted = dest_host is not None
        # Claim the vTPCM for this migration before anything moves, in the
        # transaction that records the migration: of two concurrent begins
        # exactly one wins; the other ends REFUSED without touching any agent.
        claim = trusted and vtpcm.host == source and source_gen_ok

        def decided(claimed: bool) -> tuple[p.MigrationProtocol, list[p.Action]]:
            proto = p.MigrationProtocol(migration_id)
            return proto, proto.handle(p.Begin(
                destination_trusted=trusted,
                source_is_location=vtpcm.host == source,
                generation_matches=source_gen_ok and (claimed or not trusted),
                reason="another migration holds the vTPCM" if claim and not claimed
                else distrust))
        proto, actions = decided(claim)
        lost = decided(False) if claim else None
        deadline = self.now() + datetime.timedelta(seconds=self.timeout)
        ctx = am.MigrationContext(migration_id, instance_uuid, vtpcm.generation, source, dest)
        try:
            made = self.db.create_migration(
                migration_id, instance_uuid, source, dest, vtpcm.generation,
                proto.state.value, deadline, prior_state=vtpcm.state, begun_by=self.worker,
                audits=_audits(ctx, actions),
                claim=db_api.VtpcmClaim(vtpcm.state, lost[0].state.value,
                                        tuple(_audits(ctx, lost[1]))) if lost else None)
        except exception.AlreadyExists:
            # written meanwhile (nothing of this begin was: one transaction):
            # its caller's abort, or a concurrent begin of the same id
            rec = self.db.get_migration(migration_id)
            if rec.error == TOMBSTONE_REASON and rec.instance_uuid == instance_uuid:
                raise self._tombstoned(rec, instance_uuid, dest) from None
            if rec.instance_uuid != instance_uuid:
                raise self._reused_id(migration_id, instance_uuid, dest) from None
            raise exception.MigrationError(
                migration_id=migration_id,
                reason="a concurrent begin of this migration id recorded it (%s)"
                       % rec.state) from None
        if lost is not None and made.state != proto.state.value:
            proto, actions = lost
        detail = next((a.detail for a in actions if isinstance(a, p.Audit)), "")
        actions = [a for a in actions if not isinstance(a, p.Audit)]  # written above
        if proto.state is M.REFUSED:
            self._run(proto, ctx, actions)
            if not trusted:
                raise exception.HostNotTrusted(host=dest, reason=distrust)
            raise exception.MigrationError(migration_id=migration_id, reason=detail)
        assert dest_host is not None
        self._run(proto, ctx, actions, kem_public=dest_host.kem_public)
        if proto.state is not M.PREPARED:
            rec = self.db.get_migration(migration_id)
            raise exception.MigrationError(migration_id=migration_id,
                                           reason=rec.error or "aborted")
        # as this call's own compare-and-set wrote it (no read back)
        return dataclasses.replace(made, state=proto.state.value)

    def commit(self, migration_id: str, requested_by: str | None = None, *,
               shred_later: bool = False,
               check_import: bool = True) -> db_api.MigrationRecord:
        """Pass the commit point and finish the commit. Idempotent for its
        caller: a commit of a COMMITTED migration is a success, and one of a
        migration whose commit is under way (COMMITTING, SHREDDING) runs the
        steps left, as reconcile would.

        ``shred_later`` (engine API 1.11): answer once the destination's
        commit is recorded (SHREDDING, durable), and shred the source's copy
        right after the answer, in this worker's background (reconcile
        finishes it if this worker dies). The source's copy is MIGRATING_OUT
        of a migration past its commit point: no agent makes it live again
        but on an engine-signed abort or reclaim, which the engine never
        sends from SHREDDING (design.rst, "The source's shred after the
        answer").

        ``requested_by``: the signing host. Before the commit point only the
        source's word counts (it saw the migration complete); the
        destination may sign a commit already past it (finish a retry).
        What the agents report about the switchover (signed, but a stopped
        source swtpm also means a guest powered off there) cannot stand in
        for the source's signature: taking it would shred a source the
        guest may still need.

        Before the commit point the destination must still be APPROVED
        with a TRUSTED last verdict (``_commit_distrust``): the authority
        never moves to a host revoked, re-pending or failed since ``begin``.
        The migration then stays where it is (design.rst, "Commit to a
        demoted destination").

        Then, with ``[engine] post_import_check``, the destination's
        imported permanent state must be the source's
        (``_check_imported_state``): refused, the migration stays where it
        is too. ``check_import`` False: an operator's explicit decision
        (``migration resolve --to destination``), which skips that check."""
        proto, ctx, rec = self._load(migration_id)
        self._settle_deadline_abort(proto, ctx, rec)
        if proto.state in (M.COMMITTING, M.SHREDDING):
            # past the commit point, a step failed: the retry finishes it
            return self._finish_commit(migration_id, shred_later)
        before_point = proto.state in (M.PREPARED, M.TRANSFERRING, M.TRANSFERRED,
                                       M.IN_DOUBT)
        if requested_by not in (None, ctx.source_host) and before_point:
            detail = "signed by %s, not the source, before the commit point" % requested_by
            self.db.audit("migration.commit", "refused", host=requested_by,
                          instance=ctx.instance_uuid, migration_id=migration_id,
                          detail=detail)
            raise exception.MigrationError(
                migration_id=migration_id,
                reason="only the source may pass the commit point (migration is %s)"
                       % proto.state.value)
        distrust = self._commit_distrust(ctx.dest_host) if before_point else None
        if distrust is not None:
            self.db.audit("migration.commit", "refused", host=ctx.dest_host,
                          instance=ctx.instance_uuid, migration_id=migration_id,
                          detail="destination %s: %s; the authority stays on %s "
                                 "(migration %s)" % (ctx.dest_host, distrust,
                                                     ctx.source_host, proto.state.value))
            raise exception.HostNotTrusted(host=ctx.dest_host, reason=distrust)
        if proto.state is M.TRANSFERRED:
            self._check_incoming_ready(ctx)
        if (self.post_import_check and check_import and proto.state in IMPORT_CHECKED
                and self._came_live(proto.state, migration_id)):
            try:
                self._check_imported_state(ctx)
            except exception.VTPCMException as err:
                if self._moved_past(migration_id, proto.state):
                    # another commit passed the point meanwhile (two commits
                    # of one migration, a resolve): the agents' answers, or
                    # refusals, were about a moving target; finish it
                    return self._finish_commit(migration_id, shred_later)
                if isinstance(err, (exception.ImportedStateMismatch,
                                    exception.ImportedStateUnverified)):
                    self._audit_import_refusal(ctx, proto.state, err)
                    raise
                now = self.db.get_migration(migration_id).state
                if now != proto.state.value:
                    # an abort moved it on meanwhile (the agents' "not
                    # found" was about a discarded incoming vTPCM): the
                    # commit lost that race, as a lost compare-and-set in
                    # _advance would have told it. The agents' error is
                    # logged: it may be more than the race (a reply that
                    # did not verify; review of ba2b3ea, LOW 2)
                    LOG.warning("Migration %(mig)s: its post-import check failed (%(err)s) "
                                "while the migration moved from %(was)s to %(now)s",
                                {"mig": migration_id, "err": err,
                                 "was": proto.state.value, "now": now})
                    raise exception.MigrationError(
                        migration_id=migration_id,
                        reason="state changed concurrently (expected %s, now %s) while "
                               "its post-import check ran" % (proto.state.value, now)
                    ) from None
                raise
        try:
            self._advance(proto, ctx, p.CommitRequested(), shred_later=shred_later)
        except exception.MigrationError:
            if not self._moved_past(migration_id, proto.state):
                raise
        else:
            reached = cast(M, proto.state)  # _advance moved it (mypy keeps the narrowing)
            if shred_later and reached is M.SHREDDING:
                # this call's own compare-and-sets got it here: no read back
                self._shred_in_background(ctx)
                return dataclasses.replace(rec, state=proto.state.value)
        return self._finish_commit(migration_id, shred_later)

    def _moved_past(self, migration_id: str, believed: M) -> bool:
        """Whether another commit or reconcile moved the migration on from
        ``believed`` (the state this call last saw or wrote) and past the
        commit point: a compare-and-set this call lost, not a failed step."""
        state = self.db.get_migration(migration_id).state
        return state != believed.value and self._past_commit_point(migration_id)

    def _finish_commit(self, migration_id: str,
                       shred_later: bool = False) -> db_api.MigrationRecord:
        """Run the steps left of a commit past its commit point, as
        reconcile would, until it is COMMITTED: the commit is decided, so
        its caller gets success. Another commit or reconcile running the
        same (idempotent) steps may move the state first; that is progress,
        not a failure (under load the engine answered "state changed
        concurrently" to commits that went through, found by
        tests/functional/engine/test_load.py). A step that fails without
        such progress (an agent unreachable) still fails the call; the
        caller retries and reconcile finishes it. Bounded: every pass moves
        the migration one state on, or raises. ``shred_later``: stop at
        SHREDDING and leave the source's shred to ``_shred_after_answer``."""
        for _ in range(len(p.PENDING_WORK)):
            proto, ctx, _ = self._load(migration_id)
            if proto.state not in (M.COMMITTING, M.SHREDDING):
                break
            if shred_later and proto.state is M.SHREDDING:
                self._shred_in_background(ctx)
                break
            if proto.state is M.SHREDDING:
                # its id may be unrecorded yet (a shred_later commit)
                self._record_incoming_id(ctx)
            try:
                self._run(proto, ctx, p.pending_actions(proto.state),
                          shred_later=shred_later)
            except exception.MigrationError:
                if not self._moved_past(migration_id, proto.state):
                    raise  # no one moved it: the step itself failed
        return self.db.get_migration(migration_id)

    def _shred_in_background(self, ctx: am.MigrationContext) -> None:
        if not self._after_commit.submit(self._shred_after_answer, ctx):
            LOG.info("Migration %(mig)s: the source's shred is left to reconcile "
                     "(background queue full or stopping)", {"mig": ctx.migration_id})

    def stop_background(self, timeout: float) -> None:
        """At the engine's stop, after its RPC server drained: no new
        background shred; the queued ones are left to reconcile, the
        running ones get at most ``timeout`` seconds."""
        self._after_commit.stop(timeout)

    def _shred_after_answer(self, ctx: am.MigrationContext) -> None:
        """After a ``shred_later`` commit answered: record the destination's
        vTPCM id, then shred the source's copy (``_finish_commit``). A
        failure is left to reconcile (SHREDDING is pending work)."""
        try:
            self._finish_commit(ctx.migration_id)  # records the id first
        except exception.VTPCMException as err:
            LOG.warning("Migration %(mig)s: the source's shred after the commit's answer "
                        "failed (reconcile finishes it): %(err)s",
                        {"mig": ctx.migration_id, "err": err})
        except Exception:  # a background thread: its error goes to the log, not lost
            LOG.exception("Migration %(mig)s: the source's shred after the commit's "
                          "answer failed (reconcile finishes it)", {"mig": ctx.migration_id})

    def _finish_shreds(self, instance_uuid: str, migration_ids: tuple[str, ...]) -> None:
        """Before a new begin of the instance to the host an earlier
        commit left a copy on for after its answer (SHREDDING): try to
        shred it, waiting at most ``PRE_SHRED_WAIT`` seconds (not a full
        RPC timeout inside Nova's begin). The caller reads the state again
        and refuses the begin unless the shred is recorded done: a shred
        that failed or is still running is left to reconcile (or its
        thread), and the begin is retried."""
        def shred() -> None:
            for migration_id in migration_ids:
                try:
                    self._finish_commit(migration_id)
                except exception.VTPCMException as err:
                    LOG.warning("Migration %(mig)s: the source's shred before a new begin "
                                "of instance %(i)s failed: %(err)s",
                                {"mig": migration_id, "i": instance_uuid, "err": err})
                except Exception:  # a thread of its own: logged, not lost
                    LOG.exception("Migration %(mig)s: the source's shred before a new "
                                  "begin failed", {"mig": migration_id})
        # a daemon thread: one that outlives the bound finishes (or fails)
        # on its own, and never holds the interpreter's exit
        worker = threading.Thread(target=shred, name="vtpcm-pre-shred", daemon=True)
        worker.start()
        worker.join(PRE_SHRED_WAIT)

    def _check_incoming_ready(self, ctx: am.MigrationContext) -> None:
        """Before a cold migration's commit point: the destination must
        still hold this migration's incoming vTPCM (its agent's signed
        word), or the commit would pass the point of no revert and then
        wait on a destination that cannot commit. Refused, the migration
        stays TRANSFERRED: a revert still restores the source."""
        info = self.agents.get(ctx.dest_host, ctx.instance_uuid)
        if (info.state, info.migration_id, info.generation) == \
                ("MIGRATING_IN", ctx.migration_id, ctx.generation):
            return
        detail = ("the destination %s holds no incoming vTPCM of this migration (its "
                  "vTPCM is %s of migration %s at generation %d); revert the resize"
                  % (ctx.dest_host, info.state, info.migration_id, info.generation))
        self.db.audit("migration.commit", "refused", host=ctx.dest_host,
                      instance=ctx.instance_uuid, migration_id=ctx.migration_id,
                      detail=detail)
        raise exception.MigrationError(migration_id=ctx.migration_id, reason=detail)

    def check_import_for_resolve(self, migration_id: str) -> ImportCheck | None:
        """The post-import check an operator's ``resolve --to destination``
        runs itself (fresh nonce), with its outcome in plain words; None
        where it does not apply (past the commit point, the cold path, no
        state received yet). Never raises for the agents' answers: a check
        that got no answer is an outcome the plan shows."""
        proto, ctx, _ = self._load(migration_id)
        if proto.state not in IMPORT_CHECKED or not self._came_live(proto.state,
                                                                      migration_id):
            return None
        if not self.post_import_check:
            return ImportCheck(None, "The post-import check is off ([engine] "
                                     "post_import_check): the destination's permanent "
                                     "state is not compared with the source's.")
        try:
            self._check_imported_state(ctx)
        except exception.ImportedStateMismatch as err:
            return ImportCheck(False, "Post-import check: the destination's state is NOT "
                                      "the source's (%s)." % err.kwargs.get("reason", err))
        except exception.ImportedStateUnverified as err:
            return ImportCheck(False, "Post-import check: cannot be checked: %s."
                               % err.kwargs.get("reason", err))
        except exception.VTPCMException as err:
            return ImportCheck(False, "Post-import check: no answer: %s." % err)
        return ImportCheck(True, "Post-import check passed: the destination imported the "
                                 "source's permanent state.")

    def _came_live(self, state: M, migration_id: str) -> bool:
        """Whether a commit from ``state`` follows a live migration's stream
        (so the post-import check applies): PREPARED always; IN_DOUBT only
        if the engine never transferred the blobs itself (no audited
        transfer: the protocol writes one on each TRANSFERRED, so no schema
        change is needed to tell the paths apart)."""
        if state is not M.IN_DOUBT:
            return True
        return not self.db.migration_audit_details(migration_id, *TRANSFER_AUDIT)

    def _check_imported_state(self, ctx: am.MigrationContext) -> None:
        """The post-import check, right before the commit point: the
        permanent state the destination's swtpm first wrote after the
        import must be byte for byte the source's current one. Why: a live
        migration's stream is written by the destination's QEMU and swtpm
        takes an older state under the same key (or a plaintext one), so
        whoever writes that stream could otherwise roll the vTPCM back.

        Both agents answer a digest keyed with one fresh nonce (signed
        replies, unsigned read-only requests), asked at once: the
        destination on a short-lived thread while this one asks the
        source, and both finish (answer or fail, each call bounded by the
        RPC timeout) before anything is decided, so nothing is left
        behind. Different digests:
        ``ImportedStateMismatch``; an agent answering for the other side,
        a side that cannot tell, or an agent older than API 1.12:
        ``ImportedStateUnverified`` (``commit``
        audits both and leaves the migration as it is). A transport error
        or an answer that does not verify propagates: the caller retries."""
        nonce = os.urandom(statedigest.NONCE_SIZE)
        sides = (("source", ctx.source_host), ("destination", ctx.dest_host))
        outcomes: dict[str, am.StateDigest | BaseException] = {}

        def ask(side: str, host: str) -> None:
            try:
                outcomes[side] = self._state_digest(ctx, side, host, nonce)
            except BaseException as err:  # handed to the caller below
                outcomes[side] = err

        other = threading.Thread(target=ask, args=sides[1], daemon=True,
                                 name="vtpcm-state-digest")
        other.start()
        try:
            ask(*sides[0])
        finally:
            other.join()
        # an agent answering for the other side, then a side's "cannot
        # tell", are definitive whatever the other side's (retryable) error:
        # a retry would only be refused again. The misdirection first: it
        # is what the operator must see (review of 5b5c480, LOW 1)
        for side, host in sides:
            answer = outcomes[side]
            if not isinstance(answer, BaseException) and answer.side != side:
                raise exception.ImportedStateUnverified(
                    migration_id=ctx.migration_id,
                    reason="the agent of %s answered the %s's digest when asked the %s's"
                           % (host, answer.side, side))
        for side, host in sides:
            answer = outcomes[side]
            if not isinstance(answer, BaseException) and answer.digest is None:
                raise exception.ImportedStateUnverified(
                    migration_id=ctx.migration_id,
                    reason="the %s %s cannot tell its permanent state: %s"
                           % (side, host, answer.reason or "no reason given"))
        if all(isinstance(outcomes[side], BaseException) for side, _ in sides):
            LOG.warning("Migration %(mig)s: the destination's state digest failed too: "
                        "%(err)s", {"mig": ctx.migration_id, "err": outcomes["destination"]})
        digests = []
        for side, _ in sides:
            answer = outcomes[side]
            if isinstance(answer, BaseException):
                raise answer
            assert answer.digest is not None  # a None answer was raised above
            digests.append(answer.digest)
        if not statedigest.same(digests[0], digests[1]):
            raise exception.ImportedStateMismatch(
                migration_id=ctx.migration_id,
                reason="the permanent state the destination %s imported is not the "
                       "source's; the authority stays on %s (post-import check)"
                       % (ctx.dest_host, ctx.source_host))
        answers = [outcomes[side] for side, _ in sides]
        streams = [a.stream for a in answers if isinstance(a, am.StateDigest)]
        if len(streams) == 2 and streams[0] is not None and streams[1] is not None:
            if not statedigest.same(streams[0], streams[1]):
                raise exception.ImportedStateMismatch(
                    migration_id=ctx.migration_id,
                    reason="the state blobs the destination %s's QEMU set are not the ones "
                           "the source %s's QEMU read (the volatile state, PCRs included, "
                           "may be older); the authority stays on %s (post-import check)"
                           % (ctx.dest_host, ctx.source_host, ctx.source_host))
            LOG.info("Migration %(mig)s: post-import check passed, the destination %(dst)s "
                     "imported the source's permanent state and its QEMU set the blobs the "
                     "source's QEMU read", {"mig": ctx.migration_id, "dst": ctx.dest_host})
            return
        why = "; ".join("the %s: %s" % (side, getattr(outcomes[side], "stream_reason", "")
                                         or "no stream digest (agent below API 1.13)")
                        for side, _ in sides
                        if getattr(outcomes[side], "stream", None) is None)
        if self.require_stream_check:
            raise exception.ImportedStateUnverified(
                migration_id=ctx.migration_id,
                reason="the state blobs cannot be compared ([engine] require_stream_check): "
                       + why)
        LOG.warning("Migration %(mig)s: post-import check passed on the permanent state "
                    "only; the state blobs (volatile state) were not compared: %(why)s",
                    {"mig": ctx.migration_id, "why": why})

    def _state_digest(self, ctx: am.MigrationContext, side: str, host: str,
                      nonce: bytes) -> am.StateDigest:
        """One side's answer; an agent that cannot take API 1.12 (capped
        here, or an older agent) is ``ImportedStateUnverified``."""
        try:
            try:
                return self.agents.state_digest(host, ctx, side, nonce)
            except (exception.RPCVersionUnsupported, exception.ReplyNotAuthenticated):
                # a 1.12 agent refuses the 1.13 request (and a verifying
                # client takes its unsigned refusal for no answer): its
                # signed health says which; then it is asked as 1.12
                if not self._agent_between(host, STATE_DIGEST_VERSION, STREAM_DIGEST_VERSION):
                    raise
                return self.agents.state_digest(host, ctx, side, nonce, streams=False)
        except (exception.RPCVersionCapped, exception.RPCVersionUnsupported) as err:
            raise exception.ImportedStateUnverified(
                migration_id=ctx.migration_id,
                reason="the %s %s: %s" % (side, host, err)) from None
        except exception.ReplyNotAuthenticated:
            # a verifying client takes an older agent's "cannot serve" for
            # no answer (anyone could send it): its signed health says
            older = self._older_than_digest(host)
            if older is None:
                raise
            raise exception.ImportedStateUnverified(
                migration_id=ctx.migration_id,
                reason="the %s %s: %s" % (side, host, older)) from None

    def _agent_between(self, host: str, lowest: str, above: str) -> bool:
        """Whether an APPROVED ``host``'s signed health says its agent API is
        at least ``lowest`` and below ``above``."""
        try:
            if self.db.get_host(host).status is not HostStatus.APPROVED:
                return False
            version = rpc.parse_version(self.agents.health(host).api_version)
        except exception.VTPCMException:
            return False
        return rpc.parse_version(lowest) <= version < rpc.parse_version(above)

    def _older_than_digest(self, host: str) -> str | None:
        """Why ``host``'s agent cannot answer ``state_digest`` (its signed
        ``health`` reports an API older than 1.12), or None. Only an
        APPROVED host's word counts (``replykeys`` also verifies a revoked
        or pending host's health, toward safety): any other keeps the
        original error, so the commit is retried, not refused."""
        try:
            if self.db.get_host(host).status is not HostStatus.APPROVED:
                return None
            version = self.agents.health(host).api_version
            older = rpc.parse_version(version) < rpc.parse_version(STATE_DIGEST_VERSION)
        except exception.VTPCMException:
            return None
        if not older:
            return None
        return ("its agent runs agent API %s, older than %s (state_digest): upgrade it"
                % (version, STATE_DIGEST_VERSION))

    def _audit_import_refusal(self, ctx: am.MigrationContext, state: M,
                              err: exception.MigrationError) -> None:
        """Audit (and log) a commit the post-import check refused."""
        reason = str(err.kwargs.get("reason", err))
        self.db.audit("migration.commit", "refused", host=ctx.dest_host,
                      instance=ctx.instance_uuid, migration_id=ctx.migration_id,
                      detail=("%s: %s; the migration stays %s, the source's copy "
                              "untouched (migration show / resolve)"
                              % (POST_IMPORT_REFUSED, reason, state.value))[:4000])
        LOG.error("Migration %(mig)s: commit refused by the post-import check: "
                  "%(why)s", {"mig": ctx.migration_id, "why": reason})

    def transfer(self, migration_id: str,
                 requested_by: str | None = None) -> db_api.MigrationRecord:
        """Cold migration, resize: carry the vTPCM's blobs (encrypted by
        swtpm under the migration key; the engine sees only ciphertext)
        from the source into the destination's prepared incoming vTPCM.

        Only the source may ask: it holds the vTPCM and knows its guest is
        off. Once per migration: a retry after the state went is a no-op,
        and the destination refuses a second import anyway. A failed
        transfer aborts the migration (the source's copy stays live)."""
        proto, ctx, _ = self._load(migration_id)
        if requested_by not in (None, ctx.source_host):
            detail = "signed by %s, not the source %s" % (requested_by, ctx.source_host)
            self.db.audit("migration.transfer", "refused", host=requested_by,
                          instance=ctx.instance_uuid, migration_id=migration_id,
                          detail=detail)
            raise exception.CommandRefused(method="transfer_state", reason=detail)
        try:
            self._advance(proto, ctx, p.TransferRequested())
        except exception.InvalidTransition:
            self.db.audit("migration.transfer", "refused", host=ctx.source_host,
                          instance=ctx.instance_uuid, migration_id=migration_id,
                          detail="migration is %s" % proto.state.value)
            raise
        rec = self.db.get_migration(migration_id)
        if proto.state is not M.TRANSFERRED:
            raise exception.MigrationError(migration_id=migration_id,
                                           reason=rec.error or "aborted")
        return rec

    def start_incoming(self, migration_id: str, requested_by: str | None = None
                       ) -> tuple[str, am.VTPCMInfo]:
        """Cold migration, resize not yet confirmed: start the destination's
        incoming vTPCM again after its swtpm stopped with the guest (QEMU's
        CMD_SHUTDOWN), so the guest can run there before the confirm. Only
        the destination may ask, only while the destination holds the
        state and may run the guest (TRANSFERRED, IN_DOUBT); the agent
        starts only an incoming vTPCM that received its state. Nothing
        moves: the commit point is still the confirm. Returns (host, answer)."""
        proto, ctx, _ = self._load(migration_id)
        refusal = ""
        if requested_by not in (None, ctx.dest_host):
            refusal = "signed by %s, not the destination %s" % (requested_by, ctx.dest_host)
        elif proto.state not in (M.TRANSFERRED, M.IN_DOUBT):
            refusal = ("migration is %s: only a transferred incoming vTPCM not yet "
                       "committed is started" % proto.state.value)
        if refusal:
            self.db.audit("migration.start_incoming", "refused", host=requested_by,
                          instance=ctx.instance_uuid, migration_id=migration_id,
                          detail=refusal)
            raise exception.CommandRefused(method="start_incoming", reason=refusal)
        try:
            info = self.agents.start(ctx.dest_host, ctx.instance_uuid)
            if (info.state, info.migration_id, info.generation) != \
                    ("MIGRATING_IN", migration_id, ctx.generation):
                raise exception.MigrationError(
                    migration_id=migration_id,
                    reason="the agent started a vTPCM that is %s of migration %s at "
                           "generation %d, not this incoming one"
                           % (info.state, info.migration_id, info.generation))
        except exception.VTPCMException as err:
            self.db.audit("migration.start_incoming", "refused", host=ctx.dest_host,
                          instance=ctx.instance_uuid, migration_id=migration_id,
                          detail=str(err)[:1000])
            raise
        self.db.audit("migration.start_incoming", "running", host=ctx.dest_host,
                      instance=ctx.instance_uuid, migration_id=migration_id)
        return ctx.dest_host, info

    def abort(self, migration_id: str, reason: str, *, instance_uuid: str | None = None,
              requested_by: str | None = None) -> db_api.MigrationRecord:
        """Undo the migration before its commit point (in doubt too: Nova's
        rollback, signed by one of the two hosts, says the guest stayed).

        An id the engine has no record of, with the instance it was meant
        to move (``instance_uuid``) and signed by the host holding that
        instance's vTPCM: the caller's begin gave up before the engine
        wrote the record, so an ABORTED tombstone is written instead, and
        a begin of that id and instance arriving later is refused
        (``_begin``). A tombstone names the instance whose holder signed
        it: a begin of another instance under that id is refused as a
        reused id (Nova's ids are fresh per migration, so only a caller
        reusing an id, or a holder tombstoning an id not its own, meets
        this), never run or aborted as the tombstoner's; it blocks none of
        that instance's later migrations either.

        If a begin records the id between the lookup and the tombstone, the
        abort goes on only if that record is of the instance given and the
        signer is its source or destination (what the engine checks for an
        abort of a recorded migration); otherwise it is refused, audited."""
        try:
            proto, ctx, rec = self._load(migration_id)
        except exception.NotFound:
            if instance_uuid is None:
                raise
            tomb = self._tombstone(migration_id, instance_uuid, reason, requested_by)
            if tomb is not None:
                return tomb
            proto, ctx, rec = self._load(migration_id)  # a begin wrote it meanwhile
            self._check_raced_abort(rec, instance_uuid, requested_by)
        raced = False
        for _ in range(len(p.PENDING_WORK)):
            try:
                # this abort's own word, whoever moved the migration: a
                # deadline abort's destroy first, then IN_DOUBT -> DISCARDING
                self._settle_deadline_abort(proto, ctx, rec)
                self._advance(proto, ctx, p.AbortRequested(reason))
            except exception.MigrationError:
                if not self._moved_on_to_undo(migration_id, proto.state):
                    raise
                raced = True
                proto, ctx, rec = self._load(migration_id)
                continue
            break
        if raced:
            return self._finish_abort(migration_id)
        return self.db.get_migration(migration_id)

    def _moved_on_to_undo(self, migration_id: str, believed: M) -> bool:
        """Whether another abort or reconcile moved the migration on from
        ``believed`` (the state this call last saw or wrote) along the
        abort's path: a compare-and-set this call lost, not a failed step.
        A commit that won the race is not such progress."""
        state = M(self.db.get_migration(migration_id).state)
        return state is not believed and state in ABORT_PATH

    def _finish_abort(self, migration_id: str) -> db_api.MigrationRecord:
        """Run the steps left of an abort another worker's reconcile (or
        a concurrent abort) took over, as reconcile would, until it ends:
        the abort is decided, so its caller gets the outcome, not "state
        changed concurrently" (found in CI: two engine workers reconciling
        every second raced an abort's destroy of the destination). The
        caller has applied its own AbortRequested to the state it reloaded
        first, so an IN_DOUBT left by a racing deadline abort went on to
        DISCARDING (review of the first fix: the explicit abort's word was
        dropped at IN_DOUBT). A step that fails without such progress still
        fails the call. Bounded: every pass moves the migration one state
        on, or raises."""
        for _ in range(len(p.PENDING_WORK)):
            proto, ctx, rec = self._load(migration_id)
            if proto.state not in UNDOING_ABORT:
                break
            try:
                self._run(proto, ctx, p.pending_actions(proto.state,
                                                        rec.error == p.DEADLINE_REASON))
            except exception.MigrationError:
                if not self._moved_on_to_undo(migration_id, proto.state):
                    raise
        return self.db.get_migration(migration_id)

    def _check_raced_abort(self, rec: db_api.MigrationRecord, instance_uuid: str,
                           requested_by: str | None) -> None:
        """An abort authorized as the holder's of ``instance_uuid`` (no
        record yet) found a begin's record at its tombstone: it may abort
        that migration only as one of its two hosts, of that instance."""
        if rec.instance_uuid == instance_uuid and requested_by in (None, rec.source,
                                                                    rec.dest):
            return
        detail = ("abort for instance %s signed by %s; the migration recorded meanwhile "
                  "is of instance %s, %s -> %s" % (instance_uuid, requested_by,
                                                    rec.instance_uuid, rec.source, rec.dest))
        self.db.audit("migration.abort", "refused", host=requested_by,
                      instance=rec.instance_uuid, migration_id=rec.migration_id,
                      detail=detail[:1000])
        raise exception.CommandRefused(method="abort", reason=detail)

    def _tombstone(self, migration_id: str, instance_uuid: str, reason: str,
                   requested_by: str | None) -> db_api.MigrationRecord | None:
        """The ABORTED record of a migration aborted before its begin was
        recorded, or None if a begin recorded it first (abort that one)."""
        vtpcm = self.db.get_vtpcm(instance_uuid)
        if requested_by not in (None, vtpcm.host):
            raise exception.CommandRefused(
                method="abort", reason="signed by %s, not %s, the holder of the vTPCM of "
                                       "instance %s" % (requested_by, vtpcm.host,
                                                        instance_uuid))
        entry = db_api.AuditEntry("migration.abort", "tombstone", host=vtpcm.host,
                                  instance=instance_uuid, migration_id=migration_id,
                                  detail=("%s: %s" % (TOMBSTONE_REASON, reason))[:1000])
        try:
            made = self.db.create_migration(
                migration_id, instance_uuid, vtpcm.host, vtpcm.host, vtpcm.generation,
                M.ABORTED.value, self.now(), error=TOMBSTONE_REASON, audits=[entry])
        except exception.AlreadyExists:
            return None
        LOG.warning("Migration %(mig)s of instance %(i)s aborted before its begin was "
                    "recorded: tombstoned, a late begin of it will be refused",
                    {"mig": migration_id, "i": instance_uuid})
        return made

    def _settle_deadline_abort(self, proto: p.MigrationProtocol, ctx: am.MigrationContext,
                               rec: db_api.MigrationRecord) -> None:
        """A deadline abort whose destroy went unanswered (destination
        unreachable): retry that step first, since its answer decides
        between ABORTED (the destination never got the state) and IN_DOUBT
        (it did), and the commit or abort at hand must act on that."""
        if proto.state is M.ABORTING and rec.error == p.DEADLINE_REASON:
            self._run(proto, ctx, p.pending_actions(M.ABORTING, after_deadline=True))

    def get_migration(self, migration_id: str) -> db_api.MigrationRecord:
        return self.db.get_migration(migration_id)

    def finish_pending(self, migration_id: str) -> db_api.MigrationRecord:
        """Run the steps left of a commit or abort under way, as reconcile
        would (an operator's resolve does not wait for the next interval)."""
        proto, ctx, rec = self._load(migration_id)
        self._run(proto, ctx, p.pending_actions(proto.state,
                                                rec.error == p.DEADLINE_REASON))
        return self.db.get_migration(migration_id)

    def doubt_deadline_abort(self, migration_id: str, reason: str) -> db_api.MigrationRecord:
        """An operator's resolve of a deadline abort whose destination does
        not answer: the answer that decides ABORTED vs IN_DOUBT is lost, so
        it is IN_DOUBT, where only an explicit commit or abort moves on."""
        proto, ctx, rec = self._load(migration_id)
        if proto.state is not M.ABORTING or rec.error != p.DEADLINE_REASON:
            raise exception.ResolutionRefused(
                action="declare migration %s in doubt" % migration_id,
                reason="it is %s, not a deadline abort" % proto.state.value)
        self._advance(proto, ctx, p.DestinationInUse(reason))
        return self.db.get_migration(migration_id)

    def skip_lost_host_step(self, migration_id: str, host: str,
                            why: str = "is gone for good") -> db_api.MigrationRecord:
        """For a host an operator declared gone for good: the one step left
        on it (shred the source's copy, destroy the destination's) is moot,
        since its state went with it; the migration goes on without it.
        Also for a REVOKED destination that does not destroy its incoming
        copy when an operator resolves to the source (``resolve``)."""
        proto, ctx, _ = self._load(migration_id)
        event: p.Event
        if proto.state is M.SHREDDING and host == ctx.source_host:
            event = p.SourceShredded()
        elif proto.state in (M.ABORTING, M.DISCARDING) and host == ctx.dest_host:
            event = p.DestinationDestroyed()
        else:
            raise exception.ResolutionRefused(
                action="settle migration %s without host %s" % (migration_id, host),
                reason="its next step (%s) is not on that host" % proto.state.value)
        self.db.audit("migration.resolve", "step skipped", host=host,
                      instance=ctx.instance_uuid, migration_id=migration_id,
                      detail="%s: %s %s" % (proto.state.value, host, why))
        self._advance(proto, ctx, event)
        return self.db.get_migration(migration_id)

    def reclaim_source(self, migration_id: str, reason: str) -> db_api.MigrationRecord:
        """An operator's rollback past the commit point (``resolve --to
        source --past-commit``): only while the destination's commit is not
        done and the destination is REVOKED or FORGOTTEN (its agent never
        gets the authority back, whatever it did with its copy). The
        source's copy becomes the authority at generation + 2; the
        destination's generation + 1 is never used again."""
        proto, ctx, _ = self._load(migration_id)
        action = "roll migration %s back to the source's copy" % migration_id
        if proto.state not in (M.COMMITTING, M.RECLAIMING):
            raise exception.ResolutionRefused(
                action=action, reason="it is %s, not COMMITTING with the destination's "
                                      "step left" % proto.state.value)
        try:
            status = self.db.get_host(ctx.dest_host).status
        except exception.NotFound:
            status = None
        if status not in (HostStatus.REVOKED, HostStatus.FORGOTTEN):
            raise exception.ResolutionRefused(
                action=action, reason="destination %s is %s: revoke it first (hosts revoke "
                                      "%s)" % (ctx.dest_host, status and status.value,
                                               ctx.dest_host))
        if proto.state is M.RECLAIMING:  # decided already: finish it
            self._run(proto, ctx, p.pending_actions(M.RECLAIMING))
        else:
            self._advance(proto, ctx, p.ReclaimRequested(reason))
        return self.db.get_migration(migration_id)

    def reconcile(self) -> int:
        """Finish commits/aborts left half-done; abort begins that will never
        return (``begin_abandoned``) at once and migrations past deadline."""
        done = 0
        live: list[frozenset[str]] = []  # read once per pass, when needed

        def live_workers() -> frozenset[str]:
            if not live:
                live.append(self.db.live_workers())
            return live[0]
        for listed in self.db.list_migrations():
            try:
                proto, ctx, rec = self._load(listed.migration_id)
                state = proto.state
                abandoned = (begin_abandoned(rec, self.worker, live_workers,
                                             self._running_here, self.now(),
                                             self.begin_step_bound)
                             if state in BEGIN_STATES else None)
                if state in p.PENDING_WORK:
                    after_deadline = rec.error == p.DEADLINE_REASON
                    if state is M.SHREDDING:
                        # a shred_later commit's answer went out before the
                        # destination's vTPCM id was recorded (review L1)
                        self._record_incoming_id(ctx)
                    self._run(proto, ctx, p.pending_actions(state, after_deadline))
                    done += 1
                elif abandoned is not None and self._still_begin(proto, ctx):
                    LOG.warning("Migration %(mig)s of instance %(i)s: %(why)s; aborting it",
                                {"mig": ctx.migration_id, "i": ctx.instance_uuid,
                                 "why": abandoned})
                    self._advance(proto, ctx, p.Failure(abandoned))
                    done += 1
                elif state in p.ABORTABLE and rec.deadline <= self.now():
                    self._advance(proto, ctx, p.DeadlinePassed())
                    done += 1
            except exception.VTPCMException as err:
                LOG.warning("Reconcile of migration %(mig)s (%(state)s) failed: %(err)s",
                            {"mig": listed.migration_id, "state": listed.state,
                             "err": err})
        done += self.reap_abandoned()
        return done

    def _still_begin(self, proto: p.MigrationProtocol, ctx: am.MigrationContext) -> bool:
        """Read again before aborting an abandoned begin: one of this run
        that ended between the load and the check has moved the state on
        (the abort's compare-and-set would fail, noisily, anyway)."""
        proto.state = M(self.db.get_migration(ctx.migration_id).state)
        return proto.state in BEGIN_STATES

    def _trusted_destination(self, dest: str,
                             verdict: db_api.VerdictRecord
                             ) -> tuple[db_api.HostRecord | None, str]:
        """The destination's record (its KEM key) iff it is APPROVED with a
        fresh TRUSTED verdict, read in one query after ``check_fresh`` (a
        revocation since counts); else None and why."""
        if not _trusted(verdict):
            return None, _reason(verdict)
        host = self.db.trusted_host(dest, self.now())
        if host is None:
            return None, self._distrust(dest)
        return host, ""

    def _destination_gate(self, dest: str) -> tuple[db_api.HostRecord | None, str]:
        """``begin``'s gate: ``_trusted_destination`` of a fresh verdict.

        ``trusted_host`` first, alone: it finds the host exactly when
        ``check_fresh`` would answer from the database without attesting
        (APPROVED, TRUSTED, unexpired), so the verdict read that preceded it
        was the same row read twice. Only a host it does not find is handed
        to ``check_fresh`` (which attests a stale or missing verdict) and
        looked up again, as before."""
        host = self.db.trusted_host(dest, self.now())
        if host is not None:
            return host, ""
        return self._trusted_destination(dest, self.trust.check_fresh(dest))

    def _distrust(self, host: str) -> str:
        """Why ``host`` no longer passes ``trusted_host``."""
        rec = self.db.get_host(host)
        if rec.status is not HostStatus.APPROVED:
            return "host is %s" % rec.status.value
        verdict = self.db.get_verdict(host)
        if verdict is None:
            return "no verdict"
        return verdict.reason if not verdict.trusted else "its verdict expired"

    def _commit_distrust(self, dest: str) -> str | None:
        """Why the authority must not move to ``dest`` now, or None.

        APPROVED, and its last verdict TRUSTED, expired or not: ``begin``
        and the step before the envelope left checked a fresh one; what
        counts since is new evidence against the host (a revocation, a
        reboot to PENDING, a failed attestation), not the age of a verdict,
        which a slow migration outlives with its guest already running
        there. A verdict made UNKNOWN meanwhile (policy changed, host
        re-approved) or distrusted is settled by attesting now."""
        rec, last = self.db.host_and_verdict(dest)  # one query
        if rec is None:
            return "host is not enrolled"
        if rec.status is not HostStatus.APPROVED:
            return "host is %s" % rec.status.value
        if last is not None and last.trusted:
            return None
        host, why = self._trusted_destination(dest, self.trust.check_fresh(dest))
        return None if host is not None else why

    def _recheck_destination(self, ctx: am.MigrationContext, kem_public: bytes | None) -> None:
        """Right before the envelope leaves for the destination: still
        APPROVED, fresh TRUSTED and the same KEM key the source sealed to.
        A revocation while the source sealed stops the key here."""
        host = self.db.trusted_host(ctx.dest_host, self.now())
        if host is None:
            reason = self._distrust(ctx.dest_host)
        elif host.kem_public != kem_public:
            reason = "its KEM key changed (re-enrolled) since the key was sealed"
        else:
            return
        raise exception.HostNotTrusted(host=ctx.dest_host, reason=reason)

    # --- machinery ---------------------------------------------------------------

    def _switchover(self, ctx: am.MigrationContext) -> str:
        """What the agents say about where the guest runs, for the operator's
        log only (signed answers, but QEMU stops its swtpm when it exits, so
        a stopped source swtpm next to a running incoming one suggests a
        switchover, or just a guest powered off on the source)."""
        src = self.agents.get(ctx.source_host, ctx.instance_uuid)
        dst = self.agents.get(ctx.dest_host, ctx.instance_uuid)
        if (src.state, src.migration_id) != ("MIGRATING_OUT", ctx.migration_id):
            why = "the source's vTPCM is %s, not migrating out in this migration" % src.state
        elif src.running:
            why = "the source's vTPCM still runs on %s" % ctx.source_host
        elif (dst.state, dst.migration_id) != ("MIGRATING_IN", ctx.migration_id):
            why = "the destination's vTPCM is %s, not this migration's incoming" % dst.state
        elif not dst.running:
            why = "the destination's vTPCM does not run on %s" % ctx.dest_host
        else:
            why = ("the agents report the source's swtpm stopped and the destination's "
                   "running (signed answers; not proof of a switchover)")
        return why

    def _load(self, migration_id: str) -> tuple[p.MigrationProtocol, am.MigrationContext,
                                                db_api.MigrationRecord]:
        rec = self.db.get_migration(migration_id)
        ctx = am.MigrationContext(migration_id, rec.instance_uuid, rec.generation,
                                  rec.source, rec.dest)
        return p.MigrationProtocol(migration_id, M(rec.state)), ctx, rec

    def _advance(self, proto: p.MigrationProtocol, ctx: am.MigrationContext,
                 event: p.Event, **extra: Any) -> None:
        before = proto.state
        actions = proto.handle(event)
        if proto.state is not before:
            # the new state's audit goes with it, in one transaction; so
            # does the authority's move at the commit point (MoveAuthority
            # then has nothing left to do: one fsynced write less)
            point = None
            if proto.state is M.COMMITTING and any(isinstance(a, p.MoveAuthority)
                                                   for a in actions):
                point = db_api.CommitPoint(ctx.instance_uuid, ctx.source_host,
                                           ctx.dest_host, ctx.generation)
            if not self.db.update_migration_state(ctx.migration_id, before.value,
                                                  proto.state.value,
                                                  error=getattr(event, "reason", None),
                                                  audits=_audits(ctx, actions),
                                                  commit_point=point):
                proto.state = before
                raise exception.MigrationError(
                    migration_id=ctx.migration_id,
                    reason="state changed concurrently (expected %s)" % before.value)
            actions = [a for a in actions if not isinstance(a, p.Audit)
                       and not (point is not None and point.moved
                                and isinstance(a, p.MoveAuthority))]
        self._run(proto, ctx, actions, **extra)

    def _run(self, proto: p.MigrationProtocol, ctx: am.MigrationContext,
             actions: list[p.Action], kem_public: bytes | None = None,
             shred_later: bool = False) -> None:
        """``shred_later``: the source's shred (and the bookkeeping of the
        destination's vTPCM id) is left for after the commit's answer."""
        for action in actions:
            if isinstance(action, p.Audit):
                self.db.audit(action.event, action.outcome, host=ctx.dest_host,
                              instance=ctx.instance_uuid, migration_id=ctx.migration_id,
                              detail=action.detail)
                continue
            if shred_later and isinstance(action, p.ShredSource):
                return  # SHREDDING is recorded: _shred_after_answer runs it
            try:
                event = self._execute(action, ctx, kem_public, shred_later)
            except exception.VTPCMException as err:
                LOG.warning("Migration %(mig)s: %(action)s failed: %(err)s",
                            {"mig": ctx.migration_id, "action": action.name, "err": err})
                if proto.state in p.ABORTABLE:
                    self._advance(proto, ctx, p.Failure("%s: %s" % (action.name, err)))
                    return
                raise
            if event is not None:
                # the destination's KEM key goes along to the recheck before
                # PrepareDestination
                self._advance(proto, ctx, event, kem_public=kem_public,
                              shred_later=shred_later)
                return

    def _execute(self, action: p.Action, ctx: am.MigrationContext,
                 kem_public: bytes | None, shred_later: bool = False) -> p.Event | None:
        src, dst = ctx.source_host, ctx.dest_host
        if isinstance(action, p.SealKey):
            if kem_public is None:
                raise exception.MigrationError(migration_id=ctx.migration_id,
                                               reason="no certified KEM key for dest")
            sealed = self.agents.seal_migration_key(src, ctx, kem_public)
            return p.KeySealed(envelope=sealed.envelope)
        if isinstance(action, p.PrepareDestination):
            self._recheck_destination(ctx, kem_public)
            self.agents.prepare_incoming(dst, ctx, action.envelope)
            return p.DestinationPrepared()
        if isinstance(action, p.TransferState):
            self._transfer_state(ctx)
            return p.StateTransferred()
        if isinstance(action, p.MoveAuthority):
            moved = self.db.update_vtpcm_location(
                ctx.instance_uuid, src, ctx.generation, dst, ctx.generation + 1,
                state="ACTIVE", migration_id=None)
            if not moved:
                rec = self.db.get_vtpcm(ctx.instance_uuid)
                if (rec.host, rec.generation) != (dst, ctx.generation + 1):
                    raise exception.GenerationMismatch(
                        instance_uuid=ctx.instance_uuid, given=ctx.generation,
                        expected=rec.generation)
            return None
        if isinstance(action, p.CommitDestination):
            self.agents.commit_incoming(dst, ctx)
            if not shred_later:  # else after the answer, with the shred
                self._record_incoming_id(ctx)
            return p.DestinationCommitted()
        if isinstance(action, p.ShredSource):
            self.agents.commit_outgoing(src, ctx)
            return p.SourceShredded()
        if isinstance(action, p.DestroyDestination):
            try:
                self.agents.abort_incoming(dst, ctx, only_if_unused=action.only_if_unused)
            except exception.DestinationInUse as err:
                if not action.only_if_unused:
                    raise
                return p.DestinationInUse(reason=str(err)[:1000])
            return p.DestinationDestroyed()
        if isinstance(action, p.CheckSwitchover):
            try:
                why = self._switchover(ctx)
            except exception.VTPCMException as err:  # only a hint
                why = "an agent did not tell (%s)" % err
            LOG.warning("Migration %(mig)s of instance %(i)s is in doubt: its deadline "
                        "passed after the destination received the state; %(why)s. The "
                        "source's commit or an abort settles it",
                        {"mig": ctx.migration_id, "i": ctx.instance_uuid, "why": why})
            return None
        if isinstance(action, p.RestoreSource):
            self.agents.abort_outgoing(src, ctx)
            # Only this migration's claim is released, never another's; a
            # shelved vTPCM (an unshelve's) stays shelved, any other is live
            # (ACTIVE) again.
            prior = self.db.get_migration(ctx.migration_id).prior_state
            restored = SHELVED if prior == SHELVED else "ACTIVE"
            self.db.set_vtpcm_state(ctx.instance_uuid, ctx.generation, restored,
                                    expected_state="MIGRATING", migration_id=None,
                                    expected_migration_id=ctx.migration_id)
            return p.SourceRestored()
        if isinstance(action, p.ReclaimSource):
            self._reclaim_source(ctx)
            return p.SourceReclaimed()
        raise exception.MigrationError(migration_id=ctx.migration_id,
                                       reason="unknown action %s" % action.name)

    def _reclaim_source(self, ctx: am.MigrationContext) -> None:
        """The source's agent first (idempotent), then the engine's record,
        from wherever the commit point left it (moved to the destination or
        not yet): a failure between the two is retried by reconcile."""
        new = ctx.generation + p.RECLAIM_GENERATION_STEP
        self.agents.reclaim_outgoing(ctx.source_host, ctx, new)
        for host, generation in ((ctx.dest_host, ctx.generation + 1),
                                 (ctx.source_host, ctx.generation)):
            if self.db.update_vtpcm_location(ctx.instance_uuid, host, generation,
                                             ctx.source_host, new, state="ACTIVE",
                                             migration_id=None):
                return
        rec = self.db.get_vtpcm(ctx.instance_uuid)
        if (rec.host, rec.generation) != (ctx.source_host, new):
            raise exception.GenerationMismatch(instance_uuid=ctx.instance_uuid,
                                               given=ctx.generation, expected=rec.generation)

    def _transfer_state(self, ctx: am.MigrationContext) -> None:
        """Export at the source, import at the destination. The source's
        blobs must be of this migration and generation (its agent marked
        them MIGRATING_OUT for it); the destination imports only into the
        incoming vTPCM prepared for it, once (``InstanceManager.import_state``)."""
        blobs = self.agents.export_state(ctx.source_host, ctx.instance_uuid)
        if (blobs.migration_id, blobs.generation) != (ctx.migration_id, ctx.generation):
            raise exception.MigrationError(
                migration_id=ctx.migration_id,
                reason="the source exported the state of migration %s, generation %d, "
                       "not of this migration at generation %d"
                       % (blobs.migration_id, blobs.generation, ctx.generation))
        self.agents.import_state(ctx.dest_host, blobs)
        LOG.info("Migration %(mig)s: moved the encrypted state of instance %(i)s from "
                 "%(src)s to %(dst)s", {"mig": ctx.migration_id, "i": ctx.instance_uuid,
                                        "src": ctx.source_host, "dst": ctx.dest_host})

    def _refuse_audit(self, migration_id: str, instance_uuid: str, host: str,
                      detail: str) -> None:
        self.db.audit("migration.begin", "refused", host=host, instance=instance_uuid,
                      migration_id=migration_id, detail=detail)


def _audits(ctx: am.MigrationContext, actions: list[p.Action]) -> list[db_api.AuditEntry]:
    """The protocol's audit actions as entries, as ``_run`` writes them."""
    return [db_api.AuditEntry(a.event, a.outcome, host=ctx.dest_host,
                              instance=ctx.instance_uuid, migration_id=ctx.migration_id,
                              detail=a.detail)
            for a in actions if isinstance(a, p.Audit)]


def _trusted(verdict: db_api.VerdictRecord) -> bool:
    return verdict.trusted


def _reason(verdict: db_api.VerdictRecord) -> str:
    return verdict.reason or "no verdict"
