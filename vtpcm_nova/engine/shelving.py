"""Shelve offload, unshelve, and the reapers of vTPCMs nobody will ask for
again (deleted shelved instances, copies abandoned by an evacuation).

A mixin of ``coordinator.Coordinator``: the public methods stay on the
coordinator (callers and the manager are unchanged), the code lives here so
the coordinator keeps to migrations. It uses the coordinator's database,
agents, and its ``begin``/``transfer``/``commit`` for a move at unshelve."""

import dataclasses
import datetime
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, Protocol

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_nova.engine import shelved
from vtpcm_nova.engine.db import api as db_api
from vtpcm_nova.engine.db import witnesses
from vtpcm_nova.engine.states import DESTROYING, SHELVED

if TYPE_CHECKING:
    from vtpcm_nova.engine.coordinator import AgentClient

LOG = logging.getLogger(__name__)


# the owner of a vTPCM whose create could not learn it from Nova (Nova
# configured but silent, or showing no project): admin projects' witnesses only
UNKNOWN_OWNER = ""

class NovaLookup(Protocol):
    def get_server(self, instance_uuid: str) -> shelved.ServerView | None: ...
    def deletion(self, instance_uuid: str) -> shelved.Deletion: ...
    def is_admin(self) -> bool: ...


# Records the reaper may destroy once Nova's admin listing shows the
# instance deleted: only SHELVED ones, with no guest that could be running.
# A compromised compute host can make Nova show ANY instance deleted
# (Instance.destroy through nova-conductor has no per-host check), so
# Nova's word never shreds a live vTPCM: ACTIVE and STOPPED records of an
# instance Nova shows deleted are reported as orphans (WARNING and a
# ``vtpcm.orphan`` audit entry) for an operator to destroy, whatever
# nova-api witnessed: a DELETE it accepted may have been undone since
# (soft delete and restore) or never reached the guest (a failed
# terminate), so a delete witness is no proof the guest is gone.
REAPABLE = frozenset({SHELVED})
ORPHAN_WATCHED = frozenset({"ACTIVE", "STOPPED"})
ORPHAN = "vtpcm.orphan"
NOT_ADMIN = ("the [nova] credential does not get Nova's admin view (all_tenants listing "
             "refused, or no OS-EXT-SRV-ATTR:host): the engine reaps no vTPCM until it "
             "has the admin role")
REAPED = "vtpcm.reap"

NOVA_NOT_CONFIGURED = ("the engine cannot ask Nova whether it is unshelving the instance "
                       "there ([nova] auth_type is not set)")

WITNESS = "vtpcm.witness"
WITNESS_NOT_CONFIGURED = (
    "no nova-api witness keys are configured ([nova] api_witness_public_keys is empty "
    "while [nova] require_api_witness is set): install the vtpcm_witness filter in "
    "nova-api's paste pipeline and list its public keys, or set "
    "[nova] require_api_witness = false")


@dataclasses.dataclass(frozen=True)
class WitnessPolicy:
    """Whether moves at unshelve and the reaper's shreds need nova-api's
    witness (``[nova] require_api_witness``), whether any witness key is
    configured, and how long an unshelve witness stays usable."""
    required: bool = False
    keys_configured: bool = False
    max_age: float = 600.0
    # projects whose users may unshelve other projects' servers (``[nova]
    # witness_admin_projects``); the instance's own project always may
    admin_projects: frozenset[str] = frozenset()


# Nova's view alone, as before engine API 1.12 (what tests build by default)
NO_WITNESS = WitnessPolicy()


class ShelvingMixin:
    """Shelve, unshelve and the reapers, on the coordinator's state."""

    db: db_api.Database
    agents: "AgentClient"
    now: Callable[[], datetime.datetime]

    def _init_shelving(self, nova: NovaLookup | None, deleted_confirmations: int,
                       confirm_interval: float, reap_max_checks: int,
                       reap_budget: float,
                       witness: WitnessPolicy = NO_WITNESS) -> None:
        # Nova's word on shelved instances: None refuses every unshelve
        # elsewhere and reaps nothing (fail closed)
        self.nova = nova
        self.deletions = shelved.DeletionConfirmations(
            deleted_confirmations,
            datetime.timedelta(seconds=(deleted_confirmations - 1) * confirm_interval))
        self._reaping = threading.Lock()  # one reaper pass at a time
        # the work of one pass: Nova requests, and seconds before it stops
        self.reap_max_checks = reap_max_checks
        self.reap_budget = datetime.timedelta(seconds=reap_budget)
        self._reap_after = ""  # the pass resumes after the last instance asked
        self._reported_orphans: set[shelved.Observed] = set()
        self._warned_not_admin = False
        self._warned_no_owner = False
        self.witness = witness

    if TYPE_CHECKING:
        def destroy_vtpcm(self, instance_uuid: str,
                          requested_by: str | None = None) -> None: ...

        def begin(self, migration_id: str, instance_uuid: str, source: str,
                  dest: str, *, unshelve: bool = False) -> db_api.MigrationRecord: ...

        def transfer(self, migration_id: str,
                     requested_by: str | None = None) -> db_api.MigrationRecord: ...

        def commit(self, migration_id: str, requested_by: str | None = None, *,
                   shred_later: bool = False) -> db_api.MigrationRecord: ...

        def _past_commit_point(self, migration_id: str) -> bool: ...

        def _powered_record(self, method: str, instance_uuid: str,
                            requested_by: str | None) -> db_api.VtpcmRecord: ...

    def destroy_shelved_vtpcm(self, instance_uuid: str) -> None:
        """Operator-signed clean-up of a SHELVED vTPCM (its instance was
        deleted while shelved offloaded) or of an ACTIVE/STOPPED one the
        reaper reported orphaned (``vtpcm.orphan``: Nova showed the instance
        deleted); any other record is refused, so a vTPCM nobody flagged is
        never destroyed this way."""
        rec = self.db.get_vtpcm(instance_uuid)
        orphan = (rec.state in ORPHAN_WATCHED
                  and self.db.has_audit(instance_uuid, ORPHAN, "reported"))
        if (rec.state != SHELVED and not orphan) or rec.migration_id is not None:
            reason = ("the vTPCM is %s on %s, not shelved nor reported orphaned"
                      % (rec.state, rec.host))
            self.db.audit("vtpcm.destroy", "refused", host=rec.host,
                          instance=instance_uuid, detail="operator: " + reason)
            raise exception.CommandRefused(method="destroy_shelved_vtpcm", reason=reason)
        self.destroy_vtpcm(instance_uuid)

    def reap_abandoned(self) -> int:
        """Destroy the vTPCMs evacuations abandoned, on their old hosts
        (engine-signed), once those agents answer: a partitioned, not dead,
        host would otherwise keep a second live copy. Only the abandoned
        instance's vTPCM is destroyed, and not while the engine's record
        places the instance on that host again. Returns how many were
        settled; the others are retried on the next pass."""
        done = 0
        for old in self.db.list_abandoned():
            try:
                current: str | None = self.db.get_vtpcm(old.instance_uuid).host
            except exception.NotFound:
                current = None
            try:
                if current == old.host:
                    # the instance's vTPCM lives there again: that one stays
                    LOG.warning("Abandoned vTPCM %(v)s of instance %(i)s: %(h)s holds the "
                                "instance's vTPCM again; not destroying it",
                                {"v": old.vtpcm_id, "i": old.instance_uuid, "h": old.host})
                else:
                    self.agents.destroy(old.host, old.instance_uuid)
            except exception.NotFound:
                pass  # the agent has nothing (left) for this instance
            except exception.VTPCMException as err:
                LOG.info("Abandoned vTPCM %(v)s of instance %(i)s on %(h)s not destroyed "
                         "yet: %(err)s", {"v": old.vtpcm_id, "i": old.instance_uuid,
                                           "h": old.host, "err": err})
                continue
            self.db.forget_abandoned(old)
            self.db.audit("vtpcm.destroy", "destroyed", host=old.host,
                          instance=old.instance_uuid,
                          detail="vTPCM %s (generation %d) abandoned by an evacuation"
                                 % (old.vtpcm_id, old.generation))
            done += 1
        return done

    def shelve_vtpcm(self, instance_uuid: str,
                     requested_by: str | None = None) -> db_api.VtpcmRecord:
        """Shelve offload: the holder's consent, given while it still holds
        the vTPCM, that a later unshelve may move it to another TRUSTED
        host without the holder's nova-compute. The swtpm stops (the guest
        is off); the state stays on the holder's disk, encrypted under keys
        only its TPM unwraps. Idempotent."""
        try:
            rec = self._powered_record("shelve_vtpcm", instance_uuid, requested_by)
            if rec.state == SHELVED:
                return rec
            self.agents.stop(rec.host, instance_uuid)
            if not self.db.set_vtpcm_state(instance_uuid, rec.generation, SHELVED,
                                           expected_state=rec.state,
                                           expected_migration_id=None, now=self.now()):
                raise exception.VTPCMBusy(instance_uuid=instance_uuid,
                                          reason="its record changed meanwhile; retry")
        except exception.VTPCMException as err:
            self.db.audit("vtpcm.shelve", "refused", host=requested_by,
                          instance=instance_uuid, detail=str(err)[:1000])
            raise
        self.db.audit("vtpcm.shelve", "shelved", host=rec.host, instance=instance_uuid,
                      detail="generation %d kept on %s" % (rec.generation, rec.host))
        self._clear_witnesses(instance_uuid, ("unshelve", "delete"), "shelve")
        return self.db.get_vtpcm(instance_uuid)

    def _clear_witnesses(self, instance_uuid: str, actions: tuple[str, ...],
                         why: str) -> None:
        """Use up the instance's unused witnesses of ``actions``: a request
        from before this point in the instance's life (an unshelve that
        landed on the holder, anything before a new shelve) never allows a
        later move or shred. The record's time in SHELVED guards the same
        (``_since_shelved``); this keeps the table telling the truth."""
        now = self.now()
        for action in actions:
            if self.db.clear_witnesses(instance_uuid, action, why, now):
                self.db.audit(WITNESS, "cleared", instance=instance_uuid,
                              detail="unused %s witnesses used up by the %s"
                                     % (action, why))

    def unshelve_vtpcm(self, instance_uuid: str, host: str,
                       requested_by: str | None = None) -> db_api.VtpcmRecord:
        """Unshelve onto ``host`` (signed by it): on the holder the vTPCM is
        simply live again; elsewhere it moves as in a cold migration (fresh
        TRUSTED verdict for ``host``, key sealed to its TPM, encrypted blobs,
        generation + 1, the holder's copy shredded), driven by the engine
        under an id of its own. Only a SHELVED vTPCM moves, so it is
        restored once: a second unshelve elsewhere is refused. A refused or
        failed move leaves it SHELVED on the holder.

        A move needs Nova's word, not only the host's signature: Nova's API
        must show the instance shelved_offloaded, unshelving, onto ``host``
        (``shelved.unshelve_refusal``); otherwise, or if Nova cannot be
        asked, ``UnshelveNotAuthorized`` and nothing moves."""
        rec = self.db.get_vtpcm(instance_uuid)
        refusal = ""
        if requested_by not in (None, host):
            refusal = "signed by %s, not by %s" % (requested_by, host)
        elif rec.host == host:
            if rec.state == SHELVED and not self.db.set_vtpcm_state(
                    instance_uuid, rec.generation, "ACTIVE", expected_state=SHELVED,
                    expected_migration_id=None):
                self.db.audit("vtpcm.unshelve", "refused", host=host,
                              instance=instance_uuid, detail="its record changed meanwhile")
                raise exception.VTPCMBusy(instance_uuid=instance_uuid,
                                          reason="its record changed meanwhile; retry")
            self.db.audit("vtpcm.unshelve", "unshelved", host=host, instance=instance_uuid,
                          detail="on its holder, generation %d" % rec.generation)
            self._clear_witnesses(instance_uuid, ("unshelve",), "unshelve on the holder")
            return self.db.get_vtpcm(instance_uuid)
        elif rec.state != SHELVED or rec.migration_id is not None:
            refusal = ("the vTPCM is %s on %s, not shelved: only a shelved vTPCM moves at "
                       "unshelve, once" % (rec.state, rec.host))
        if refusal:
            self.db.audit("vtpcm.unshelve", "refused", host=host, instance=instance_uuid,
                          detail=refusal[:1000])
            raise exception.CommandRefused(method="unshelve_vtpcm", reason=refusal)
        refusal, view = self._nova_unshelving(instance_uuid, host)
        if refusal:
            self._refuse_unshelve(instance_uuid, host, "not authorized by Nova", refusal)
        migration_id = str(uuid.uuid4())
        refusal = self._witnessed_unshelve(rec, host, migration_id, view)
        if refusal:
            self._refuse_unshelve(instance_uuid, host, "not witnessed by nova-api", refusal)
        try:
            self.begin(migration_id, instance_uuid, rec.host, host, unshelve=True)
            self.transfer(migration_id)
            self.commit(migration_id)
        except exception.VTPCMException as err:
            if not self._past_commit_point(migration_id):
                # begin and transfer abort themselves (reconcile finishes an
                # abort left half-done); the abort restores SHELVED
                self.db.audit("vtpcm.unshelve", "refused", host=host,
                              instance=instance_uuid, migration_id=migration_id,
                              detail=str(err)[:1000])
                raise
            # the commit point is passed: the vTPCM lives on ``host`` now and
            # reconcile finishes the commit (the shred of the holder's copy)
            LOG.warning("Unshelve of instance %(i)s: migration %(mig)s passed its commit "
                        "point; a later step failed (%(err)s), reconcile finishes it",
                        {"i": instance_uuid, "mig": migration_id, "err": err})
        self.db.audit("vtpcm.unshelve", "moved", host=host, instance=instance_uuid,
                      migration_id=migration_id,
                      detail="from %s, generation %d" % (rec.host, rec.generation + 1))
        return self.db.get_vtpcm(instance_uuid)

    def _nova_unshelving(self, instance_uuid: str, host: str
                         ) -> tuple[str, shelved.ServerView | None]:
        """Why Nova does not show the instance being unshelved onto
        ``host`` ("" if it does), and Nova's view; no answer from Nova is a
        refusal."""
        if self.nova is None:
            return NOVA_NOT_CONFIGURED, None
        try:
            view = self.nova.get_server(instance_uuid)
        except exception.ServiceUnreachable as err:
            return "Nova could not be asked (%s)" % err, None
        return shelved.unshelve_refusal(view, host), view

    def _refuse_unshelve(self, instance_uuid: str, host: str, why: str,
                         refusal: str) -> NoReturn:
        """Audit, log and raise an unshelve refused by Nova's view or for
        want of nova-api's witness; nothing was sealed or moved."""
        self.db.audit("vtpcm.unshelve", "refused", host=host, instance=instance_uuid,
                      detail=("%s: %s" % (why, refusal))[:1000])
        LOG.warning("Unshelve of the vTPCM of instance %(i)s onto %(h)s refused: "
                    "%(why)s", {"i": instance_uuid, "h": host, "why": refusal})
        raise exception.UnshelveNotAuthorized(instance_uuid=instance_uuid, host=host,
                                              reason=refusal)

    def _owner_project(self, instance_uuid: str) -> str | None:
        """The project Nova shows owning the instance, asked when its vTPCM
        is created, so an unshelve witness is later compared with what the
        engine recorded, not with Nova's current record, which any compute
        host can rewrite through nova-conductor. None if Nova is not
        configured (an unshelve elsewhere is then refused anyway). ``""``
        (UNKNOWN_OWNER, logged) if Nova does not know the server, shows no
        project or gives no answer: the create goes on, and an unshelve
        witness of that vTPCM counts only from a ``[nova]
        witness_admin_projects`` project (fail closed: a compute host that
        blanks the project or cuts Nova off at create would otherwise get
        Nova's current view, which it can rewrite; owner review, F1)."""
        if self.nova is None:
            if not self._warned_no_owner:
                self._warned_no_owner = True
                LOG.warning("[nova] is not configured: new vTPCMs are created without "
                            "their owner project, and an unshelve witness is compared "
                            "with the project Nova shows at unshelve")
            return None
        try:
            view = self.nova.get_server(instance_uuid)
        except exception.ServiceUnreachable as err:
            LOG.warning("Nova gave no answer for instance %(i)s (%(err)s): its vTPCM is "
                        "created without its owner project; only an admin project's "
                        "witness can unshelve it onto another host",
                        {"i": instance_uuid, "err": err})
            return UNKNOWN_OWNER
        if view is None or not view.project_id:
            LOG.warning("Nova shows no project for instance %(i)s: its vTPCM is created "
                        "without its owner project; only an admin project's witness can "
                        "unshelve it onto another host", {"i": instance_uuid})
            return UNKNOWN_OWNER
        return view.project_id

    def _witnessed_unshelve(self, rec: db_api.VtpcmRecord, host: str, migration_id: str,
                            view: shelved.ServerView | None) -> str:
        """Use nova-api's witness of an unshelve of this instance (fresh,
        unused, requested since the vTPCM was shelved, naming ``host`` or no
        host, asked by the owner project recorded at create, or by a listed
        admin project) for this move; why not, or "". A record without an
        owner (created before 0009, or without Nova) takes the project Nova
        shows now; one whose owner Nova could not give at create
        (UNKNOWN_OWNER) only an admin project's witness. Nova showing
        another project than the recorded owner is a refusal: a compute
        host can rewrite the instance's ``project_id``.
        Used before ``begin``: a move refused later leaves the vTPCM SHELVED
        and the next unshelve request brings a witness of its own."""
        shown = view.project_id if view is not None else None
        if rec.owner_project and shown != rec.owner_project:
            return ("Nova shows the server in project %s, it was created in %s"
                    % (shown, rec.owner_project))
        if not self.witness.required:
            return ""
        if not self.witness.keys_configured:
            return WITNESS_NOT_CONFIGURED
        now = self.now()
        # None: a record from before 0009 (Nova's current view); "": Nova could
        # not say at create (admin projects only)
        owner = shown if rec.owner_project is None else (rec.owner_project or None)
        projects = self.witness.admin_projects | ({owner} if owner else set())
        used = self.db.use_witness(
            rec.instance_uuid, "unshelve", host,
            _since_shelved(rec, now - datetime.timedelta(seconds=self.witness.max_age)),
            "unshelve " + migration_id, now, projects=frozenset(projects))
        if used is None:
            return ("nova-api witnessed no unshelve request of this instance (onto %s or "
                    "no named host) in the last %d s, since it was shelved, by %s or "
                    "a [nova] witness_admin_projects one, that is not used already"
                    % (host, self.witness.max_age,
                       "its project %s" % owner if owner else
                       "its project (unknown: Nova did not give it when the vTPCM was "
                       "created, so only an admin project's unshelve can move it)"))
        self.db.audit(WITNESS, "used", host=host, instance=rec.instance_uuid,
                      migration_id=migration_id,
                      detail="unshelve requested at %s by user %s of project %s "
                             "(nova-api key %s)"
                             % (used.requested_at.isoformat(), used.user_id,
                                used.project_id, used.key))
        return ""

    def _witnessed_delete(self, rec: db_api.VtpcmRecord) -> witnesses.WitnessRecord | None:
        """Use nova-api's witness of a delete of this instance (unused,
        not yet purged, requested since ``rec`` was shelved) for the
        reaper's shred of ``rec``."""
        now = self.now()
        return self.db.use_witness(rec.instance_uuid, "delete", None,
                                   _since_shelved(rec, now - witnesses.PURGE_AFTER),
                                   "reap %s" % rec.vtpcm_id, now)

    def reap_deleted_shelved(self) -> int:
        """Destroy, on its holder, each vTPCM whose instance Nova deleted
        without its driver: Nova deletes a shelved offloaded instance in the
        API (``_local_delete``), and a driver's destroy can fail or come
        after an unshelve Nova gave up, so no destroy ever comes.

        Only on positive evidence: Nova's admin listing of deleted servers
        shows the instance deleted in ``deleted_confirmations`` consecutive
        passes spanning at least (that - 1) reconcile intervals, for the same
        vTPCM and generation. A 404 is never evidence; any other answer, a
        timeout or an error starts the count over. A credential without
        Nova's admin view reaps nothing. One pass at a time per worker, in
        its own periodic task (never inside ``reconcile``, which it would
        hold up): at most ``reap_max_checks`` Nova requests and
        ``reap_budget`` seconds, stopped at the first timeout; the next pass
        resumes after the last instance asked. Only SHELVED records are
        destroyed (with ``[nova] require_api_witness``, only on nova-api's
        witness of a delete requested since the record entered SHELVED);
        ACTIVE and STOPPED ones are always reported (``_report_orphan``).
        Returns how many were destroyed."""
        if self.nova is None:
            return 0
        if not self._reaping.acquire(blocking=False):
            LOG.debug("A reaper pass is running already: this one is skipped")
            return 0
        try:
            return self._reap_pass(self.nova)
        finally:
            self._reaping.release()

    def _reap_pass(self, nova: NovaLookup) -> int:
        records = sorted((r for r in self.db.list_vtpcms()
                          if r.state in REAPABLE | ORPHAN_WATCHED
                          and r.migration_id is None),
                         key=lambda r: r.instance_uuid)
        self.deletions.forget_others({r.instance_uuid for r in records})
        self._reported_orphans &= {shelved.Observed(r.vtpcm_id, r.generation)
                                   for r in records}
        if not records or not self._nova_admin(nova):
            return 0
        started = self.now()
        done = 0
        for rec in _resume_after(records, self._reap_after)[:self.reap_max_checks]:
            if self.now() - started > self.reap_budget:
                LOG.info("Reaper pass out of time: the next pass resumes after "
                         "instance %(i)s", {"i": self._reap_after})
                break
            self._reap_after = rec.instance_uuid
            try:
                deletion = nova.deletion(rec.instance_uuid)
            except exception.ServiceUnreachable as err:
                # a timeout is likely the next one's too: stop, resume later
                LOG.info("vTPCM of instance %(i)s: Nova gave no answer (%(err)s); "
                         "not counted as deleted, reaper pass stopped",
                         {"i": rec.instance_uuid, "err": err})
                self.deletions.forget(rec.instance_uuid)
                break
            if deletion is shelved.Deletion.NOT_ADMIN:
                self.deletions.forget_others(set())
                self._warn_not_admin()
                return done
            answer = shelved.presence(deletion)
            seen = shelved.Observed(rec.vtpcm_id, rec.generation)
            if not self.deletions.observe(rec.instance_uuid, seen, answer, self.now()):
                if answer is shelved.Presence.GONE:
                    LOG.info("Nova shows instance %(i)s deleted (%(n)d of %(need)d "
                             "answers); its %(s)s vTPCM on %(h)s is kept for now",
                             {"i": rec.instance_uuid, "h": rec.host, "s": rec.state,
                              "n": self.deletions.count(rec.instance_uuid),
                              "need": self.deletions.needed})
                continue
            if rec.state not in REAPABLE:
                self._report_orphan(rec, seen)
                continue
            used = self._witnessed_delete(rec) if self.witness.keys_configured else None
            if used is None and self.witness.required:
                self._report_orphan(rec, seen)
                continue
            try:
                self._destroy_deleted_shelved(rec, used)
            except exception.VTPCMException as err:
                if used is not None:  # for the next pass
                    self.db.release_witness(used.id)
                LOG.warning("vTPCM of deleted instance %(i)s on %(h)s not destroyed "
                            "yet: %(err)s", {"i": rec.instance_uuid, "h": rec.host,
                                             "err": err})
                continue
            self.deletions.forget(rec.instance_uuid)
            done += 1
        if self._warned_not_admin:
            LOG.warning("The [nova] credential gets Nova's admin view again: reaping resumed")
            self._warned_not_admin = False
        return done

    def _report_orphan(self, rec: db_api.VtpcmRecord, seen: shelved.Observed) -> None:
        """A vTPCM of an instance Nova shows deleted without nova-api's
        witness of a delete (always for ACTIVE or STOPPED ones, for SHELVED
        ones too when witnesses are required): never destroyed by the engine
        (a compromised compute host can forge the deletion through
        nova-conductor); WARNING and audit once per record, for
        ``vtpcm-manage vtpcm destroy``."""
        if seen in self._reported_orphans:
            return
        self._reported_orphans.add(seen)
        detail = ("Nova's admin listing shows the instance deleted (%d consecutive "
                  "answers), nova-api witnessed no delete; %s vTPCM %s generation %d "
                  "kept: an operator decides (vtpcm-manage vtpcm destroy)"
                  % (self.deletions.needed, rec.state, rec.vtpcm_id, rec.generation))
        self.db.audit(ORPHAN, "reported", host=rec.host, instance=rec.instance_uuid,
                      detail=detail)
        LOG.warning("Orphaned vTPCM? Nova shows instance %(i)s deleted, but its vTPCM "
                    "on %(h)s is %(s)s: not destroyed automatically; check the "
                    "instance and run 'vtpcm-manage vtpcm destroy %(i)s' if it is gone",
                    {"i": rec.instance_uuid, "h": rec.host, "s": rec.state})

    def _nova_admin(self, nova: NovaLookup) -> bool:
        """Whether the [nova] credential gets Nova's admin view (WARNING
        once if not: reaping waits for a credential that can tell)."""
        try:
            admin = nova.is_admin()
        except exception.ServiceUnreachable as err:
            LOG.info("Nova gave no answer to the admin check (%(err)s): no vTPCM "
                     "reaped in this pass", {"err": err})
            self.deletions.forget_others(set())
            return False
        if not admin:
            self.deletions.forget_others(set())
            self._warn_not_admin()
            return False
        return True

    def _warn_not_admin(self) -> None:
        if not self._warned_not_admin:
            LOG.warning("Reaping of vTPCMs of deleted instances disabled: %s", NOT_ADMIN)
            self._warned_not_admin = True

    def _destroy_deleted_shelved(self, seen: db_api.VtpcmRecord,
                                 witness: witnesses.WitnessRecord | None = None) -> None:
        """Destroy the vTPCM of an instance Nova showed deleted, only if the
        record is still the one Nova was asked about (same vTPCM, generation,
        state, no migration)."""
        rec = self.db.get_vtpcm(seen.instance_uuid)
        if rec.vtpcm_id != seen.vtpcm_id or not self.db.set_vtpcm_state(
                rec.instance_uuid, seen.generation, DESTROYING, expected_state=seen.state,
                expected_migration_id=None):
            raise exception.VTPCMBusy(instance_uuid=seen.instance_uuid,
                                      reason="its record changed meanwhile")
        try:
            self.agents.destroy(rec.host, rec.instance_uuid)
        except exception.NotFound:
            pass  # an earlier pass destroyed it and lost the answer
        except BaseException:
            # back as it was for the next pass (which asks Nova again), with
            # the time it entered that state (``_since_shelved``)
            self.db.set_vtpcm_state(rec.instance_uuid, seen.generation, seen.state,
                                    expected_state=DESTROYING, expected_migration_id=None,
                                    now=seen.updated_at)
            raise
        self.db.delete_vtpcm(rec.instance_uuid, seen.generation, expected_state=DESTROYING)
        self.db.audit("vtpcm.destroy", "destroyed", host=rec.host, instance=rec.instance_uuid)
        witnessed = ("" if witness is None else
                     ", nova-api witnessed its delete at %s (key %s)"
                     % (witness.requested_at.isoformat(), witness.key))
        self.db.audit(REAPED, "destroyed", host=rec.host, instance=rec.instance_uuid,
                      detail="Nova's admin listing shows the instance deleted (%d "
                             "consecutive answers)%s; %s vTPCM %s generation %d shredded"
                             % (self.deletions.needed, witnessed, seen.state,
                                rec.vtpcm_id, rec.generation))
        LOG.warning("Destroyed the %(s)s vTPCM of instance %(i)s on %(h)s: Nova's admin "
                    "listing shows the instance deleted",
                    {"s": seen.state, "i": rec.instance_uuid, "h": rec.host})


def _since_shelved(rec: db_api.VtpcmRecord,
                   not_before: datetime.datetime) -> datetime.datetime:
    """The later of ``not_before`` and when ``rec`` entered SHELVED (its
    last update: a SHELVED record changes only by leaving SHELVED): a
    request from before the shelve is of an earlier life of the instance."""
    return max(not_before, rec.updated_at)


def _resume_after(records: list[db_api.VtpcmRecord],
                  after: str) -> list[db_api.VtpcmRecord]:
    """``records`` (sorted by instance) from the first after ``after``, then
    the rest: a pass cut short resumes where the last one stopped, so every
    record is asked in turn however many there are."""
    later = [r for r in records if r.instance_uuid > after]
    return later + [r for r in records if r.instance_uuid <= after]
