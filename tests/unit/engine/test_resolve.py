"""The operator's decisions as pure plans: every migration state, both
directions, with what the agents say; and forgetting a host."""

import datetime
import uuid

import pytest

from vtpcm_common.api.agent import messages as am
from vtpcm_nova.engine import resolve
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.db.records import HostRecord, MigrationRecord, VtpcmRecord
from vtpcm_nova.engine.protocol import MigrationState as M

NOW = datetime.datetime(2026, 11, 30, tzinfo=datetime.UTC)
MID = str(uuid.uuid4())
INSTANCE = str(uuid.uuid4())


def migration(state: M, source: str = "src", dest: str = "dst",
              error: str | None = None) -> MigrationRecord:
    return MigrationRecord(MID, INSTANCE, source, dest, 4, state.value, NOW, NOW, NOW, error)


def view(state: str, generation: int = 4, migration_id: str | None = MID,
         running: bool = True, holds_state: bool | None = None) -> resolve.View:
    return resolve.View(am.VTPCMInfo(INSTANCE, str(uuid.uuid4()), state, generation,
                                     migration_id, "/run/vtpcm/x.ctrl", running, 42),
                        holds_state=holds_state)


GONE = resolve.View(None, "MessagingTimeout")
SILENT = resolve.Answer.SILENT
OUT, IN = view("MIGRATING_OUT", running=False), view("MIGRATING_IN", holds_state=True)

# what each state allows with both agents holding their copies
EXPECTED = {
    M.SEALING: (True, False), M.PREPARING: (True, False), M.PREPARED: (True, True),
    M.TRANSFERRING: (True, False), M.TRANSFERRED: (True, True),  # cold migration
    M.COMMITTING: (False, True), M.SHREDDING: (False, True), M.ABORTING: (True, False),
    M.IN_DOUBT: (True, True), M.DISCARDING: (True, False), M.RESTORING: (True, False),
    M.RECLAIMING: (True, False),  # finish the rollback
    M.COMMITTED: (False, False), M.ABORTED: (False, False), M.REFUSED: (False, False),
}


@pytest.mark.parametrize("state", [s for s in M if s is not M.NEW])
def test_each_state_allows_only_what_keeps_a_good_copy(state):
    to_source, to_dest = EXPECTED[state]
    assert resolve.plan_migration(migration(state), "source", OUT, IN).allowed is to_source
    assert resolve.plan_migration(migration(state), "destination", OUT, IN).allowed \
        is to_dest


def test_past_the_commit_point_the_source_is_refused_in_plain_words():
    plan = resolve.plan_migration(migration(M.COMMITTING), "source", OUT, IN)
    assert not plan.allowed
    assert "past its commit point" in plan.text and "older generation" in plan.text


def test_destination_without_proof_of_received_state_is_refused():
    """Review finding (issue 10): an empty prepared incoming vTPCM (running,
    libvirt still copying) was enough to move the authority to it."""
    empty = view("MIGRATING_IN", holds_state=False)
    unproven = view("MIGRATING_IN")  # agent older than 1.7, or its reply did not verify
    for state in (M.PREPARED, M.TRANSFERRED, M.IN_DOUBT):
        for dest in (GONE, empty, unproven, view("DESTROYED"),
                     view("MIGRATING_IN", migration_id=str(uuid.uuid4()), holds_state=True),
                     view("MIGRATING_IN", generation=3, holds_state=True)):
            plan = resolve.plan_migration(migration(state), "destination", OUT, dest)
            assert not plan.allowed, (state, dest)
            assert "does not prove that its vTPCM of this migration received" in plan.text
            assert "the only good one" in plan.text
    assert "has received no state" in resolve.plan_migration(
        migration(M.PREPARED), "destination", OUT, empty).text
    # a stopped swtpm holding the state is committed (commit_incoming restarts it)
    assert resolve.plan_migration(migration(M.PREPARED), "destination", OUT,
                                  view("MIGRATING_IN", running=False,
                                       holds_state=True)).allowed
    done = view("ACTIVE", generation=5, migration_id=None)  # committed there already
    assert resolve.plan_migration(migration(M.COMMITTING), "destination", OUT, done).allowed


def test_source_without_its_copy_is_refused_and_a_used_destination_is_warned_of():
    for src in (GONE, view("DESTROYED", migration_id=None), view("ACTIVE", generation=3)):
        plan = resolve.plan_migration(migration(M.IN_DOUBT), "source", src, IN)
        assert not plan.allowed and "nothing to go back to" in plan.text
    plan = resolve.plan_migration(migration(M.IN_DOUBT), "source", OUT, IN)
    assert plan.allowed and "WARNING" in plan.text and "src" in plan.text
    assert "WARNING" not in resolve.plan_migration(migration(M.IN_DOUBT), "source", OUT,
                                                   GONE).text


def host(status: HostStatus) -> HostRecord:
    return HostRecord("gone", b"", b"", b"", b"", None, status, None, NOW, None)


def test_forget_needs_a_revoked_silent_host_without_open_migrations():
    for status in (HostStatus.APPROVED, HostStatus.PENDING):  # PENDING: review finding
        plan = resolve.plan_forget(host(status), [], [], SILENT)
        assert not plan.allowed and "revoke it first" in plan.text
    assert "already forgotten" in resolve.plan_forget(host(HostStatus.FORGOTTEN), [], [],
                                                      SILENT).text
    assert "still answers" in resolve.plan_forget(host(HostStatus.REVOKED), [], [],
                                                  resolve.Answer.VERIFIED).text
    blocked = resolve.plan_forget(host(HostStatus.REVOKED),
                                  [migration(M.IN_DOUBT, dest="gone")], [], SILENT)
    assert not blocked.allowed and "resolve each first" in blocked.text
    lost = VtpcmRecord(INSTANCE, str(uuid.uuid4()), "gone", 2, "ACTIVE", None, NOW)
    settled = [migration(M.SHREDDING, source="gone"), migration(M.DISCARDING, dest="gone"),
               migration(M.ABORTING, dest="gone")]
    plan = resolve.plan_forget(host(HostStatus.REVOKED), settled, [lost], SILENT)
    assert plan.allowed and INSTANCE in plan.text and "lost with it" in plan.text
    assert plan.text.count("goes on without its step on gone") == 3


def test_forget_leaves_a_deadline_abort_to_an_explicit_resolve():
    """Review finding (issue 10): the destination's answer decides ABORTED vs
    IN_DOUBT; forgetting it must not restore the source's older copy."""
    deadline = migration(M.ABORTING, dest="gone", error="deadline passed")
    assert not resolve.step_on_lost_host(deadline, "gone")
    plan = resolve.plan_forget(host(HostStatus.REVOKED), [deadline], [], SILENT)
    assert not plan.allowed and "resolve each first" in plan.text
    assert "deadline abort waits for the destination's answer" in plan.text
    explicit = migration(M.ABORTING, dest="gone", error="aborted by nova")
    assert resolve.plan_forget(host(HostStatus.REVOKED), [explicit], [], SILENT).allowed


def test_forget_plan_says_the_name_stays_a_tombstone():
    text = resolve.plan_forget(host(HostStatus.REVOKED), [], [], SILENT).text
    assert "FORGOTTEN" in text and "enroll under no other" in text
    assert "hosts enroll gone" in text and "wipe it" in text
