"""Live-migrate a lab domain the way Nova does (libvirt peer-to-peer).

Flags are Nova's for a persistent domain: LIVE | PEER2PEER | PERSIST_DEST |
UNDEFINE_SOURCE. The source daemon drives the whole protocol, so a failure
at the destination (e.g. swtpm refusing the TPM blobs) is reported as a
libvirt error and the source domain is resumed by libvirt, not by us.
"""

import dataclasses
import threading
import time

import libvirt
from oslo_log import log as logging

from vtpcm_lab.exception import LabError

LOG = logging.getLogger(__name__)

NOVA_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
              | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


@dataclasses.dataclass(frozen=True)
class MigrationResult:
    """Timing of one finished migration (seconds; downtime None if unknown)."""

    total_s: float
    downtime_s: float | None
    stats: dict[str, int | float | str]


def _completed_stats(dom: libvirt.virDomain) -> dict[str, int | float | str]:
    try:
        stats: dict[str, int | float | str] = dom.jobStats(
            libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError as exc:
        LOG.warning("No completed job stats: %(err)s", {"err": exc})
        return {}
    return stats


def migrate(dom: libvirt.virDomain, dest_conn: libvirt.virConnect, dest_uri: str,
            dest_xml: str, port: int, connect_host: str = "127.0.0.1",
            listen_address: str | None = None, timeout: float = 60.0,
            flags: int = NOVA_FLAGS, bandwidth_mib: int | None = None) -> MigrationResult:
    """Migrate ``dom`` to ``dest_uri``; abort the job if it exceeds ``timeout``.

    The destination QEMU listens on ``listen_address`` (default: the
    ``connect_host``) port ``port``; the source QEMU connects to
    ``connect_host:port`` (a relay may sit in between). ``bandwidth_mib``
    caps the transfer (MiB/s; ``dom.migrateSetMaxSpeed`` lifts it while the
    job runs): the fault cells use it to hold a migration in its copy. Raises
    ``LabError`` on failure or timeout.
    """
    name = dom.name()
    params: dict[str, str] = {
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml,
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://%s:%d" % (connect_host, port),
    }
    if listen_address is not None:
        params[libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = listen_address
    typed: dict[str, str | int] = dict(params)
    if bandwidth_mib is not None:
        typed[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
    errors: list[libvirt.libvirtError] = []

    def _run() -> None:
        try:
            dom.migrateToURI3(dest_uri, typed, flags)
        except libvirt.libvirtError as exc:
            errors.append(exc)

    start = time.monotonic()
    worker = threading.Thread(target=_run, name="migrate-%s" % name, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        LOG.warning("Migration of %(name)s exceeded %(t)ss, aborting",
                    {"name": name, "t": timeout})
        try:
            dom.abortJob()
        except libvirt.libvirtError as exc:
            LOG.warning("abortJob failed: %(err)s", {"err": exc})
        worker.join(30.0)
        raise LabError(reason="migration of %s timed out after %.0fs"
                                 % (name, timeout))
    total = time.monotonic() - start
    if errors:
        raise LabError(reason="migration of %s failed: %s"
                                 % (name, errors[0].get_error_message()))
    stats: dict[str, int | float | str] = {}
    try:
        stats = _completed_stats(dest_conn.lookupByName(name))
    except libvirt.libvirtError as exc:
        LOG.warning("Destination domain lookup failed: %(err)s", {"err": exc})
    downtime = stats.get("downtime")
    downtime_s = float(downtime) / 1000.0 if isinstance(downtime, int | float) else None
    LOG.info("Migrated %(name)s in %(total).3fs, downtime %(down)s",
             {"name": name, "total": total, "down": downtime_s})
    return MigrationResult(total_s=total, downtime_s=downtime_s, stats=stats)
