"""What Nova's answer about an instance allows for its SHELVED vTPCM (pure).

A host's signature on ``unshelve_vtpcm`` proves only that the host asks. Nova
decides where a shelved offloaded instance goes, so the engine moves a
SHELVED vTPCM only to the host Nova itself is unshelving the instance onto,
and destroys one only once Nova has said several times in a row that the
instance is gone. No I/O here: ``novaapi`` asks, the coordinator acts.
"""

import dataclasses
import enum

# Nova's task states while it unshelves an offloaded instance: the conductor
# sets UNSHELVING; nova-compute sets SPAWNING before its claim puts the
# target host in the instance record and calls the driver's spawn.
UNSHELVE_TASK_STATES = frozenset({"unshelving", "spawning"})
SHELVED_OFFLOADED = "shelved_offloaded"
DELETED_VM_STATES = frozenset({"deleted"})


@dataclasses.dataclass(frozen=True)
class ServerView:
    """The fields of ``GET /servers/{id}`` (admin view) the engine uses."""

    host: str | None
    vm_state: str | None
    task_state: str | None


class Presence(enum.Enum):
    GONE = "gone"        # 404, or Nova shows it deleted
    PRESENT = "present"  # Nova has the instance
    UNKNOWN = "unknown"  # no usable answer (timeout, 5xx, unexpected reply)


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


def presence(view: ServerView | None) -> Presence:
    """GONE for a 404 (``None``) or a deleted vm_state, else PRESENT."""
    if view is None or view.vm_state in DELETED_VM_STATES:
        return Presence.GONE
    return Presence.PRESENT


@dataclasses.dataclass(frozen=True)
class Observed:
    """One SHELVED record as the reaper saw it: a later sighting counts only
    for the same vTPCM at the same generation."""

    vtpcm_id: str
    generation: int


class DeletionConfirmations:
    """Counts consecutive GONE answers per SHELVED vTPCM.

    Only ``needed`` GONE answers in a row, for the same vTPCM and generation,
    allow a destroy: any PRESENT or UNKNOWN answer (a timeout, a 5xx, a
    restart of this worker, which forgets the counts) starts over, so a
    transient API error never destroys anything."""

    def __init__(self, needed: int) -> None:
        if needed < 2:
            raise ValueError("a destroy needs at least two consecutive answers")
        self.needed = needed
        self._seen: dict[str, tuple[Observed, int]] = {}

    def observe(self, instance_uuid: str, record: Observed, answer: Presence) -> bool:
        """Record Nova's answer; True once the vTPCM may be destroyed."""
        if answer is not Presence.GONE:
            self._seen.pop(instance_uuid, None)
            return False
        before, count = self._seen.get(instance_uuid, (record, 0))
        count = count + 1 if before == record else 1
        self._seen[instance_uuid] = (record, count)
        return count >= self.needed

    def count(self, instance_uuid: str) -> int:
        """Consecutive GONE answers recorded for the instance."""
        return self._seen.get(instance_uuid, (None, 0))[1]

    def forget_others(self, shelved: set[str]) -> None:
        """Drop counts of instances no longer SHELVED."""
        for instance_uuid in set(self._seen) - shelved:
            del self._seen[instance_uuid]

    def forget(self, instance_uuid: str) -> None:
        self._seen.pop(instance_uuid, None)
