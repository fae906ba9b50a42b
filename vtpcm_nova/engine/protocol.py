"""The VM-vTPCM synchronous migration protocol as a pure state machine.

No I/O here: the coordinator feeds events in and carries the returned actions
out (RPC to agents, DB writes). States, events and the transition table are
declared once; an event that the table does not allow in the current state
raises ``InvalidTransition`` and leaves the state unchanged. Repeating the
event that led to the current state is a no-op (idempotent retries).

Happy path::

    NEW --Begin(ok)--> SEALING --KeySealed--> PREPARING --DestinationPrepared-->
    PREPARED --CommitRequested--> COMMITTING --DestinationCommitted-->
    SHREDDING --SourceShredded--> COMMITTED

A cold migration or resize (the guest is off) moves the state itself: the
source's signed transfer makes the engine carry the blobs (still encrypted
under the migration key) from the source's agent into the destination's
incoming vTPCM, once::

    PREPARED --TransferRequested--> TRANSFERRING --StateTransferred-->
    TRANSFERRED --CommitRequested--> COMMITTING --> ...

Failure before the commit point (any of SEALING, PREPARING, PREPARED,
TRANSFERRING, TRANSFERRED)::

    --AbortRequested / Failure / DeadlinePassed--> ABORTING
    --DestinationDestroyed--> RESTORING --SourceRestored--> ABORTED

A deadline abort destroys the destination only if it never received the
state. If it did, the guest may run there (its commit was lost), so the
migration is in doubt, and only a signed word settles it: the source's
commit (the guest arrived), or an abort (Nova rolled back)::

    ABORTING --DestinationInUse--> IN_DOUBT
    IN_DOUBT --CommitRequested--> COMMITTING --> ...
    IN_DOUBT --AbortRequested--> DISCARDING --DestinationDestroyed--> RESTORING

Agent answers about where the guest runs (which swtpm still runs) are not
authenticated: a broker client can forge them, so they never move a
migration, least of all past the commit point; ``CheckSwitchover`` only
logs what they say, for the operator.

An operator's rollback past the commit point, only for a destination
that died before committing (revoked or forgotten, its step not done):
the source's intact copy becomes the authority again under a new
generation (generation + 2: generation + 1 is the destination's, which is
never activated)::

    COMMITTING --ReclaimRequested--> RECLAIMING --SourceReclaimed--> ABORTED

The commit point is entering COMMITTING: from then on the vTPCM lives at the
destination (the engine moves its authority record to dest, generation+1 in
the same transaction), so abort is refused and the source is shredded only
after the destination confirmed. Before it, the source copy stays the live one.
"""

import dataclasses
import enum
from typing import ClassVar, TypeAlias

from vtpcm_common import exception


class MigrationState(enum.StrEnum):
    NEW = "NEW"
    REFUSED = "REFUSED"
    SEALING = "SEALING"
    PREPARING = "PREPARING"
    PREPARED = "PREPARED"
    TRANSFERRING = "TRANSFERRING"
    TRANSFERRED = "TRANSFERRED"
    COMMITTING = "COMMITTING"
    SHREDDING = "SHREDDING"
    COMMITTED = "COMMITTED"
    ABORTING = "ABORTING"
    IN_DOUBT = "IN_DOUBT"
    DISCARDING = "DISCARDING"
    RESTORING = "RESTORING"
    RECLAIMING = "RECLAIMING"
    ABORTED = "ABORTED"


M = MigrationState
TERMINAL = frozenset({M.REFUSED, M.COMMITTED, M.ABORTED})
# States in which the coordinator still owes agent calls after a restart.
PENDING_WORK = frozenset({M.COMMITTING, M.SHREDDING, M.ABORTING, M.IN_DOUBT,
                          M.DISCARDING, M.RESTORING, M.RECLAIMING})
# The generation the source's copy takes back past the commit point.
RECLAIM_GENERATION_STEP = 2
ABORTABLE = frozenset({M.SEALING, M.PREPARING, M.PREPARED, M.TRANSFERRING, M.TRANSFERRED})


# --- events -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Begin:
    """Preconditions, evaluated by the coordinator from its own records."""

    destination_trusted: bool
    source_is_location: bool
    generation_matches: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class KeySealed:
    """The source agent sealed the migration key for the destination's TPM."""

    envelope: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class DestinationPrepared:
    pass


@dataclasses.dataclass(frozen=True)
class TransferRequested:
    """The source (guest off: cold migration, resize) asks the engine to
    carry the encrypted blobs to the prepared destination."""


@dataclasses.dataclass(frozen=True)
class StateTransferred:
    """The destination's incoming vTPCM took the blobs."""


@dataclasses.dataclass(frozen=True)
class CommitRequested:
    pass


@dataclasses.dataclass(frozen=True)
class DestinationCommitted:
    pass


@dataclasses.dataclass(frozen=True)
class SourceShredded:
    pass


@dataclasses.dataclass(frozen=True)
class AbortRequested:
    reason: str


@dataclasses.dataclass(frozen=True)
class Failure:
    reason: str


DEADLINE_REASON = "deadline passed"


@dataclasses.dataclass(frozen=True)
class DeadlinePassed:
    """The migration outlived its deadline without a commit or an abort."""

    reason: str = DEADLINE_REASON


@dataclasses.dataclass(frozen=True)
class DestinationDestroyed:
    pass


@dataclasses.dataclass(frozen=True)
class DestinationInUse:
    """The destination refused the deadline's destroy: its incoming vTPCM
    received the state, so the guest may run on it."""

    reason: str = "the destination received the state"


@dataclasses.dataclass(frozen=True)
class SourceRestored:
    pass


@dataclasses.dataclass(frozen=True)
class ReclaimRequested:
    """An operator's signed, audited rollback past the commit point (the
    coordinator checks it applies: the destination is gone, its step
    not done)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class SourceReclaimed:
    """The source's copy is live again at the new generation, and the
    engine's record says so."""


Event: TypeAlias = (Begin | KeySealed | DestinationPrepared | TransferRequested
                    | StateTransferred | CommitRequested
                    | DestinationCommitted | SourceShredded | AbortRequested | Failure
                    | DeadlinePassed | DestinationDestroyed | DestinationInUse
                    | SourceRestored | ReclaimRequested | SourceReclaimed)


# --- actions ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Action:
    name: ClassVar[str] = "action"


@dataclasses.dataclass(frozen=True)
class SealKey(Action):
    """Ask the source agent to mark MIGRATING_OUT and seal the key to dest."""

    name: ClassVar[str] = "seal_key"


@dataclasses.dataclass(frozen=True)
class PrepareDestination(Action):
    name: ClassVar[str] = "prepare_destination"
    envelope: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class TransferState(Action):
    """Export the blobs at the source (this migration, this generation only)
    and import them into the destination's incoming vTPCM."""

    name: ClassVar[str] = "transfer_state"


@dataclasses.dataclass(frozen=True)
class MoveAuthority(Action):
    """The commit point: the engine's record says dest, generation + 1."""

    name: ClassVar[str] = "move_authority"


@dataclasses.dataclass(frozen=True)
class CommitDestination(Action):
    name: ClassVar[str] = "commit_destination"


@dataclasses.dataclass(frozen=True)
class ShredSource(Action):
    name: ClassVar[str] = "shred_source"


@dataclasses.dataclass(frozen=True)
class DestroyDestination(Action):
    """Destroy the incoming vTPCM. After a deadline (not an explicit abort)
    only if it never received state: QEMU may be running on it already."""

    name: ClassVar[str] = "destroy_destination"
    only_if_unused: bool = False


@dataclasses.dataclass(frozen=True)
class CheckSwitchover(Action):
    """Log what both agents say about where the guest runs, for the
    operator; never an event (a stopped source swtpm is no proof of a
    switchover, signed or not)."""

    name: ClassVar[str] = "check_switchover"


@dataclasses.dataclass(frozen=True)
class RestoreSource(Action):
    name: ClassVar[str] = "restore_source"


@dataclasses.dataclass(frozen=True)
class ReclaimSource(Action):
    """Make the source's copy live at generation + 2 and move the
    engine's record there."""

    name: ClassVar[str] = "reclaim_source"


@dataclasses.dataclass(frozen=True)
class Audit(Action):
    name: ClassVar[str] = "audit"
    event: str = ""
    outcome: str = ""
    detail: str = ""


# --- the table ----------------------------------------------------------------

_ABORT_EVENTS = (AbortRequested, Failure, DeadlinePassed)

# (state, event type) -> next state. Events not listed are illegal there.
TRANSITIONS: dict[tuple[MigrationState, type], MigrationState] = {
    (M.SEALING, KeySealed): M.PREPARING,
    (M.PREPARING, DestinationPrepared): M.PREPARED,
    (M.PREPARED, CommitRequested): M.COMMITTING,
    (M.PREPARED, TransferRequested): M.TRANSFERRING,
    (M.TRANSFERRING, StateTransferred): M.TRANSFERRED,
    (M.TRANSFERRED, CommitRequested): M.COMMITTING,
    (M.COMMITTING, DestinationCommitted): M.SHREDDING,
    (M.SHREDDING, SourceShredded): M.COMMITTED,
    (M.ABORTING, DestinationDestroyed): M.RESTORING,
    (M.ABORTING, DestinationInUse): M.IN_DOUBT,
    (M.IN_DOUBT, CommitRequested): M.COMMITTING,
    (M.IN_DOUBT, AbortRequested): M.DISCARDING,
    (M.DISCARDING, DestinationDestroyed): M.RESTORING,
    (M.RESTORING, SourceRestored): M.ABORTED,
    (M.COMMITTING, ReclaimRequested): M.RECLAIMING,
    (M.RECLAIMING, SourceReclaimed): M.ABORTED,
    **{(state, ev): M.ABORTING for state in ABORTABLE for ev in _ABORT_EVENTS},
}

# Events that repeat what already happened: accepted, no new actions.
IDEMPOTENT: frozenset[tuple[MigrationState, type]] = frozenset({
    (M.PREPARED, DestinationPrepared),
    (M.TRANSFERRED, TransferRequested),  # a retried transfer: the state went once
    (M.COMMITTING, CommitRequested),
    (M.SHREDDING, CommitRequested),
    (M.SHREDDING, DestinationCommitted),
    (M.COMMITTED, CommitRequested),
    (M.COMMITTED, DestinationCommitted),
    (M.COMMITTED, SourceShredded),
    *((s, ev) for s in (M.ABORTING, M.RESTORING, M.ABORTED) for ev in _ABORT_EVENTS),
    (M.IN_DOUBT, DestinationInUse),
    (M.DISCARDING, AbortRequested),
    (M.RESTORING, DestinationDestroyed),
    (M.ABORTED, DestinationDestroyed),
    (M.ABORTED, SourceRestored),
    (M.RECLAIMING, ReclaimRequested),
    (M.ABORTED, SourceReclaimed),
})


def _entry_actions(state: MigrationState, event: Event) -> list[Action]:
    """What the coordinator must do on entering ``state``, in order.

    At most one action per list produces the next event, and it comes last:
    the coordinator moves on as soon as an action yields an event."""
    if state is M.SEALING:
        return [SealKey()]
    if state is M.PREPARING:
        assert isinstance(event, KeySealed)
        return [PrepareDestination(envelope=event.envelope)]
    if state is M.TRANSFERRING:
        return [TransferState()]
    if state is M.TRANSFERRED:
        return [Audit(event="migration.transfer", outcome="state transferred")]
    if state is M.COMMITTING:
        return [Audit(event="migration.commit", outcome="commit point passed"),
                MoveAuthority(), CommitDestination()]
    if state is M.SHREDDING:
        return [ShredSource()]
    if state is M.ABORTING:
        reason = getattr(event, "reason", DEADLINE_REASON)
        return [Audit(event="migration.abort", outcome="aborting", detail=reason),
                DestroyDestination(only_if_unused=isinstance(event, DeadlinePassed))]
    if state is M.IN_DOUBT:
        assert isinstance(event, DestinationInUse)
        return [Audit(event="migration.abort", outcome="in doubt", detail=event.reason),
                CheckSwitchover()]
    if state is M.DISCARDING:
        assert isinstance(event, AbortRequested)
        return [Audit(event="migration.abort", outcome="discarding the destination",
                      detail=event.reason),
                DestroyDestination()]
    if state is M.RESTORING:
        return [RestoreSource()]
    if state is M.RECLAIMING:
        assert isinstance(event, ReclaimRequested)
        return [Audit(event="migration.resolve", outcome="rollback to the source's copy",
                      detail=event.reason),
                ReclaimSource()]
    return []


def pending_actions(state: MigrationState, after_deadline: bool = False) -> list[Action]:
    """Actions to re-run after a coordinator restart (all are idempotent).

    ``after_deadline``: the abort under way was caused by the deadline."""
    pending: dict[MigrationState, list[Action]] = {
        M.COMMITTING: [MoveAuthority(), CommitDestination()],
        M.SHREDDING: [ShredSource()],
        M.ABORTING: [DestroyDestination(only_if_unused=after_deadline)],
        M.IN_DOUBT: [CheckSwitchover()],
        M.DISCARDING: [DestroyDestination()],
        M.RESTORING: [RestoreSource()],
        M.RECLAIMING: [ReclaimSource()],
    }
    return pending.get(state, [])


@dataclasses.dataclass
class MigrationProtocol:
    """One migration's protocol state. ``handle`` is the only way to move it."""

    migration_id: str
    state: MigrationState = M.NEW

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, Begin):
            return self._begin(event)
        key = (self.state, type(event))
        if key in IDEMPOTENT:
            return []
        target = TRANSITIONS.get(key)
        if target is None:
            raise exception.InvalidTransition(
                what="migration", key=self.migration_id, current=self.state.value,
                target=type(event).__name__)
        self.state = target
        return _entry_actions(target, event)

    def _begin(self, event: Begin) -> list[Action]:
        if self.state is not M.NEW:
            if self.state in (M.SEALING, M.PREPARING, M.PREPARED):
                return []  # begin retried: already under way
            raise exception.InvalidTransition(
                what="migration", key=self.migration_id, current=self.state.value,
                target="Begin")
        refusals = [text for ok, text in (
            (event.destination_trusted, "destination not trusted"),
            (event.source_is_location, "source is not where the vTPCM lives"),
            (event.generation_matches, "generation does not match the authority"),
        ) if not ok]
        if refusals:
            self.state = M.REFUSED
            detail = "; ".join(refusals) + (": " + event.reason if event.reason else "")
            return [Audit(event="migration.begin", outcome="refused", detail=detail)]
        self.state = M.SEALING
        return [Audit(event="migration.begin", outcome="accepted"), SealKey()]
