"""The vTPCM's part of a cold migration or resize to another host, for the
Nova driver's hooks.

migrate (source, guest off): begin (seal to the attested destination, prepare
its incoming vTPCM) -> transfer (the engine carries the blobs, encrypted by
swtpm under the migration key, from the source's agent into the incoming
vTPCM, once) -> finish (destination): the guest runs on the incoming vTPCM
while the resize waits -> confirm (source): commit, the destination's copy is
the live one at generation + 1 and the source's is shredded; or revert
(source): abort, the destination's copy is destroyed and the source's is
live again, unchanged. The commit point is the confirm, not the finish, so a
revert always finds the source's vTPCM as it was when the guest stopped.

Plain functions over the host-signed engine client and the agents' read-only
client; nothing here imports Nova.
"""

from collections.abc import Sequence
from typing import Protocol

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em
from vtpcm_nova.virt import lifecycle, livemigration, tpmxml

LOG = logging.getLogger(__name__)

TRANSFERRED = "TRANSFERRED"
# A migration whose destination holds the state and may run the guest: the
# transfer went through, or a deadline found the state there (IN_DOUBT).
GUEST_MAY_RUN = frozenset({TRANSFERRED, "IN_DOUBT"})


class Engine(livemigration.Engine, lifecycle.Engine, Protocol):
    def transfer_state(self, migration_id: str) -> em.MigrationInfo: ...
    def start_incoming(self, migration_id: str) -> em.VtpcmStatus: ...


def move(engine: Engine, migration_id: str, instance_uuid: str, source: str,
         dest: str) -> em.MigrationInfo:
    """Move a stopped guest's vTPCM state to the prepared ``dest``.

    Runs on the source once the guest is off (nothing writes the state any
    more). Any refusal or failure is aborted before it is raised, so the
    source's vTPCM is the live one again and the guest can restart there."""
    livemigration.begin(engine, migration_id, instance_uuid, source, dest)
    try:
        info = engine.transfer_state(migration_id)
    except exception.VTPCMException as err:
        _abort_quietly(engine, migration_id, "transfer failed: %s" % err)
        raise
    if info.state != TRANSFERRED:
        _abort_quietly(engine, migration_id, "transfer answered %s" % info.state)
        raise exception.MigrationError(
            migration_id=migration_id,
            reason="transfer answered %s, not %s" % (info.state, TRANSFERRED))
    LOG.info("Moved the vTPCM state of instance %(i)s to %(dest)s (migration %(mig)s); "
             "it becomes the live copy at confirm", {"i": instance_uuid, "dest": dest,
                                                     "mig": migration_id})
    return info


def guest_socket(engine: Engine, agents: lifecycle.AgentReader, instance_uuid: str,
                 host: str, socket_dirs: Sequence[str]) -> str:
    """The control socket for the guest's XML on ``host``.

    The destination of a cold migration or resize not yet confirmed gives
    its guest the incoming vTPCM (the engine's record still names the
    source, which keeps its copy for a revert). Everywhere else the vTPCM
    held here, created and started if need be (``lifecycle.ensure_running``)."""
    incoming = _incoming_migration(engine, instance_uuid, host)
    if incoming is None:
        return lifecycle.ensure_running(engine, agents, instance_uuid, host, socket_dirs)
    info = agents.get(host, instance_uuid)
    if (info.state, info.migration_id) != ("MIGRATING_IN", incoming.migration_id):
        raise exception.MigrationError(
            migration_id=incoming.migration_id,
            reason="the incoming vTPCM of instance %s on %s is %s, not this migration's "
                   "incoming vTPCM" % (instance_uuid, host, info.state))
    if info.running:
        return tpmxml.checked_socket_path(info.ctrl_socket, instance_uuid, socket_dirs)
    # its swtpm stopped with the guest (QEMU's CMD_SHUTDOWN): the engine has
    # the agent start it again, with the state it received
    started = engine.start_incoming(incoming.migration_id)
    LOG.info("Started the incoming vTPCM of instance %(i)s again on %(h)s (migration "
             "%(mig)s, not yet confirmed)", {"i": instance_uuid, "h": host,
                                             "mig": incoming.migration_id})
    return tpmxml.checked_socket_path(started.ctrl_socket, instance_uuid, socket_dirs)


def _incoming_migration(engine: Engine, instance_uuid: str,
                        host: str) -> em.MigrationInfo | None:
    """The migration that moved the instance's state to ``host`` and waits
    for confirm or revert; None when there is none."""
    try:
        rec = engine.get_vtpcm(instance_uuid)
    except exception.NotFound:
        return None
    if rec.migration_id is None or rec.host == host:
        return None
    mig = engine.get_migration(rec.migration_id)
    if mig.dest != host or mig.state not in GUEST_MAY_RUN:
        return None
    return mig


def confirm(engine: Engine, migration_id: str) -> em.MigrationInfo:
    """Resize confirmed (source): the destination's copy becomes the live
    one, generation + 1, and the source's is crypto-shredded. Retried like
    the live commit; a confirm long after the migration's deadline still
    commits (the deadline left the migration IN_DOUBT)."""
    return livemigration.commit(engine, migration_id)


def revert(engine: Engine, migration_id: str, reason: str) -> em.MigrationInfo | None:
    """Resize reverted (source): the destination's copy is destroyed, the
    source's is live again exactly as the guest left it."""
    return livemigration.abort(engine, migration_id, reason)


def _abort_quietly(engine: Engine, migration_id: str, reason: str) -> None:
    """Best effort: the caller raises the original error; reconcile (the
    deadline) finishes an abort that did not get through."""
    try:
        livemigration.abort(engine, migration_id, reason)
    except exception.VTPCMException as err:
        LOG.warning("Migration %(mig)s: abort after a failed transfer failed too: %(err)s",
                    {"mig": migration_id, "err": err})
