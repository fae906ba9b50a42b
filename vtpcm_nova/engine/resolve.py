"""Operator decisions the protocol cannot take alone: settle a migration,
forget a host gone for good.

Why a human: a migration IN_DOUBT (or stuck because a host died) may have
the guest on either side, and agents' answers are not authenticated, so the
engine never guesses. The operator, who can look at the hypervisors, says
where the guest runs; this module turns that into the protocol's own
commit or abort and refuses any choice that would lose the only good copy
of the tenant's TPM. Each decision is first explained in plain words
(``plan_*`` are pure functions of what the engine and the agents hold);
it runs only when asked to (``execute``), and both are audited.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Protocol

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_common.api.agent import messages as am
from vtpcm_nova.engine.db import api as db_api
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.protocol import DEADLINE_REASON, RECLAIM_GENERATION_STEP
from vtpcm_nova.engine.protocol import MigrationState as M

LOG = logging.getLogger(__name__)

FINISHED = frozenset({M.COMMITTED, M.ABORTED, M.REFUSED})
PAST_COMMIT_POINT = frozenset({M.COMMITTING, M.SHREDDING})
UNDOING = frozenset({M.ABORTING, M.DISCARDING, M.RESTORING, M.RECLAIMING})
NO_STATE_YET = frozenset({M.SEALING, M.PREPARING, M.TRANSFERRING})
# How the audit entry of a commit the post-import check refused begins
# (``coordinator._import_refused`` writes it, the plan to the destination
# shows it)
POST_IMPORT_REFUSED = "post-import check"


class Answer(enum.Enum):
    """What a host's agent did when asked ``health`` (``hosts forget``)."""

    SILENT = "silent"
    VERIFIED = "verified"
    # Something answered on its topic, but the reply does not verify: the
    # real agent with a changed key, or anyone on the broker (review fix3,
    # finding 4).
    UNVERIFIED = "unverified"


@dataclasses.dataclass(frozen=True)
class View:
    """What one agent says about the instance's vTPCM (None: it did not answer)."""

    info: am.VTPCMInfo | None
    error: str = ""
    # The agent's signed word that this vTPCM holds its permanent state
    # (agent API 1.7 ``incoming_state``); None: not asked or not answered.
    holds_state: bool | None = None

    def describe(self, host: str) -> str:
        if self.info is None:
            return "the agent of %s does not answer (%s)" % (host, self.error)
        return "on %s it is %s (generation %d%s, %s)" % (
            host, self.info.state, self.info.generation,
            ", migration %s" % self.info.migration_id if self.info.migration_id else "",
            "swtpm running" if self.info.running else "swtpm not running") + (
            "" if self.holds_state is None else
            ", holds received state" if self.holds_state else ", has received no state")


@dataclasses.dataclass(frozen=True)
class Plan:
    action: str
    allowed: bool
    text: str


@dataclasses.dataclass(frozen=True)
class ImportCheck:
    """The post-import check a resolve to the destination ran itself
    (``Coordinator.check_import_for_resolve``): ``passed`` None when the
    option is off (nothing compared), else whether the digests matched;
    ``text`` the outcome in plain words."""

    passed: bool | None
    text: str


DESPITE_FLAG = "--despite-import-check"


def _refused(action: str, why: str) -> Plan:
    return Plan(action, False, why)


def _holds_outgoing(view: View, rec: db_api.MigrationRecord) -> bool:
    i = view.info
    return i is not None and (
        (i.state == "MIGRATING_OUT" and i.migration_id == rec.migration_id)
        or (i.state in ("ACTIVE", "STOPPED") and i.migration_id is None
            and i.generation == rec.generation))


def _holds_incoming(view: View, rec: db_api.MigrationRecord) -> bool:
    """The destination proved (signed reply) it holds this migration's
    received state, or it committed already: a prepared but empty incoming
    vTPCM (libvirt still copying, or a copy that failed) is no copy at all."""
    i = view.info
    return i is not None and (
        (i.state == "MIGRATING_IN" and i.migration_id == rec.migration_id
         and i.generation == rec.generation and view.holds_state is True)
        or (i.state == "ACTIVE" and i.generation == rec.generation + 1))


def plan_past_commit(rec: db_api.MigrationRecord, source: View, dest: View,
                     dest_gone: bool) -> Plan:
    """``--to source --past-commit``: the one way back past the commit point,
    for a destination that died before committing (review fix3, finding 2).
    Only while the migration is COMMITTING (the destination's commit not
    done) and the destination REVOKED or FORGOTTEN, so its agent never
    gets the authority back; the source's copy, still intact, becomes the
    authority under a generation never used."""
    state = M(rec.state)
    action = "roll migration %s back to the source's copy past its commit point" % (
        rec.migration_id)
    seen = "%s; %s." % (source.describe(rec.source), dest.describe(rec.dest))
    if state is M.RECLAIMING:
        return Plan(action, True, "The rollback to the source's copy is under way; "
                                  "finish it. " + seen)
    if state is not M.COMMITTING:
        return _refused(action, (
            "the migration is %s: --past-commit applies only to a migration COMMITTING "
            "whose destination died before committing; %s") % (state, seen))
    if not dest_gone:
        return _refused(action, (
            "the destination %s is not REVOKED: revoke it first (hosts revoke %s), so "
            "that its agent can never get the authority back; %s") % (
            rec.dest, rec.dest, seen))
    if not _holds_outgoing(source, rec):
        return _refused(action, (
            "the source does not hold this migration's outgoing vTPCM, so there is no "
            "intact copy to go back to; %s") % seen)
    new = rec.generation + RECLAIM_GENERATION_STEP
    return Plan(action, True, (
        "Roll migration %s of instance %s back to the source's copy, past its commit "
        "point: the vTPCM on %s becomes the authority again at a new generation %d and "
        "ACTIVE; the copy on %s (generation %d) is never activated: the engine knows "
        "only generation %d on %s from now on. The guest's TPM goes back to its state "
        "at the switchover moment: anything the guest wrote to its TPM on %s is lost. "
        "Choose this only when %s is gone for good and the guest is to run on %s "
        "again. ") % (rec.migration_id, rec.instance_uuid, rec.source, new, rec.dest,
                      rec.generation + 1, new, rec.source, rec.dest, rec.dest,
                      rec.source) + seen)


def plan_migration(rec: db_api.MigrationRecord, to: str, source: View,
                   dest: View, dest_revoked: bool = False,
                   import_refused: str | None = None,
                   import_check: ImportCheck | None = None,
                   despite_import_check: bool = False) -> Plan:
    """What resolving ``rec`` toward ``to`` would do, or why it is refused.

    ``dest_revoked``: back to the source, a REVOKED destination that does
    not destroy its incoming copy (silent, or refusing) is not waited for.
    ``import_refused``: the audited detail of a commit the engine's
    post-import check refused (the plan to the destination warns of it).
    ``import_check``: the check this resolve ran (live path, before the
    commit point); anything but passed refuses the commit unless
    ``despite_import_check`` (the operator's explicit override)."""
    state = M(rec.state)
    action = "resolve migration %s to the %s" % (rec.migration_id, to)
    seen = "%s; %s." % (source.describe(rec.source), dest.describe(rec.dest))
    if state in FINISHED:
        return _refused(action, "the migration is already %s; nothing to resolve" % state)
    if to == "source" and state is M.RECLAIMING:
        return Plan(action, True, "The rollback to the source's copy is under way; "
                                  "finish it. " + seen)
    if to == "source":
        if state in PAST_COMMIT_POINT:
            return _refused(action, (
                "the migration is %s, past its commit point: generation %d on %s is the "
                "authority and the source's copy is stale (or already shredded); making it "
                "live again would bring back an older generation. Resolve to the "
                "destination; if the destination died before committing, revoke it "
                "and see --past-commit. %s") % (state, rec.generation + 1, rec.dest, seen))
        if not _holds_outgoing(source, rec):
            return _refused(action, (
                "the source does not hold this migration's vTPCM, so there is nothing to "
                "go back to; %s Bring the source's agent back, or resolve to the "
                "destination if it holds the state.") % seen)
        text = ("Abort migration %s of instance %s: the incoming vTPCM on %s is destroyed "
                "(its keys shredded) and the vTPCM on %s becomes ACTIVE again at "
                "generation %d. Choose this when the guest runs on %s. ") % (
            rec.migration_id, rec.instance_uuid, rec.dest, rec.source, rec.generation,
            rec.source)
        if _holds_incoming(dest, rec):
            text += ("WARNING: the destination's vTPCM runs; if the guest ran on %s after "
                     "the switchover, what it wrote to its TPM since is lost. ") % rec.dest
        if dest_revoked:
            text += ("%s is REVOKED: if its agent does not destroy the incoming vTPCM "
                     "(silent, or refusing), the source is restored without that step; the "
                     "copy left there never becomes the authority (hosts forget %s removes "
                     "the host's enrollment). ") % (rec.dest, rec.dest)
        return Plan(action, True, text + seen)
    if state in NO_STATE_YET:
        return _refused(action, (
            "the migration is %s: the destination has not received the state; committing "
            "would shred the source's copy, the only good one. Resolve to the source. %s")
            % (state, seen))
    if state in UNDOING:
        return _refused(action, (
            "an abort is under way (%s): the destination's copy may already be destroyed "
            "and the source's is being restored. Resolve to the source to finish it. %s")
            % (state, seen))
    if state not in PAST_COMMIT_POINT and not _holds_incoming(dest, rec):
        return _refused(action, (
            "the destination does not prove that its vTPCM of this migration received "
            "the state (agent API 1.7 incoming_state, signed), so committing would move "
            "the authority to an empty copy and shred the source's, the only good one; "
            "%s") % seen)
    warning = "" if import_refused is None or state in PAST_COMMIT_POINT else (
        "WARNING: the engine's post-import check refused this migration's commit (%s). "
        "The destination's vTPCM may hold another state than the source's (a rolled "
        "back one); committing makes it the authority and shreds the source's copy. "
        % import_refused)
    checked = ""
    if import_check is not None and state not in PAST_COMMIT_POINT:
        checked = import_check.text + " "
        if import_check.passed is False:
            if not despite_import_check:
                return _refused(action, (
                    "%sCommitting could make a rolled back or forged copy the authority "
                    "and shred the source's. Resolve to the source, or, if you know the "
                    "destination's copy is right, repeat with %s. %s")
                    % (checked, DESPITE_FLAG, seen))
            checked += ("The operator overrides it (%s): the destination's copy is "
                        "committed unchecked. " % DESPITE_FLAG)
    return Plan(action, True, warning + checked + (
        "Commit migration %s of instance %s: the vTPCM on %s becomes the authority at "
        "generation %d and ACTIVE; the copy on %s is then destroyed (keys shredded). "
        "Choose this when the guest runs on %s. The destination agent still refuses a "
        "vTPCM that never received its state. %s") % (
        rec.migration_id, rec.instance_uuid, rec.dest, rec.generation + 1, rec.source,
        rec.dest, seen))


def waits_for_destination_answer(rec: db_api.MigrationRecord) -> bool:
    """An abort whose outcome (ABORTED or IN_DOUBT) the destination's answer
    decides: a deadline abort asks it to destroy its copy only if unused, and
    a copy that received the state means the guest may run there."""
    return M(rec.state) is M.ABORTING and rec.error == DEADLINE_REASON


def step_on_lost_host(rec: db_api.MigrationRecord, host: str) -> bool:
    """The one step left of ``rec`` is on ``host``: forgetting it settles ``rec``.
    Not a deadline abort: without the destination's answer nobody knows
    whether the guest ran there, so it needs an explicit resolve."""
    state = M(rec.state)
    return ((state is M.SHREDDING and rec.source == host)
            or (state is M.DISCARDING and rec.dest == host)
            or (state is M.ABORTING and rec.dest == host
                and not waits_for_destination_answer(rec)))


def plan_forget(host: db_api.HostRecord, open_migrations: Sequence[db_api.MigrationRecord],
                vtpcms: Sequence[db_api.VtpcmRecord], answer: Answer,
                despite_unverified: bool = False) -> Plan:
    """What forgetting ``host`` would do, or why it is refused.

    ``despite_unverified``: the operator's word that answers on the host's
    topic that do not verify are not its agent's (anyone on the broker can
    send them, and would otherwise block the forget for ever)."""
    action = "forget host %s" % host.name
    blocking = [r for r in open_migrations if not step_on_lost_host(r, host.name)]
    settled = [r for r in open_migrations if step_on_lost_host(r, host.name)]
    if host.status is HostStatus.FORGOTTEN:
        return _refused(action, "the host is already forgotten")
    if host.status is not HostStatus.REVOKED:
        return _refused(action, "the host is %s: revoke it first (hosts revoke %s), so no "
                                "migration can start toward it and its word moves nothing"
                        % (host.status.value, host.name))
    if answer is Answer.VERIFIED:
        return _refused(action, "the agent of %s still answers: the host is not gone; "
                                "destroy its vTPCMs through Nova instead" % host.name)
    if answer is Answer.UNVERIFIED and not despite_unverified:
        return _refused(action, (
            "something answers on the topic of %s with a reply that does not verify: "
            "the real agent with another key (the host is not gone), or anyone on the "
            "broker. If you know the host is gone for good (you looked at it), forget "
            "it with --despite-unverified-answers") % host.name)
    if blocking:
        return _refused(action, "migrations involving it are not finished (%s): resolve "
                                "each first (migration resolve ID --to ...)%s"
                        % (", ".join("%s %s" % (r.migration_id, r.state) for r in blocking),
                           "; a deadline abort waits for the destination's answer (the "
                           "guest may run there): only an operator who looked can say "
                           "where it runs" if any(waits_for_destination_answer(r)
                                                  for r in blocking) else ""))
    text = ("WARNING: something answers on the topic of %s with replies that do not "
            "verify; you say it is not the host's agent. If it is that agent with a "
            "changed key, the host is forgotten while alive: its vTPCMs are no longer "
            "the engine's and its guests lose them. " % host.name
            if answer is Answer.UNVERIFIED else "")
    text += ("Forget host %s (%s): it becomes FORGOTTEN; its verdict and TPM clock record "
            "are removed, its enrollment stays as a tombstone: its TPM and keys stay bound "
            "to that name (they enroll under no other), its agent's registration enrolls "
            "nothing, and its replies and calls count for nothing. If it ever comes back, "
            "wipe it (its vTPCMs are not the engine's any more) before an operator "
            "enrolls it again (hosts enroll %s). ") % (host.name, host.status.value,
                                                        host.name)
    if vtpcms:
        text += ("The engine also forgets the %d vTPCM(s) recorded on it, whose state was "
                 "on that host only and is lost with it (instances %s); their guests need "
                 "a new vTPCM. ") % (len(vtpcms), ", ".join(v.instance_uuid for v in vtpcms))
    else:
        text += "No vTPCM is recorded on it. "
    for r in settled:
        text += ("Migration %s (%s) goes on without its step on %s: %s. " % (
            r.migration_id, r.state, host.name,
            "the source's copy went with the host; the destination's stays the authority"
            if r.source == host.name else
            "the incoming copy went with the host; the source's vTPCM is restored"))
    return Plan(action, True, text + "The audit log and finished migrations are kept.")


class Settler(Protocol):
    """The coordinator's side of a decision (``coordinator.Coordinator``)."""

    def commit(self, migration_id: str, requested_by: str | None = None, *,
               shred_later: bool = False,
               check_import: bool = True) -> db_api.MigrationRecord: ...
    def abort(self, migration_id: str, reason: str) -> db_api.MigrationRecord: ...
    def finish_pending(self, migration_id: str) -> db_api.MigrationRecord: ...
    def doubt_deadline_abort(self, migration_id: str,
                             reason: str) -> db_api.MigrationRecord: ...
    def skip_lost_host_step(self, migration_id: str, host: str,
                            why: str = ...) -> db_api.MigrationRecord: ...
    def reclaim_source(self, migration_id: str, reason: str) -> db_api.MigrationRecord: ...
    def check_import_for_resolve(self, migration_id: str) -> ImportCheck | None: ...


class Resolver:
    """Runs the plans, each through the protocol's own commit or abort."""

    def __init__(self, db: db_api.Database, settler: Settler,
                 agent_get: Callable[[str, str], am.VTPCMInfo],
                 agent_alive: Callable[[str], Answer],
                 agent_incoming: Callable[[str, am.MigrationContext], am.IncomingState]
                 ) -> None:
        """``agent_alive``: how the host's agent answers ``health``: any
        answer that verifies means the host is not gone; one that does not
        verify needs the operator's word (``plan_forget``). ``agent_incoming``: the
        agent's signed ``incoming_state`` (agent API 1.7)."""
        self.db = db
        self.settler = settler
        self.agent_get = agent_get
        self.agent_alive = agent_alive
        self.agent_incoming = agent_incoming

    def _view(self, host: str, instance_uuid: str) -> View:
        try:
            return View(self.agent_get(host, instance_uuid))
        except exception.VTPCMException as err:
            return View(None, str(err)[:300])

    def _dest_view(self, rec: db_api.MigrationRecord) -> View:
        """The destination's vTPCM, with its signed word on the received state."""
        view = self._view(rec.dest, rec.instance_uuid)
        if view.info is None:
            return view
        ctx = am.MigrationContext(rec.migration_id, rec.instance_uuid, rec.generation,
                                  rec.source, rec.dest)
        try:
            proof = self.agent_incoming(rec.dest, ctx)
        except exception.VTPCMException as err:
            LOG.info("No proof of received state from %(host)s: %(err)s",
                     {"host": rec.dest, "err": err})
            return view
        same = (proof.state == view.info.state and proof.generation == view.info.generation
                and proof.migration_id == view.info.migration_id)
        return dataclasses.replace(view, holds_state=proof.holds_state if same else None)

    def resolve_migration(self, migration_id: str, to: str, execute: bool,
                          past_commit: bool = False,
                          despite_import_check: bool = False) -> tuple[Plan, str]:
        """(the plan, with a note if a step failed; the migration's state afterwards);
        refused -> ResolutionRefused. A step that fails on an unreachable
        host leaves the migration where the protocol put it (reconcile
        retries; ``forget_host`` settles it if the host is gone for good).
        ``past_commit`` (``to`` is the source): ``plan_past_commit``.
        To the destination the post-import check runs here (a fresh nonce):
        a check that never got an answer before must not let an operator
        commit a rolled back copy unwarned (review HIGH 1)."""
        rec = self.db.get_migration(migration_id)
        dest_revoked = self._revoked(rec.dest)
        source, dest = self._view(rec.source, rec.instance_uuid), self._dest_view(rec)
        check: ImportCheck | None = None
        if past_commit and to != "source":
            plan = _refused("resolve migration %s to the %s" % (migration_id, to),
                            "--past-commit goes back to the source's copy: it goes with "
                            "--to source only")
        elif past_commit:
            plan = plan_past_commit(rec, source, dest, dest_revoked or self._forgotten(
                rec.dest))
        else:
            check = (self.settler.check_import_for_resolve(migration_id)
                     if to == "destination" else None)
            plan = plan_migration(rec, to, source, dest, dest_revoked,
                                  self._import_refused(migration_id), check,
                                  despite_import_check)
        self._audit_plan("migration.resolve", plan, execute, instance=rec.instance_uuid,
                         migration_id=migration_id, host=rec.dest)
        if not execute:
            return plan, rec.state
        reason = "resolved by an operator to the %s" % to
        if check is not None:
            # audited with the outcome: a passed check, and an override
            reason += ". " + check.text
            if check.passed is False:
                reason += " Overridden by the operator (%s)." % DESPITE_FLAG
        note = ""
        try:
            if past_commit:
                reason = ("rollback to the source's copy past the commit point, by an "
                          "operator: destination %s died before committing" % rec.dest)
                self.settler.reclaim_source(migration_id, reason)
            elif to == "destination":
                # the plan above ran the post-import check (passed, or the
                # operator overrode it): not again inside the commit
                self.settler.commit(migration_id, check_import=False)
            else:
                self._to_source(migration_id, reason)
        except exception.VTPCMException as err:
            if to == "source" and not past_commit and dest_revoked and \
                    self._skip_revoked_dest(migration_id, rec.dest):
                note = (" The revoked destination did not destroy its copy (%s); restored "
                        "without it." % err)
            else:
                note = (" A step did not complete: %s. Reconcile retries it; if that host "
                        "is gone for good, 'hosts forget' it.") % err
        state = self.db.get_migration(migration_id).state
        outcome = "resolved" if M(state) in (M.ABORTED, M.COMMITTED) else "incomplete"
        if outcome == "incomplete" and not note:
            note = (" The migration is %s, not finished: reconcile goes on with it; see "
                    "'migration show' and the audit log.") % state
        self.db.audit("migration.resolve", outcome, host=rec.dest,
                      instance=rec.instance_uuid, migration_id=migration_id,
                      detail=("%s; now %s.%s" % (reason, state, note))[:4000])
        return dataclasses.replace(plan, text=(plan.text + note)[:4000]), state

    def _import_refused(self, migration_id: str) -> str | None:
        """The newest audited refusal of this migration's commit by the
        post-import check, or None."""
        for detail in self.db.migration_audit_details(migration_id, "migration.commit",
                                                      "refused"):
            if detail.startswith(POST_IMPORT_REFUSED):
                return detail
        return None

    def _to_source(self, migration_id: str, reason: str) -> None:
        """The operator says the guest runs on the source: abort, whatever
        the destination holds (the plan warned of it). Re-read between the
        steps, since each may move the migration (or another may have)."""
        rec = self.db.get_migration(migration_id)
        if waits_for_destination_answer(rec):
            try:  # ask the destination again: its answer decides
                rec = self.settler.finish_pending(migration_id)
            except exception.VTPCMException as err:  # silent, or no usable answer
                LOG.info("Migration %(mig)s: the destination did not answer: %(err)s",
                         {"mig": migration_id, "err": err})
                rec = self.db.get_migration(migration_id)
            if waits_for_destination_answer(rec):  # it does not answer
                rec = self.settler.doubt_deadline_abort(
                    migration_id, "the destination did not answer whether it received the "
                                  "state; %s" % reason)
        if M(rec.state) in UNDOING:
            self.settler.finish_pending(migration_id)
        elif M(rec.state) not in FINISHED:
            self.settler.abort(migration_id, reason)

    def _revoked(self, host: str) -> bool:
        return self._status(host) is HostStatus.REVOKED

    def _forgotten(self, host: str) -> bool:
        return self._status(host) is HostStatus.FORGOTTEN

    def _status(self, host: str) -> HostStatus | None:
        try:
            return self.db.get_host(host).status
        except exception.NotFound:
            return None

    def _skip_revoked_dest(self, migration_id: str, dest: str) -> bool:
        """Back to the source past a REVOKED destination that did not destroy
        its incoming copy: its word is not needed (it held that copy before
        it was revoked, and the engine never gives it the authority), and
        without this the source's vTPCM stays claimed as long as that host
        is silent or refuses. Only once the abort is under way, and never for
        a deadline abort, whose destination's answer decides ABORTED vs
        IN_DOUBT (``_to_source`` makes it IN_DOUBT first)."""
        rec = self.db.get_migration(migration_id)
        if M(rec.state) not in (M.ABORTING, M.DISCARDING) \
                or waits_for_destination_answer(rec):
            return False
        try:
            # DestinationDestroyed: the protocol restores the source at once
            self.settler.skip_lost_host_step(migration_id, dest, why="is REVOKED and did "
                                             "not destroy its incoming copy")
        except exception.VTPCMException as err:
            LOG.warning("Migration %(mig)s: restoring the source without revoked host "
                        "%(host)s failed: %(err)s",
                        {"mig": migration_id, "host": dest, "err": err})
            return False
        return True

    def forget_host(self, name: str, execute: bool,
                    despite_unverified: bool = False) -> Plan:
        host = self.db.get_host(name)
        open_migrations = [r for r in self.db.list_migrations()
                           if name in (r.source, r.dest) and M(r.state) not in FINISHED]
        vtpcms = self.db.list_vtpcms(host=name)
        answer = self.agent_alive(name)
        if answer is Answer.UNVERIFIED:
            self.db.audit("host.forget", "unverified answer", host=name,
                          detail="health on the topic of %s was answered with a reply "
                                 "that does not verify%s" % (
                                     name, "; forgotten on the operator's word"
                                     if despite_unverified else ""))
        plan = plan_forget(host, open_migrations, vtpcms, answer, despite_unverified)
        self._audit_plan("host.forget", plan, execute, host=name)
        if not execute:
            return plan
        for rec in open_migrations:  # only those the plan settles remain here
            self.settler.skip_lost_host_step(rec.migration_id, name)
        forgotten = self.db.forget_host(name)
        self.db.audit("host.forget", "forgotten", host=name,
                      detail=("%d vTPCM record(s) dropped: %s"
                              % (len(forgotten), ", ".join(forgotten)))[:1000])
        LOG.warning("Host %(host)s forgotten by an operator; %(n)d vTPCM record(s) "
                    "dropped", {"host": name, "n": len(forgotten)})
        return plan

    def _audit_plan(self, event: str, plan: Plan, execute: bool, *, host: str,
                    instance: str | None = None, migration_id: str | None = None) -> None:
        outcome = "refused" if not plan.allowed else "planned" if not execute else None
        if outcome is not None:
            self.db.audit(event, outcome, host=host, instance=instance,
                          migration_id=migration_id, detail=plan.text[:4000])
        if not plan.allowed:
            raise exception.ResolutionRefused(action=plan.action, reason=plan.text)
