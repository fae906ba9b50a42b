"""The legal moves of the two state machines, written a second time, by hand,
from the design document (doc/source/design.rst: "Migration coordinator" and
"Association list"), as the specification the code's tables are checked
against, both ways: every move here must be accepted by the code and lead
where this says, and every move the code accepts must be here.

The tests never derive an expectation from ``protocol.TRANSITIONS`` or
``association.TRANSITIONS``: a move added to (or dropped from) the code's
table alone turns them red. Whoever adds a state or an event (cold
migration, ...) adds it to the design document and here, in the same change.
Names are plain strings so that nothing is imported from the code under test.
"""

# --- migration protocol (vtpcm_nova/engine/protocol.py) ------------------------

ABORT_EVENTS = ("AbortRequested", "Failure", "DeadlinePassed")
BEFORE_COMMIT_POINT = ("SEALING", "PREPARING", "PREPARED", "TRANSFERRING", "TRANSFERRED")

# (state, event) -> next state
PROTOCOL_MOVES: dict[tuple[str, str], str] = {
    ("NEW", "Begin(ok)"): "SEALING",
    ("NEW", "Begin(refused)"): "REFUSED",
    ("SEALING", "KeySealed"): "PREPARING",
    ("PREPARING", "DestinationPrepared"): "PREPARED",
    ("PREPARED", "CommitRequested"): "COMMITTING",
    # cold migration, resize: the engine carries the (encrypted) state once
    ("PREPARED", "TransferRequested"): "TRANSFERRING",
    ("TRANSFERRING", "StateTransferred"): "TRANSFERRED",
    ("TRANSFERRED", "CommitRequested"): "COMMITTING",
    ("COMMITTING", "DestinationCommitted"): "SHREDDING",
    ("SHREDDING", "SourceShredded"): "COMMITTED",
    ("SEALING", "AbortRequested"): "ABORTING",
    ("SEALING", "Failure"): "ABORTING",
    ("SEALING", "DeadlinePassed"): "ABORTING",
    ("PREPARING", "AbortRequested"): "ABORTING",
    ("PREPARING", "Failure"): "ABORTING",
    ("PREPARING", "DeadlinePassed"): "ABORTING",
    ("PREPARED", "AbortRequested"): "ABORTING",
    ("PREPARED", "Failure"): "ABORTING",
    ("PREPARED", "DeadlinePassed"): "ABORTING",
    ("TRANSFERRING", "AbortRequested"): "ABORTING",
    ("TRANSFERRING", "Failure"): "ABORTING",
    ("TRANSFERRING", "DeadlinePassed"): "ABORTING",
    ("TRANSFERRED", "AbortRequested"): "ABORTING",
    ("TRANSFERRED", "Failure"): "ABORTING",
    ("TRANSFERRED", "DeadlinePassed"): "ABORTING",
    ("ABORTING", "DestinationDestroyed"): "RESTORING",
    ("ABORTING", "DestinationInUse"): "IN_DOUBT",
    ("IN_DOUBT", "CommitRequested"): "COMMITTING",
    ("IN_DOUBT", "AbortRequested"): "DISCARDING",
    ("DISCARDING", "DestinationDestroyed"): "RESTORING",
    ("RESTORING", "SourceRestored"): "ABORTED",
    # an operator's rollback past the commit point (destination died, revoked)
    ("COMMITTING", "ReclaimRequested"): "RECLAIMING",
    ("RECLAIMING", "SourceReclaimed"): "ABORTED",
}

# Repeats of what already happened (lost replies, retries): accepted, the
# state stays, nothing new is done.
PROTOCOL_REPEATS: frozenset[tuple[str, str]] = frozenset({
    ("SEALING", "Begin(ok)"), ("PREPARING", "Begin(ok)"), ("PREPARED", "Begin(ok)"),
    ("SEALING", "Begin(refused)"), ("PREPARING", "Begin(refused)"),
    ("PREPARED", "Begin(refused)"),
    ("PREPARED", "DestinationPrepared"),
    ("TRANSFERRED", "TransferRequested"),  # a retried transfer: the state went once
    ("COMMITTING", "CommitRequested"),
    ("SHREDDING", "CommitRequested"), ("SHREDDING", "DestinationCommitted"),
    ("COMMITTED", "CommitRequested"), ("COMMITTED", "DestinationCommitted"),
    ("COMMITTED", "SourceShredded"),
    ("ABORTING", "AbortRequested"), ("ABORTING", "Failure"), ("ABORTING", "DeadlinePassed"),
    ("RESTORING", "AbortRequested"), ("RESTORING", "Failure"),
    ("RESTORING", "DeadlinePassed"),
    ("ABORTED", "AbortRequested"), ("ABORTED", "Failure"), ("ABORTED", "DeadlinePassed"),
    ("IN_DOUBT", "DestinationInUse"),
    ("DISCARDING", "AbortRequested"),
    ("RESTORING", "DestinationDestroyed"),
    ("ABORTED", "DestinationDestroyed"), ("ABORTED", "SourceRestored"),
    ("RECLAIMING", "ReclaimRequested"), ("ABORTED", "SourceReclaimed"),
})

PROTOCOL_STATES = frozenset({
    "NEW", "REFUSED", "SEALING", "PREPARING", "PREPARED", "TRANSFERRING", "TRANSFERRED",
    "COMMITTING", "SHREDDING",
    "COMMITTED", "ABORTING", "IN_DOUBT", "DISCARDING", "RESTORING", "RECLAIMING",
    "ABORTED"})
PROTOCOL_FINAL = frozenset({"REFUSED", "COMMITTED", "ABORTED"})
# The commit point: the only way into COMMITTING.
COMMIT_POINT = ("COMMITTING", "CommitRequested")

# --- association list (vtpcm_agent/association.py) -----------------------------

ASSOCIATION_MOVES: dict[str, frozenset[str]] = {
    "CREATING": frozenset({"STOPPED", "DESTROYED"}),
    "STOPPED": frozenset({"ACTIVE", "MIGRATING_OUT", "DESTROYED"}),
    "ACTIVE": frozenset({"STOPPED", "MIGRATING_OUT"}),
    "MIGRATING_OUT": frozenset({"ACTIVE", "STOPPED", "DESTROYED"}),
    "MIGRATING_IN": frozenset({"ACTIVE", "STOPPED", "DESTROYED"}),
    "DESTROYED": frozenset(),
}
# A new row starts in one of these (local create, incoming migration).
ASSOCIATION_INITIAL = frozenset({"CREATING", "MIGRATING_IN"})
