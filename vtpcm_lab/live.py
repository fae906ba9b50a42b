"""Boot a lab guest with a vTPCM and live-migrate it with the protocol.

The vTPCM steps are the Nova driver's own functions
(``vtpcm_nova.virt.livemigration``: check in check_can_live_migrate_destination,
begin in live_migration, commit in post_live_migration, settle/abort on
rollback), driven here straight through libvirt-python so the lab needs no
Nova: the lab and the driver run one code path.
"""

import dataclasses
import socket
import time
import uuid
from collections.abc import Callable

import libvirt
from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_lab import console, domain, migrate
from vtpcm_lab.exception import LabError
from vtpcm_lab.hosts import Lab, LabHost
from vtpcm_lab.stack import Stack, StackHost
from vtpcm_nova.virt import lifecycle, livemigration

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LiveMigration:
    migration_id: str
    instance_uuid: str
    source: str
    dest: str
    verdict: str
    check_s: float
    begin_s: float
    commit_s: float
    libvirt: migrate.MigrationResult
    total_s: float

    @property
    def protocol_s(self) -> float:
        """What the vTPCM protocol adds around libvirt's migration."""
        return self.check_s + self.begin_s + self.commit_s


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _running_on(conn: libvirt.virConnect, name: str) -> bool:
    try:
        return bool(conn.lookupByName(name).isActive())
    except libvirt.libvirtError:
        return False


def boot_guest(stack: Stack, host: StackHost, name: str,
               instance_uuid: str | None = None, *,
               memory_mib: int = 256) -> tuple[str, console.GuestConsole]:
    """Create and start the vTPCM with the Nova driver's own function
    (``lifecycle.ensure_running``, engine calls signed with ``host``'s command
    key), define and boot the VM on the socket it returns (``memory_mib``:
    less lets several guests migrate at once on the lab machine)."""
    image = stack.lab.image
    if image is None:
        raise LabError(reason="lab is not up")
    instance = instance_uuid or str(uuid.uuid4())
    socket_path = lifecycle.ensure_running(stack.engine_at(host), stack.agents_at(host),
                                           instance, host.name, stack.socket_dirs)
    xml = domain.render_domain_xml(name, image, socket_path,
                                   host.lab_host.serial_path(name), domain_uuid=instance,
                                   memory_mib=memory_mib)
    conn = host.lab_host.connect()
    try:
        conn.defineXML(xml).create()
    finally:
        conn.close()
    con = console.GuestConsole(host.lab_host.serial_path(name))
    con.wait_ready(timeout=120.0)
    return instance, con


def live_migrate(stack: Stack, name: str, src: StackHost, dst: StackHost, *,
                 port: int | None = None, connect_host: str = "127.0.0.1",
                 listen_address: str | None = None,
                 timeout: float = 120.0, bandwidth_mib: int | None = None) -> LiveMigration:
    """Attest dst, begin, migrate, then commit, or abort on any failure
    (``bandwidth_mib``: cap libvirt's transfer, ``migrate.migrate``)."""
    start = time.monotonic()
    conn_src = src.lab_host.connect()
    conn_dst = dst.lab_host.connect()
    try:
        dom = conn_src.lookupByName(name)
        instance = dom.UUIDString()
        # As the Nova driver: the destination pre-check runs on the destination;
        # begin (in live_migration, before libvirt starts), commit (in
        # post_live_migration) and the rollback run on the source, whose
        # consent moving the vTPCM needs (the engine refuses them from dst).
        at_dst, at_src = stack.engine_at(dst), stack.engine_at(src)
        verdict = livemigration.check_destination(at_dst, instance, dst.name)
        checked = time.monotonic()
        migration_id = str(uuid.uuid4())
        livemigration.begin(at_src, migration_id, instance, src.name, dst.name)
        begun = time.monotonic()
        try:
            dest_xml = domain.render_destination_xml(
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
                livemigration.destination_socket(stack.agents_at(src), dst.name,
                                                 instance, stack.socket_dirs),
                dst.lab_host.serial_path(name))
            result = migrate.migrate(dom, conn_dst, dst.lab_host.uri, dest_xml,
                                     port or free_port(), connect_host=connect_host,
                                     listen_address=listen_address, timeout=timeout,
                                     bandwidth_mib=bandwidth_mib)
        except (exception.VTPCMException, libvirt.libvirtError) as err:
            livemigration.settle(at_src, migration_id,
                                 running_on_dest=_running_on(conn_dst, name),
                                 reason=str(err)[:900], instance_uuid=instance)
            raise
        migrated = time.monotonic()
        livemigration.commit(at_src, migration_id)
        done = time.monotonic()
        # untimed: the source's shred runs after the commit's answer (engine
        # API 1.11); the lab's checks look at the source right after a hop
        wait_committed(at_src, migration_id)
    finally:
        conn_src.close()
        conn_dst.close()
    return LiveMigration(
        migration_id=migration_id, instance_uuid=instance, source=src.name, dest=dst.name,
        verdict=verdict.status, check_s=checked - start, begin_s=begun - checked,
        commit_s=done - migrated, libvirt=result, total_s=done - start)


def wait_committed(engine: livemigration.Engine, migration_id: str,
                   timeout: float = 60.0) -> None:
    """Until the engine shows the migration COMMITTED (bounded): the driver's
    commit answers SHREDDING before the source's shred (engine API 1.11)."""
    deadline = time.monotonic() + timeout
    while engine.get_migration(migration_id).state != "COMMITTED":
        if time.monotonic() > deadline:
            raise exception.MigrationError(
                migration_id=migration_id,
                reason="not COMMITTED %d s after its commit's answer" % timeout)
        time.sleep(0.01)


# libvirt's reasons for a shut-off domain, worded for a guest that has just
# been migrated (the lab's domains destroy themselves on poweroff, reboot and
# crash, and the kernel reboots at once on a panic: panic=-1)
_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "the guest powered off or reset itself "
                                         "(a kernel panic resets it)",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "the guest crashed",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed by a libvirt client",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "QEMU failed",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated away",
    libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "libvirtd stopped it",
}


def guest_fate(conn: libvirt.virConnect, name: str) -> str:
    """What libvirt says of domain ``name`` on ``conn``, for an error message."""
    try:
        state, reason = conn.lookupByName(name).state()
    except libvirt.libvirtError:
        return "no such domain there"
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return "shut off: %s" % _SHUTOFF_REASONS.get(reason, "reason %d" % reason)
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return "running, yet its console does not answer (a hung guest)"
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return "paused (reason %d)" % reason
    return "state %d, reason %d" % (state, reason)


def wait_migrated_guest(host: LabHost, name: str, timeout: float = 60.0,
                        connect_timeout: float = 10.0) -> float:
    """Ping the guest ``name`` on ``host``, where it was just migrated to, until
    it answers; return the seconds waited.

    A migrated guest that does not answer is not a console problem: QEMU
    removes the serial socket when the guest dies, and a hung guest keeps it
    but stays silent. The error says which, from libvirt on that host, and
    names the QEMU log.
    """
    try:
        with console.GuestConsole(host.serial_path(name), connect_timeout) as con:
            return con.wait_ready(timeout=timeout)
    except LabError as exc:
        conn = host.connect()
        try:
            fate = guest_fate(conn, name)
        finally:
            conn.close()
        raise LabError(reason="guest %s did not come back on %s after its migration: %s "
                              "(console: %s; QEMU log %s)"
                              % (name, host.name, fate, exc.kwargs.get("reason", exc),
                                 host.qemu_log(name))) from exc


def destroy_guests(lab: Lab, match: Callable[[str], bool]) -> None:
    """Destroy and undefine every lab guest whose name ``match``es, on both hosts."""
    for host in lab.hosts:
        try:
            conn = host.connect()
        except libvirt.libvirtError:
            continue  # host daemon not running: nothing to clean there
        try:
            for dom in conn.listAllDomains():
                if not match(dom.name()):
                    continue
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
        finally:
            conn.close()
