"""What an operator does with servers on the real-Nova lab, and what it shows.

The actions go through the unmodified ``openstack`` CLI (create, live and
cold migration, resize and its confirm, shelve, unshelve, delete: they need
no identity v3); waiting and reading go through
the REST API. The guest's TPM is read over its serial console as in the
plain lab.
"""

import dataclasses
import json
import time
from typing import Any

import libvirt

from vtpcm_lab.exception import LabError
from vtpcm_lab.nova import ptyconsole, rest
from vtpcm_lab.nova.cloud import IMAGE, NovaLab

BOOT_TIMEOUT = 300.0
MIGRATION_TIMEOUT = 300.0


@dataclasses.dataclass(frozen=True)
class Migration:
    server: dict[str, Any]
    status: str          # Nova's migration record (completed, error, ...), or "refused"
    seconds: float       # the CLI call until the server left MIGRATING
    refusal: str = ""    # the API's answer when it refused the call itself

    @property
    def host(self) -> str:
        return host_of(self.server)


def host_of(server: dict[str, Any]) -> str:
    return str(server["OS-EXT-SRV-ATTR:host"])


def show(lab: NovaLab, server_id: str) -> dict[str, Any]:
    return dict(lab.compute_api().get("/servers/" + server_id)["server"])


def create(lab: NovaLab, name: str, flavor: str) -> dict[str, Any]:
    """``openstack server create --nic none --wait``; the server, ACTIVE, or a LabError
    with its fault."""
    out = lab.openstack("server", "create", "--flavor", flavor, "--image", IMAGE, "--nic",
                        "none", "-f", "json", "-c", "id", name, timeout=60)
    server_id = json.loads(out)["id"]
    server: dict[str, Any] = rest.poll(
        "server %s ACTIVE" % name, lambda: show(lab, server_id),
        lambda s: s["status"] == "ACTIVE", BOOT_TIMEOUT, fail=_fault)
    return server


def live_migrate(lab: NovaLab, server_id: str, host: str | None = None) -> Migration:
    """``openstack server migrate --live-migration [--host H]``, then wait until the
    server is out of MIGRATING and Nova's migration record is final."""
    started = time.monotonic()
    refused = start_live_migration(lab, server_id, host)
    if refused:
        return Migration(server=show(lab, server_id), status="refused",
                         seconds=time.monotonic() - started, refusal=refused)
    return wait_migration(lab, server_id, started)


def start_live_migration(lab: NovaLab, server_id: str, host: str | None = None) -> str:
    """Start it (the CLI returns once Nova accepted it); the API's refusal, or ""."""
    args = ["server", "migrate", "--live-migration"]
    if host:
        args += ["--host", host]
    try:
        lab.openstack(*args, server_id, timeout=60)
    except LabError as err:
        if "400" not in str(err):
            raise
        return str(err)  # refused before any migration started (e.g. "No valid host")
    return ""


def wait_migration(lab: NovaLab, server_id: str, started: float) -> Migration:
    server = rest.poll("live migration of %s" % server_id, lambda: show(lab, server_id),
                       lambda s: s["status"] != "MIGRATING"
                       and s.get("OS-EXT-STS:task_state") is None, MIGRATION_TIMEOUT, 0.3)
    seconds = time.monotonic() - started
    record = rest.poll("migration record of %s" % server_id,
                       lambda: last_migration(lab, server_id),
                       lambda m: m is not None and m["status"] in (
                           "completed", "error", "failed", "cancelled"), 60, 0.5)
    return Migration(server=server, status=record["status"], seconds=seconds)


def _fault(server: dict[str, Any]) -> str | None:
    if server["status"] != "ERROR":
        return None
    return "ERROR: %s" % (server.get("fault") or {}).get("message")


def resize(lab: NovaLab, server_id: str, flavor: str | None = None) -> Migration:
    """``openstack server migrate`` (a cold migration, ``flavor`` None) or
    ``openstack server resize --flavor``, until the server waits in
    VERIFY_RESIZE on its new host (or fails)."""
    started = time.monotonic()
    args = ["server", "resize", "--flavor", flavor] if flavor else ["server", "migrate"]
    lab.openstack(*args, server_id, timeout=60)
    server = rest.poll("resize of %s" % server_id, lambda: show(lab, server_id),
                       lambda s: s["status"] == "VERIFY_RESIZE", MIGRATION_TIMEOUT, 0.5,
                       fail=_fault)
    record = last_migration(lab, server_id)
    return Migration(server=server, status=record["status"] if record else "none",
                     seconds=time.monotonic() - started)


def confirm_resize(lab: NovaLab, server_id: str) -> Migration:
    """``openstack server resize confirm``, until the server is ACTIVE and the
    migration record confirmed (the source's clean-up is a cast)."""
    started = time.monotonic()
    lab.openstack("server", "resize", "confirm", server_id, timeout=60)
    server = rest.poll("confirm of %s" % server_id, lambda: show(lab, server_id),
                       lambda s: s["status"] == "ACTIVE"
                       and s.get("OS-EXT-STS:task_state") is None, MIGRATION_TIMEOUT, 0.5,
                       fail=_fault)
    record = rest.poll("confirmed migration of %s" % server_id,
                       lambda: last_migration(lab, server_id),
                       lambda m: m is not None and m["status"] in ("confirmed", "error"),
                       60, 0.5)
    return Migration(server=server, status=record["status"],
                     seconds=time.monotonic() - started)


def shelve(lab: NovaLab, server_id: str) -> dict[str, Any]:
    """``openstack server shelve``, until offloaded (the lab offloads at once)."""
    lab.openstack("server", "shelve", server_id, timeout=60)
    server: dict[str, Any] = rest.poll(
        "shelve offload of %s" % server_id, lambda: show(lab, server_id),
        lambda s: s["status"] == "SHELVED_OFFLOADED", BOOT_TIMEOUT, 1.0, fail=_fault)
    return server


def unshelve(lab: NovaLab, server_id: str, host: str | None = None) -> dict[str, Any]:
    """``openstack server unshelve [--host H]``, until ACTIVE."""
    lab.openstack("server", "unshelve", *(["--host", host] if host else []), server_id,
                  timeout=60)
    server: dict[str, Any] = rest.poll(
        "unshelve of %s" % server_id, lambda: show(lab, server_id),
        lambda s: s["status"] == "ACTIVE", BOOT_TIMEOUT, 1.0, fail=_fault)
    return server


def slow_down(lab: NovaLab, server: dict[str, Any], mib_per_s: int = 1,
              timeout: float = 30.0) -> bool:
    """Throttle the running live migration of ``server`` at its source to
    ``mib_per_s`` (libvirt's max speed), re-applied until its memory phase runs
    (Nova starts the job with its own bandwidth); True once it held there."""
    conn = lab.stack_host(host_of(server)).lab_host.connect()
    try:
        dom = conn.lookupByUUIDString(server["id"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                dom.migrateSetMaxSpeed(mib_per_s, 0)
                stats = dom.jobStats()
            except libvirt.libvirtError:
                stats = {}
            if stats.get("memory_processed", 0) > 0:
                dom.migrateSetMaxSpeed(mib_per_s, 0)
                return True
            time.sleep(0.05)
        return False
    finally:
        conn.close()


def in_progress_migration(lab: NovaLab, server_id: str) -> dict[str, Any]:
    """The server's running live migration (``GET /servers/{id}/migrations``)."""
    found = lab.compute_api().get("/servers/%s/migrations" % server_id)["migrations"]
    if len(found) != 1:
        raise LabError(reason="expected one migration in progress of %s, got %s"
                                 % (server_id, [m.get("status") for m in found]))
    return dict(found[0])


def last_migration(lab: NovaLab, server_id: str) -> dict[str, Any] | None:
    migrations = lab.compute_api().get("/os-migrations?instance_uuid=%s" % server_id)
    found = sorted(migrations["migrations"], key=lambda m: m["id"])
    return dict(found[-1]) if found else None


def delete(lab: NovaLab, server_id: str) -> None:
    """``openstack server delete --wait``."""
    lab.openstack("server", "delete", "--wait", server_id, timeout=BOOT_TIMEOUT)


def console(lab: NovaLab, server: dict[str, Any]) -> ptyconsole.PtyConsole:
    """The guest's serial console on the host it runs on (wait for its shell)."""
    host = lab.stack_host(host_of(server)).lab_host
    return ptyconsole.open_console(host, server["id"])


def tpm_report(lab: NovaLab, server: dict[str, Any]) -> dict[str, str]:
    with console(lab, server) as con:
        return con.report()


def domain_xml(lab: NovaLab, server: dict[str, Any]) -> str:
    conn = lab.stack_host(host_of(server)).lab_host.connect()
    try:
        return str(conn.lookupByUUIDString(server["id"]).XMLDesc(0))
    finally:
        conn.close()


def other_host(lab: NovaLab, host: str) -> str:
    names = [h.name for h in lab.stack.hosts.values()] if lab.stack else []
    others = [n for n in names if n != host]
    if len(others) != 1:
        raise LabError(reason="no single other host than %s in %s" % (host, names))
    return others[0]
