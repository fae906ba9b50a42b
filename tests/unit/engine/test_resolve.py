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


def migration(state: M, source: str = "src", dest: str = "dst") -> MigrationRecord:
    return MigrationRecord(MID, INSTANCE, source, dest, 4, state.value, NOW, NOW, NOW, None)


def view(state: str, generation: int = 4, migration_id: str | None = MID,
         running: bool = True) -> resolve.View:
    return resolve.View(am.VTPCMInfo(INSTANCE, str(uuid.uuid4()), state, generation,
                                     migration_id, "/run/vtpcm/x.ctrl", running, 42))


GONE = resolve.View(None, "MessagingTimeout")
OUT, IN = view("MIGRATING_OUT", running=False), view("MIGRATING_IN")

# what each state allows with both agents holding their copies
EXPECTED = {
    M.SEALING: (True, False), M.PREPARING: (True, False), M.PREPARED: (True, True),
    M.TRANSFERRING: (True, False), M.TRANSFERRED: (True, True),  # cold migration
    M.COMMITTING: (False, True), M.SHREDDING: (False, True), M.ABORTING: (True, False),
    M.IN_DOUBT: (True, True), M.DISCARDING: (True, False), M.RESTORING: (True, False),
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


def test_destination_without_a_running_incoming_vtpcm_is_refused():
    for dest in (GONE, view("MIGRATING_IN", running=False),
                 view("MIGRATING_IN", migration_id=str(uuid.uuid4())), view("DESTROYED")):
        plan = resolve.plan_migration(migration(M.IN_DOUBT), "destination", OUT, dest)
        assert not plan.allowed
        assert "would shred the source's copy, the only good one" in plan.text
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
    assert "revoke it first" in resolve.plan_forget(host(HostStatus.APPROVED), [], [],
                                                    False).text
    assert "still answers" in resolve.plan_forget(host(HostStatus.REVOKED), [], [],
                                                  True).text
    blocked = resolve.plan_forget(host(HostStatus.REVOKED),
                                  [migration(M.IN_DOUBT, dest="gone")], [], False)
    assert not blocked.allowed and "resolve each first" in blocked.text
    lost = VtpcmRecord(INSTANCE, str(uuid.uuid4()), "gone", 2, "ACTIVE", None, NOW)
    settled = [migration(M.SHREDDING, source="gone"), migration(M.DISCARDING, dest="gone"),
               migration(M.ABORTING, dest="gone")]
    plan = resolve.plan_forget(host(HostStatus.REVOKED), settled, [lost], False)
    assert plan.allowed and INSTANCE in plan.text and "lost with it" in plan.text
    assert plan.text.count("goes on without its step on gone") == 3
