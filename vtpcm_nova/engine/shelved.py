"""What Nova's answers about an instance allow for its vTPCM (pure).

A host's signature on ``unshelve_vtpcm`` proves only that the host asks. Nova
decides where a shelved offloaded instance goes, so the engine moves a
SHELVED vTPCM only to the host Nova itself is unshelving the instance onto.
The reaper destroys a vTPCM whose instance Nova deleted without its driver
only on positive evidence: Nova's admin listing showing the instance
deleted, several times in a row over a minimum time. A 404 is never
evidence (a non-admin credential gets one for every other project's
server). No I/O here: ``novaapi`` asks, the coordinator acts.
"""

import dataclasses
import datetime
import enum

# Nova's task states while it unshelves an offloaded instance: the conductor
# sets UNSHELVING; nova-compute sets SPAWNING before its claim puts the
# target host in the instance record and calls the driver's spawn.
UNSHELVE_TASK_STATES = frozenset({"unshelving", "spawning"})
SHELVED_OFFLOADED = "shelved_offloaded"


@dataclasses.dataclass(frozen=True)
class ServerView:
    """The fields of ``GET /servers/{id}`` (admin view) the engine uses."""

    host: str | None
    vm_state: str | None
    task_state: str | None
    project_id: str | None = None  # tenant_id: whose server it is


class Deletion(enum.Enum):
    """Nova's admin listing of deleted servers, filtered on one uuid."""

    DELETED = "deleted"                      # listed, admin view, vm_state deleted
    NOT_SHOWN_DELETED = "not shown deleted"  # not listed as deleted
    NOT_ADMIN = "not admin"                  # 403, or no admin attributes


class Presence(enum.Enum):
    GONE = "gone"        # Nova's admin listing shows it deleted
    PRESENT = "present"  # Nova does not show it deleted
    UNKNOWN = "unknown"  # no usable answer (timeout, 5xx, not admin, not Nova)


def unshelve_refusal(view: ServerView | None, host: str) -> str:
    """Why Nova's view does not show ``host`` unshelving the instance ("" if
    it does): vm_state shelved_offloaded, task_state unshelving or spawning,
    and ``OS-EXT-SRV-ATTR:host`` equal to ``host``."""
    if view is None:
        return "Nova has no such instance"
    if view.vm_state != SHELVED_OFFLOADED:
        return "Nova shows the instance %s, not shelved_offloaded" % (view.vm_state,)
    if view.task_state not in UNSHELVE_TASK_STATES:
        return "Nova is not unshelving the instance (task_state %s)" % (view.task_state,)
    if view.host != host:
        return "Nova is unshelving the instance onto %s, not onto %s" % (view.host, host)
    return ""


def presence(answer: Deletion) -> Presence:
    """GONE only on Nova's positive word (never on a 404)."""
    if answer is Deletion.DELETED:
        return Presence.GONE
    if answer is Deletion.NOT_ADMIN:
        return Presence.UNKNOWN
    return Presence.PRESENT


@dataclasses.dataclass(frozen=True)
class Observed:
    """One SHELVED record as the reaper saw it: a later sighting counts only
    for the same vTPCM at the same generation."""

    vtpcm_id: str
    generation: int


class DeletionConfirmations:
    """Counts consecutive GONE answers per vTPCM, and the time they span.

    Only ``needed`` GONE answers in a row, for the same vTPCM and generation,
    spanning at least ``min_span`` since the first, allow a destroy: any
    PRESENT or UNKNOWN answer (a timeout, a 5xx, a restart of this worker,
    which forgets the counts) starts over, so a transient API error never
    destroys anything, and two passes that overlap count as one moment."""

    def __init__(self, needed: int,
                 min_span: datetime.timedelta = datetime.timedelta(0)) -> None:
        if needed < 2:
            raise ValueError("a destroy needs at least two consecutive answers")
        self.needed = needed
        self.min_span = min_span
        self._seen: dict[str, tuple[Observed, int, datetime.datetime]] = {}

    def observe(self, instance_uuid: str, record: Observed, answer: Presence,
                now: datetime.datetime) -> bool:
        """Record Nova's answer at ``now``; True once the vTPCM may be destroyed."""
        if answer is not Presence.GONE:
            self._seen.pop(instance_uuid, None)
            return False
        before, count, first = self._seen.get(instance_uuid, (record, 0, now))
        if before != record:
            count, first = 0, now
        count += 1
        self._seen[instance_uuid] = (record, count, first)
        return count >= self.needed and now - first >= self.min_span

    def count(self, instance_uuid: str) -> int:
        """Consecutive GONE answers recorded for the instance."""
        seen = self._seen.get(instance_uuid)
        return seen[1] if seen is not None else 0

    def forget_others(self, candidates: set[str]) -> None:
        """Drop counts of instances no longer candidates for a reap."""
        for instance_uuid in set(self._seen) - candidates:
            del self._seen[instance_uuid]

    def forget(self, instance_uuid: str) -> None:
        self._seen.pop(instance_uuid, None)
