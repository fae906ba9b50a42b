"""A vTPCM through an instance's life on one compute host: create and start
it before the guest's XML is made, destroy it when the instance is deleted.

Plain functions over the engine (host-signed) and agent (read-only) clients,
so the Nova driver and the lab run the same code; nothing here imports Nova.
The engine remains the authority: it refuses a host that does not hold the
vTPCM, so these functions only decide when to ask.
"""

from collections.abc import Sequence
from typing import Protocol

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.engine import messages as em
from vtpcm_nova.virt import tpmxml

LOG = logging.getLogger(__name__)

class Engine(Protocol):
    def get_vtpcm(self, instance_uuid: str) -> em.VtpcmRecord: ...
    def create_vtpcm(self, instance_uuid: str, host: str) -> em.VtpcmRecord: ...
    def start_vtpcm(self, instance_uuid: str) -> em.VtpcmStatus: ...
    def destroy_vtpcm(self, instance_uuid: str) -> em.Empty: ...
    def replace_vtpcm(self, instance_uuid: str, host: str) -> em.VtpcmRecord: ...
    def shelve_vtpcm(self, instance_uuid: str) -> em.VtpcmRecord: ...
    def unshelve_vtpcm(self, instance_uuid: str, host: str) -> em.VtpcmRecord: ...
    def abort(self, migration_id: str, reason: str, instance_uuid: str | None = None,
              timeout: float | None = None) -> em.MigrationInfo: ...


class AgentReader(Protocol):
    def get(self, host: str, instance_uuid: str) -> am.VTPCMInfo: ...


def _record(engine: Engine, instance_uuid: str) -> em.VtpcmRecord | None:
    try:
        return engine.get_vtpcm(instance_uuid)
    except exception.NotFound:
        return None


def ensure_running(engine: Engine, agents: AgentReader, instance_uuid: str,
                   host: str, socket_dirs: Sequence[str]) -> str:
    """Create the instance's vTPCM on ``host`` if it has none, start it, and
    return the control socket QEMU must connect to.

    Called wherever Nova (re)builds the guest's XML: spawn, hard reboot,
    power on, host restart, unshelve. An existing vTPCM is reused, never
    replaced: the guest's TPM belongs to the instance. A vTPCM held by
    another host (or one in a migration) is refused by name, so a guest
    never boots next to a second copy."""
    rec = _record(engine, instance_uuid)
    if rec is None:
        rec = engine.create_vtpcm(instance_uuid, host)
        LOG.info("Created vTPCM %(vtpcm)s for instance %(instance)s on %(host)s",
                 {"vtpcm": rec.vtpcm_id, "instance": instance_uuid, "host": host})
    if rec.host != host:
        raise exception.VTPCMNotHere(instance_uuid=instance_uuid, holder=rec.host, host=host,
                                     reason="the guest can only run where its vTPCM is")
    if rec.migration_id is not None:
        raise exception.VTPCMBusy(instance_uuid=instance_uuid,
                                  reason="migration %s holds it" % rec.migration_id)
    engine.start_vtpcm(instance_uuid)
    info = agents.get(host, instance_uuid)
    if not info.running:
        raise exception.SwtpmError(vtpcm_id=info.vtpcm_id,
                                   reason="the agent reports it stopped right after start")
    return tpmxml.checked_socket_path(info.ctrl_socket, instance_uuid, socket_dirs)


def fresh_after_evacuation(engine: Engine, agents: AgentReader, instance_uuid: str,
                           host: str, socket_dirs: Sequence[str]) -> str:
    """Evacuation onto ``host`` with a fresh vTPCM, when the operator chose
    state loss over a server stuck on a failed host: the engine abandons the
    failed host's vTPCM (only while that host's agent does not answer) and
    creates a new one here; then as ``ensure_running``."""
    rec = engine.replace_vtpcm(instance_uuid, host)
    LOG.warning("Instance %(instance)s evacuated to %(host)s with a fresh vTPCM "
                "%(vtpcm)s: its previous TPM state is lost",
                {"instance": instance_uuid, "host": host, "vtpcm": rec.vtpcm_id})
    return ensure_running(engine, agents, instance_uuid, host, socket_dirs)


def shelve_if_held(engine: Engine, instance_uuid: str, host: str) -> bool:
    """Shelve offload on the holder: stop the vTPCM and record that an
    unshelve may move it (the holder's consent, while it holds it). True if
    this host held it."""
    rec = _record(engine, instance_uuid)
    if rec is None or rec.host != host:
        return False
    engine.shelve_vtpcm(instance_uuid)
    LOG.info("Shelved the vTPCM of instance %(instance)s on %(host)s",
             {"instance": instance_uuid, "host": host})
    return True


def unshelve_here(engine: Engine, instance_uuid: str, host: str) -> None:
    """Unshelve onto ``host``: the engine makes the shelved vTPCM live here,
    moving it from its holder (sealed to this host's TPM after a fresh
    TRUSTED verdict) if it is kept elsewhere. An instance without a vTPCM
    record gets one later, as at spawn."""
    if _record(engine, instance_uuid) is None:
        return
    rec = engine.unshelve_vtpcm(instance_uuid, host)
    LOG.info("Unshelved the vTPCM of instance %(instance)s on %(host)s (generation "
             "%(gen)d)", {"instance": instance_uuid, "host": host, "gen": rec.generation})


def destroy_if_held(engine: Engine, instance_uuid: str, host: str) -> bool:
    """Crypto-shred the instance's vTPCM when the instance is deleted here.

    Only the holder destroys: after a live migration, a revert or an
    evacuation Nova also calls destroy on the host the guest left, where the
    vTPCM no longer lives (the engine would refuse; we do not even ask).
    True if this call destroyed it; already gone is not an error, so a
    retried delete, or one of a VM that never started, is safe."""
    rec = _record(engine, instance_uuid)
    if rec is None:
        LOG.debug("Instance %(instance)s has no vTPCM record: nothing to destroy",
                  {"instance": instance_uuid})
        return False
    if rec.host != host:
        LOG.info("vTPCM of instance %(instance)s lives on %(holder)s: not destroyed "
                 "from %(host)s", {"instance": instance_uuid, "holder": rec.host,
                                   "host": host})
        return False
    if rec.migration_id is not None:
        # deleted while migrating: the guest is going away on both hosts
        engine.abort(rec.migration_id, "instance %s deleted" % instance_uuid)
    try:
        engine.destroy_vtpcm(instance_uuid)
    except exception.NotFound:
        return False
    LOG.info("Destroyed (crypto-shredded) the vTPCM of instance %(instance)s on %(host)s",
             {"instance": instance_uuid, "host": host})
    return True
