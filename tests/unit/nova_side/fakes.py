"""An in-memory engine and agent for the driver's plain functions (unit tests only)."""

from typing import Any

from vtpcm_common import exception
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.engine import messages as em

VTPCM_ID = "00000000-0000-0000-0000-0000000000aa"


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.vtpcms: dict[str, em.VtpcmRecord] = {}
        self.migrations: dict[str, em.MigrationInfo] = {}
        self.fail: dict[str, list[exception.VTPCMException]] = {}
        self.commit_answer = "COMMITTED"
        self.shred_later: bool | None = None
        self.abort_instances: list[str | None] = []  # instance_uuid of each abort
        self.abort_timeouts: list[float | None] = []

    def _maybe_fail(self, method: str) -> None:
        errors = self.fail.get(method)
        if errors:
            raise errors.pop(0)

    def get_vtpcm(self, instance_uuid: str) -> em.VtpcmRecord:
        self.calls.append(("get_vtpcm", instance_uuid))
        try:
            return self.vtpcms[instance_uuid]
        except KeyError:
            raise exception.NotFound(what="vTPCM of instance", key=instance_uuid) from None

    def create_vtpcm(self, instance_uuid: str, host: str) -> em.VtpcmRecord:
        self.calls.append(("create_vtpcm", instance_uuid, host))
        self._maybe_fail("create_vtpcm")
        rec = em.VtpcmRecord(instance_uuid, VTPCM_ID, host, 0, "STOPPED", None)
        self.vtpcms[instance_uuid] = rec
        return rec

    def start_vtpcm(self, instance_uuid: str) -> Any:
        self.calls.append(("start_vtpcm", instance_uuid))
        self._maybe_fail("start_vtpcm")
        return None

    def destroy_vtpcm(self, instance_uuid: str) -> em.Empty:
        self.calls.append(("destroy_vtpcm", instance_uuid))
        self._maybe_fail("destroy_vtpcm")
        self.vtpcms.pop(instance_uuid)
        return em.Empty()

    def check_destination(self, instance_uuid: str, dest: str) -> em.Verdict:
        self.calls.append(("check_destination", instance_uuid, dest))
        self._maybe_fail("check_destination")
        return em.Verdict(dest, "TRUSTED", "ok", None, None)

    def _mig(self, migration_id: str, state: str) -> em.MigrationInfo:
        info = em.MigrationInfo(migration_id, "00000000-0000-0000-0000-000000000001",
                                "src", "dst", 0, state, None)
        self.migrations[migration_id] = info
        return info

    def begin(self, migration_id: str, instance_uuid: str, source: str,
              dest: str) -> em.MigrationInfo:
        self.calls.append(("begin", migration_id))
        self._maybe_fail("begin")
        return self._mig(migration_id, "PREPARED")

    def transfer_state(self, migration_id: str) -> em.MigrationInfo:
        self.calls.append(("transfer_state", migration_id))
        self._maybe_fail("transfer_state")
        return self._mig(migration_id, "TRANSFERRED")

    def start_incoming(self, migration_id: str) -> em.VtpcmStatus:
        self.calls.append(("start_incoming", migration_id))
        self._maybe_fail("start_incoming")
        mig = self.migrations[migration_id]
        return em.VtpcmStatus(mig.instance_uuid, VTPCM_ID, mig.dest, mig.generation,
                              "MIGRATING_IN", True, "/run/vtpcm/%s.ctrl" % mig.instance_uuid)

    def commit(self, migration_id: str, shred_later: bool = False) -> em.MigrationInfo:
        self.calls.append(("commit", migration_id))
        self.shred_later = shred_later
        self._maybe_fail("commit")
        return self._mig(migration_id, self.commit_answer)

    def abort(self, migration_id: str, reason: str, instance_uuid: str | None = None,
              timeout: float | None = None) -> em.MigrationInfo:
        self.calls.append(("abort", migration_id))
        self.abort_instances.append(instance_uuid)
        self.abort_timeouts.append(timeout)
        self._maybe_fail("abort")
        if migration_id not in self.migrations and instance_uuid is None:
            raise exception.NotFound(what="migration", key=migration_id)
        return self._mig(migration_id, "ABORTED")  # or the engine's tombstone

    def get_migration(self, migration_id: str) -> em.MigrationInfo:
        self.calls.append(("get_migration", migration_id))
        self._maybe_fail("get_migration")
        try:
            return self.migrations[migration_id]
        except KeyError:
            raise exception.NotFound(what="migration", key=migration_id) from None

    def methods(self) -> list[str]:
        return [c[0] for c in self.calls]


class FakeAgents:
    def __init__(self, state: str = "ACTIVE", running: bool = True,
                 socket_dir: str = "/run/vtpcm", migration_id: str | None = None) -> None:
        self.state = state
        self.running = running
        self.socket_dir = socket_dir
        self.migration_id = migration_id

    def get(self, host: str, instance_uuid: str) -> am.VTPCMInfo:
        return am.VTPCMInfo(instance_uuid, VTPCM_ID, self.state, 0, self.migration_id,
                            "%s/%s.ctrl" % (self.socket_dir, instance_uuid), self.running,
                            4242 if self.running else None)
