"""The migration protocol state machine, driven by events only, exhaustively."""

import itertools

import pytest

from tests import spec_tables as spec
from vtpcm_common import exception
from vtpcm_nova.engine import protocol as p
from vtpcm_nova.engine.protocol import MigrationState as M

OK = p.Begin(destination_trusted=True, source_is_location=True, generation_matches=True)

SAMPLE_EVENTS = [
    OK,
    p.KeySealed(envelope=b"sealed"),
    p.DestinationPrepared(),
    p.TransferRequested(),
    p.StateTransferred(),
    p.CommitRequested(),
    p.DestinationCommitted(),
    p.SourceShredded(),
    p.AbortRequested(reason="operator"),
    p.Failure(reason="libvirt said no"),
    p.DeadlinePassed(),
    p.DestinationDestroyed(),
    p.DestinationInUse(),
    p.SourceRestored(),
    p.ReclaimRequested(reason="destination died before committing"),
    p.SourceReclaimed(),
]

# Event sequences from NEW that reach each state.
ROUTES = {
    M.NEW: [],
    M.REFUSED: [p.Begin(False, True, True)],
    M.SEALING: [OK],
    M.PREPARING: [OK, SAMPLE_EVENTS[1]],
    M.PREPARED: [OK, SAMPLE_EVENTS[1], p.DestinationPrepared()],
    M.TRANSFERRING: [OK, SAMPLE_EVENTS[1], p.DestinationPrepared(), p.TransferRequested()],
    M.TRANSFERRED: [OK, SAMPLE_EVENTS[1], p.DestinationPrepared(), p.TransferRequested(),
                    p.StateTransferred()],
    M.COMMITTING: [OK, SAMPLE_EVENTS[1], p.DestinationPrepared(), p.CommitRequested()],
    M.SHREDDING: [OK, SAMPLE_EVENTS[1], p.DestinationPrepared(), p.CommitRequested(),
                  p.DestinationCommitted()],
    M.COMMITTED: [OK, SAMPLE_EVENTS[1], p.DestinationPrepared(), p.CommitRequested(),
                  p.DestinationCommitted(), p.SourceShredded()],
    M.ABORTING: [OK, p.Failure("x")],
    M.IN_DOUBT: [OK, SAMPLE_EVENTS[1], p.DestinationPrepared(), p.DeadlinePassed(),
                 p.DestinationInUse()],
    M.DISCARDING: [OK, SAMPLE_EVENTS[1], p.DestinationPrepared(), p.DeadlinePassed(),
                   p.DestinationInUse(), p.AbortRequested("nova rolled back")],
    M.RESTORING: [OK, p.Failure("x"), p.DestinationDestroyed()],
    M.ABORTED: [OK, p.Failure("x"), p.DestinationDestroyed(), p.SourceRestored()],
    M.RECLAIMING: [OK, SAMPLE_EVENTS[1], p.DestinationPrepared(), p.CommitRequested(),
                   p.ReclaimRequested("destination died")],
}


def at(state):
    proto = p.MigrationProtocol("m-1")
    for event in ROUTES[state]:
        proto.handle(event)
    assert proto.state is state
    return proto


def test_every_state_has_a_route():
    assert set(ROUTES) == set(M)


SPEC_EVENTS = [*SAMPLE_EVENTS, p.Begin(destination_trusted=False, source_is_location=True,
                                    generation_matches=True, reason="verdict UNTRUSTED")]


def _spec_name(event: p.Event) -> str:
    """The event's name in tests/spec_tables.py."""
    if isinstance(event, p.Begin):
        ok = event.destination_trusted and event.source_is_location and event.generation_matches
        return "Begin(ok)" if ok else "Begin(refused)"
    return type(event).__name__


@pytest.mark.parametrize(("state", "event"), list(itertools.product(list(M), SPEC_EVENTS)),
                         ids=lambda v: getattr(v, "value", None) or _spec_name(v))
def test_whole_table_against_the_spec(state, event):
    """Every (state, event) pair does what the hand-written spec says: a
    move, a no-op repeat, or a refusal that leaves the state as it was."""
    proto = at(state)
    key = (state.value, _spec_name(event))
    if key in spec.PROTOCOL_MOVES:
        proto.handle(event)
        assert proto.state.value == spec.PROTOCOL_MOVES[key]
    elif key in spec.PROTOCOL_REPEATS:
        assert proto.handle(event) == []
        assert proto.state is state
    else:
        with pytest.raises(exception.InvalidTransition) as err:
            proto.handle(event)
        assert proto.state is state, "an illegal event must not move the state"
        target = "Begin" if isinstance(event, p.Begin) else type(event).__name__
        assert str(err.value) == "Illegal transition of migration m-1 from %s to %s" % (
            state.value, target)


def test_the_code_tables_are_the_spec_both_ways():
    """Nothing in the code's tables that the spec lacks, and the reverse."""
    code_moves = {(s.value, ev.__name__): to.value for (s, ev), to in p.TRANSITIONS.items()}
    spec_moves = {k: v for k, v in spec.PROTOCOL_MOVES.items() if not k[1].startswith("Begin")}
    assert code_moves == spec_moves
    code_repeats = {(s.value, ev.__name__) for s, ev in p.IDEMPOTENT}
    assert code_repeats == {k for k in spec.PROTOCOL_REPEATS if not k[1].startswith("Begin")}
    assert {s.value for s in M} == spec.PROTOCOL_STATES
    assert {s.value for s in p.TERMINAL} == spec.PROTOCOL_FINAL
    assert {s.value for s in p.ABORTABLE} == set(spec.BEFORE_COMMIT_POINT)
    assert {type(e).__name__ for e in SAMPLE_EVENTS} == {
        ev.split("(")[0] for _, ev in [*spec.PROTOCOL_MOVES, *spec.PROTOCOL_REPEATS]}


def test_terminal_states_accept_nothing_new():
    for state in spec.PROTOCOL_FINAL:
        for event in SPEC_EVENTS:
            assert (state, _spec_name(event)) not in spec.PROTOCOL_MOVES
            proto = at(M(state))
            key = (state, _spec_name(event))
            if key in spec.PROTOCOL_REPEATS:
                assert proto.handle(event) == []
            else:
                with pytest.raises(exception.InvalidTransition):
                    proto.handle(event)
            assert proto.state.value == state


def test_abort_after_commit_point_is_refused():
    for state in (M.COMMITTING, M.SHREDDING, M.COMMITTED):
        proto = at(state)
        for event in (p.AbortRequested("late"), p.Failure("late"), p.DeadlinePassed()):
            with pytest.raises(exception.InvalidTransition):
                proto.handle(event)
            assert proto.state is state


def test_commit_after_abort_is_refused():
    for state in (M.ABORTING, M.DISCARDING, M.RESTORING, M.ABORTED):
        proto = at(state)
        with pytest.raises(exception.InvalidTransition):
            proto.handle(p.CommitRequested())
        assert proto.state is state


@pytest.mark.parametrize("flags", [f for f in itertools.product([True, False], repeat=3)
                                   if not all(f)])
def test_begin_refusals_name_the_reason(flags):
    proto = p.MigrationProtocol("m-2")
    actions = proto.handle(p.Begin(*flags, reason="verdict UNTRUSTED"))
    assert proto.state is M.REFUSED
    assert actions == [a for a in actions if isinstance(a, p.Audit)]
    detail = actions[0].detail
    assert "verdict UNTRUSTED" in detail
    if not flags[0]:
        assert "destination not trusted" in detail
    if not flags[2]:
        assert "generation" in detail


def test_happy_path_actions_in_order():
    proto = p.MigrationProtocol("m-3")
    names = []
    for event in ROUTES[M.COMMITTED]:
        names += [a.name for a in proto.handle(event) if not isinstance(a, p.Audit)]
    assert names == ["seal_key", "prepare_destination", "move_authority",
                     "commit_destination", "shred_source"]


def test_abort_path_destroys_destination_before_restoring_source():
    proto = at(M.PREPARED)
    names = []
    for event in (p.DeadlinePassed(), p.DestinationDestroyed(), p.SourceRestored()):
        names += [a.name for a in proto.handle(event) if not isinstance(a, p.Audit)]
    assert names == ["destroy_destination", "restore_source"]
    assert proto.state is M.ABORTED


def test_envelope_reaches_prepare_action_and_stays_out_of_reprs():
    proto = at(M.SEALING)
    (action,) = proto.handle(p.KeySealed(envelope=b"\x01secret-ciphertext"))
    assert isinstance(action, p.PrepareDestination)
    assert action.envelope == b"\x01secret-ciphertext"
    assert "secret" not in repr(action) and "secret" not in repr(p.KeySealed(b"secret"))


def test_pending_actions_only_in_pending_states():
    for state in M:
        assert bool(p.pending_actions(state)) == (state in p.PENDING_WORK)


def test_only_a_deadline_abort_spares_a_destination_that_received_state():
    for event, expected in ((p.DeadlinePassed(), True), (p.AbortRequested("nova"), False),
                            (p.Failure("libvirt"), False)):
        proto = at(M.PREPARED)
        (destroy,) = [a for a in proto.handle(event) if isinstance(a, p.DestroyDestination)]
        assert destroy.only_if_unused is expected
    assert p.pending_actions(M.ABORTING, after_deadline=True) == \
        [p.DestroyDestination(only_if_unused=True)]
    assert p.pending_actions(M.ABORTING) == [p.DestroyDestination(only_if_unused=False)]


def _non_audit(actions):
    return [a for a in actions if not isinstance(a, p.Audit)]


def test_a_deadline_abort_that_finds_the_destination_used_follows_the_guest():
    """The commit was lost after the switchover; at the deadline the
    destination refuses to destroy the state it received. The migration is
    then in doubt, not stuck in ABORTING: a (late) commit passes the commit
    point after all."""
    verdict = p.CommitRequested()
    proto = at(M.PREPARED)
    assert _non_audit(proto.handle(p.DeadlinePassed())) == \
        [p.DestroyDestination(only_if_unused=True)]
    actions = proto.handle(p.DestinationInUse("the incoming vTPCM already received its state"))
    assert proto.state is M.IN_DOUBT
    assert actions == [p.Audit(event="migration.abort", outcome="in doubt",
                               detail="the incoming vTPCM already received its state"),
                       p.CheckSwitchover()]
    assert proto.handle(p.DestinationInUse()) == []  # a repeated refusal changes nothing
    names = [a.name for a in _non_audit(proto.handle(verdict))]
    assert proto.state is M.COMMITTING
    assert names == ["move_authority", "commit_destination"]
    for event in (p.DestinationCommitted(), p.SourceShredded()):
        proto.handle(event)
    assert proto.state is M.COMMITTED
    assert proto.handle(verdict) == []  # the caller's retry is a success


def test_in_doubt_ends_only_by_commit_or_an_explicit_abort():
    for event in (p.Failure("x"), p.DeadlinePassed(), p.DestinationDestroyed(),
                  p.DestinationCommitted(), p.SourceShredded(), p.SourceRestored()):
        proto = at(M.IN_DOUBT)
        with pytest.raises(exception.InvalidTransition, match="from IN_DOUBT"):
            proto.handle(event)
        assert proto.state is M.IN_DOUBT
    assert p.pending_actions(M.IN_DOUBT) == [p.CheckSwitchover()]


def test_an_explicit_abort_in_doubt_destroys_the_destination_regardless():
    """Nova's rollback says the guest stayed on the source: the state the
    destination received is discarded, the source restored."""
    proto = at(M.IN_DOUBT)
    actions = proto.handle(p.AbortRequested("rolled back by Nova at the source"))
    assert proto.state is M.DISCARDING
    assert _non_audit(actions) == [p.DestroyDestination(only_if_unused=False)]
    assert proto.handle(p.AbortRequested("retried")) == []
    assert p.pending_actions(M.DISCARDING) == [p.DestroyDestination(only_if_unused=False)]
    with pytest.raises(exception.InvalidTransition, match="from DISCARDING"):
        proto.handle(p.CommitRequested())
    for event in (p.DestinationDestroyed(), p.SourceRestored()):
        proto.handle(event)
    assert proto.state is M.ABORTED


def test_only_a_commit_request_passes_the_commit_point():
    """No event made of agent answers (unauthenticated) may lead into
    COMMITTING: only the signed CommitRequested does, from PREPARED,
    TRANSFERRED (cold) or IN_DOUBT."""
    into_commit = {key for key, to in spec.PROTOCOL_MOVES.items() if to == "COMMITTING"}
    assert into_commit == {("PREPARED", "CommitRequested"), ("TRANSFERRED", "CommitRequested"),
                           ("IN_DOUBT", "CommitRequested")}
    for state in M:
        for event in SPEC_EVENTS:
            proto = at(state)
            try:
                proto.handle(event)
            except exception.InvalidTransition:
                continue
            if proto.state is M.COMMITTING and state is not M.COMMITTING:
                assert (state.value, _spec_name(event)) in into_commit


# --- cold migration, resize: the state moves by the engine's transfer ---------------

# The cold variant's rows are in tests/spec_tables.py with the others (written
# out by hand there); test_the_code_tables_are_the_spec_both_ways holds the
# code's table to all of them.

def test_cold_rows_of_the_table_are_exactly_the_spec():
    cold_states = {"TRANSFERRING", "TRANSFERRED"}
    cold_events = {"TransferRequested", "StateTransferred"}
    rows = {(s.value, ev.__name__): to.value for (s, ev), to in p.TRANSITIONS.items()
            if s.value in cold_states or ev.__name__ in cold_events}
    assert rows == {k: v for k, v in spec.PROTOCOL_MOVES.items()
                    if k[0] in cold_states or k[1] in cold_events}
    assert ("TRANSFERRED", "TransferRequested") in spec.PROTOCOL_REPEATS
    assert {M(s) for s in cold_states} <= p.ABORTABLE
    assert not {M(s) for s in cold_states} & p.PENDING_WORK


def test_cold_happy_path_actions_in_order():
    proto = p.MigrationProtocol("m-cold")
    names = []
    for event in (OK, p.KeySealed(b"e"), p.DestinationPrepared(), p.TransferRequested(),
                  p.StateTransferred(), p.CommitRequested(), p.DestinationCommitted(),
                  p.SourceShredded()):
        names += [a.name for a in proto.handle(event) if not isinstance(a, p.Audit)]
    assert names == ["seal_key", "prepare_destination", "transfer_state",
                     "move_authority", "commit_destination", "shred_source"]
    assert proto.state is M.COMMITTED


def test_the_state_is_transferred_once():
    """A retried (or replayed) transfer after the state went asks nothing
    of the agents; a transfer before the destination is prepared or after
    the migration ended is refused and changes nothing."""
    proto = at(M.TRANSFERRED)
    assert proto.handle(p.TransferRequested()) == []
    assert proto.state is M.TRANSFERRED
    for state in (M.SEALING, M.PREPARING, M.TRANSFERRING, M.COMMITTING, M.COMMITTED,
                  M.ABORTING, M.IN_DOUBT, M.ABORTED, M.REFUSED):
        proto = at(state)
        with pytest.raises(exception.InvalidTransition, match="TransferRequested"):
            proto.handle(p.TransferRequested())
        assert proto.state is state


@pytest.mark.parametrize("state", [M.TRANSFERRING, M.TRANSFERRED])
def test_a_cold_migration_aborts_like_a_live_one(state):
    """Revert (an explicit abort) discards the destination; a failed
    transfer too; a deadline spares a destination that holds the state
    (the resized guest may run on it until confirm or revert)."""
    for event, spare in ((p.AbortRequested("reverted"), False), (p.Failure("import"), False),
                         (p.DeadlinePassed(), True)):
        proto = at(state)
        (destroy,) = _non_audit(proto.handle(event))
        assert destroy == p.DestroyDestination(only_if_unused=spare)
        assert proto.state is M.ABORTING
    proto = at(state)
    proto.handle(p.DeadlinePassed())
    proto.handle(p.DestinationInUse())
    assert proto.state is M.IN_DOUBT
    proto.handle(p.CommitRequested())  # the confirm, days later
    assert proto.state is M.COMMITTING



# -- the actions each move asks for, exactly (audit records included) ---------

A = p.Audit


@pytest.mark.parametrize(("reason", "flags", "detail"), [
    ("", (False, True, True), "destination not trusted"),
    ("", (True, False, False),
     "source is not where the vTPCM lives; generation does not match the authority"),
    ("verdict UNTRUSTED", (False, False, True),
     "destination not trusted; source is not where the vTPCM lives: verdict UNTRUSTED"),
])
def test_begin_refusal_audit_is_exact(reason, flags, detail):
    proto = p.MigrationProtocol("m-2")
    assert proto.handle(p.Begin(*flags, reason=reason)) == [
        A(event="migration.begin", outcome="refused", detail=detail)]


def test_actions_of_the_happy_path_are_exact():
    proto = p.MigrationProtocol("m-1")
    assert proto.handle(OK) == [A(event="migration.begin", outcome="accepted"), p.SealKey()]
    assert proto.handle(p.KeySealed(envelope=b"e")) == [p.PrepareDestination(envelope=b"e")]
    assert proto.handle(p.DestinationPrepared()) == []
    assert proto.handle(p.CommitRequested()) == [
        A(event="migration.commit", outcome="commit point passed"),
        p.MoveAuthority(), p.CommitDestination()]
    assert proto.handle(p.DestinationCommitted()) == [p.ShredSource()]
    assert proto.handle(p.SourceShredded()) == []


@pytest.mark.parametrize(("event", "detail", "only_if_unused"), [
    (p.Failure("libvirt said no"), "libvirt said no", False),
    (p.AbortRequested("operator"), "operator", False),
    (p.DeadlinePassed(), "deadline passed", True),
])
def test_actions_of_an_abort_are_exact(event, detail, only_if_unused):
    proto = at(M.PREPARED)
    assert proto.handle(event) == [A(event="migration.abort", outcome="aborting", detail=detail),
                                   p.DestroyDestination(only_if_unused=only_if_unused)]
    assert proto.handle(p.DestinationDestroyed()) == [p.RestoreSource()]
    assert proto.handle(p.SourceRestored()) == []


def test_actions_in_doubt_and_discarding_are_exact():
    proto = at(M.ABORTING)
    assert proto.handle(p.DestinationInUse()) == [
        A(event="migration.abort", outcome="in doubt",
          detail="the destination received the state"), p.CheckSwitchover()]
    assert proto.handle(p.AbortRequested("nova rolled back")) == [
        A(event="migration.abort", outcome="discarding the destination",
          detail="nova rolled back"), p.DestroyDestination(only_if_unused=False)]


def test_no_pending_actions_outside_the_pending_states():
    for state in M:
        if state not in p.PENDING_WORK:
            assert p.pending_actions(state) == []


def test_actions_of_the_cold_path_are_exact():
    proto = at(M.PREPARED)
    assert proto.handle(p.TransferRequested()) == [p.TransferState()]
    assert proto.handle(p.StateTransferred()) == [
        A(event="migration.transfer", outcome="state transferred")]
