"""Real Nova 34 services, this project's driver and filter, the two-host lab.

What an operator does, through the unmodified ``openstack`` CLI: boot a
``vtpcm.small`` server, live-migrate it, try to move it to an untrusted host,
delete it; a plain-flavor server alongside. The guest proves over its serial
console that its TPM (PCR16, an NV index, the EK) and its own life (boot id)
survive. Tests run in file order on one session-wide lab and one vTPCM server;
the test that makes a host untrusted comes after every test that needs both.
"""

import hashlib
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests import leakscan
from tests.functional import tpmtools
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.keystore import KeyStore, TPMSealedHostKey
from vtpcm_common import exception
from vtpcm_lab import hosts
from vtpcm_lab.nova import neutron, rest, servers
from vtpcm_lab.nova.cloud import PLAIN_FLAVOR, VTPCM_FLAVOR, VTPCM_FLAVOR_LARGER, NovaLab

pytestmark = pytest.mark.e2e

# the read-only calls Nova 34 makes for a networkless server (boot, show,
# live migration, delete): collection GETs only
# a TPM's PCRs after a power-on (a cold migration or resize powers the guest off)
FRESH_PCR = "0" * 64
EXPECTED_NEUTRON = {"/", "/v2.0/extensions", "/v2.0/networks", "/v2.0/ports",
                    "/v2.0/security-groups"}


class Run:
    """What the tests of this module share: the vTPCM server and what it showed."""

    server: dict[str, Any]
    before: dict[str, str]
    secrets: list[tuple[str, bytes]]
    windows: set[bytes]


@pytest.fixture(scope="module")
def run() -> Run:
    the_run = Run()
    the_run.secrets, the_run.windows = [], set()
    return the_run


def _collect_secrets(lab: NovaLab, host: str, instance: str, side: str, run: Run) -> None:
    """The vTPCM's keys and plaintext-state windows on ``host``, read from the agent's
    store through the host TPM (tests only), for the leak scan at the end."""
    stack_host = lab.stack_host(host)
    vtpcm_id = lab.stack.agents.get(host, instance).vtpcm_id  # type: ignore[union-attr]
    with HostTPM(stack_host.tpm.tcti) as tpm:
        keys = KeyStore(stack_host.state_dir / "keys", TPMSealedHostKey(
            tpm, stack_host.state_dir / "hostkey.sealed")).get(vtpcm_id)
    state_dir = stack_host.state_dir / "vtpcms" / vtpcm_id
    work = Path(tempfile.mkdtemp(dir="/tmp", prefix="vtn-"))
    (work / "pub").mkdir()
    (work / "p").mkdir()
    try:
        public = tpmtools.public_material(state_dir, keys.at_rest_key, work / "pub")
        with tpmtools.plaintext_permanent(state_dir, keys.at_rest_key, work / "p") as plain:
            run.windows |= leakscan.windows(plain, public)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run.secrets += [(side + " at-rest key", keys.at_rest_key),
                    (side + " migration key", keys.migration_key)]


def _domains(host: hosts.LabHost) -> list[str]:
    conn = host.connect()
    try:
        return [d.UUIDString() for d in conn.listAllDomains()]
    finally:
        conn.close()


def _no_live_vtpcm(agents: Any, host: str, instance: str) -> None:
    """``host``'s agent holds no live vTPCM of ``instance``: none at all, or
    the tombstone of one it gave away earlier."""
    try:
        info = agents.get(host, instance)
    except exception.NotFound:
        return
    assert (info.state, info.running) == ("DESTROYED", False)


def _tpms(xml: str) -> list[tuple[str | None, str | None]]:
    dom = ET.fromstring(xml)  # noqa: S314 - from our own libvirt daemon
    return [(t.get("model"), t.find("backend").get("type"))  # type: ignore[union-attr]
            for t in dom.findall("devices/tpm")]


def test_create_boots_vtpcm_server_on_a_trusted_host(nova_lab: NovaLab, run: Run) -> None:
    server = servers.create(nova_lab, "vtn-tpm", VTPCM_FLAVOR)
    host = servers.host_of(server)
    record = nova_lab.stack.engine.get_vtpcm(server["id"])  # type: ignore[union-attr]
    assert (record.host, record.generation) == (host, 0)
    assert nova_lab.stack.engine.show_host(host).status == "APPROVED"  # type: ignore[union-attr]
    assert _tpms(servers.domain_xml(nova_lab, server)) == [("tpm-crb", "external")]
    with servers.console(nova_lab, server) as con:
        con.write(os.urandom(32).hex())
        run.before = con.report()
    assert run.before["NV"] != "none" and run.before["PCR16"] != "0" * 64
    run.server = server
    _collect_secrets(nova_lab, host, server["id"], "source", run)


def test_live_migration_keeps_the_guest_tpm_and_moves_the_vtpcm(nova_lab: NovaLab,
                                                                run: Run) -> None:
    stack = nova_lab.stack
    assert stack is not None
    src = servers.host_of(run.server)
    instance = run.server["id"]
    src_host = nova_lab.stack_host(src)
    vtpcm_id = stack.agents.get(src, instance).vtpcm_id

    migration = servers.live_migrate(nova_lab, instance)  # no host: the scheduler picks

    assert (migration.status, migration.server["status"]) == ("completed", "ACTIVE")
    dst = migration.host
    assert dst == servers.other_host(nova_lab, src)
    after = servers.tpm_report(nova_lab, migration.server)
    assert {k: after[k] for k in ("PCR16", "NV", "EK", "BOOTID")} == \
        {k: run.before[k] for k in ("PCR16", "NV", "EK", "BOOTID")}
    assert float(after["UPTIME"]) > float(run.before["UPTIME"])
    record = stack.engine.get_vtpcm(instance)
    assert (record.host, record.generation) == (dst, 1)
    gone = stack.agents.get(src, instance)
    assert (gone.state, gone.running) == ("DESTROYED", False)
    assert not (src_host.state_dir / "vtpcms" / vtpcm_id).exists()
    assert not list((src_host.state_dir / "keys").glob(vtpcm_id + "*"))
    run.server = migration.server
    _collect_secrets(nova_lab, dst, instance, "destination", run)


def test_plain_flavor_server_is_untouched_by_the_vtpcm(nova_lab: NovaLab) -> None:
    stack = nova_lab.stack
    assert stack is not None
    server = servers.create(nova_lab, "vtn-plain", PLAIN_FLAVOR)
    assert _tpms(servers.domain_xml(nova_lab, server)) == []
    migration = servers.live_migrate(nova_lab, server["id"])
    assert (migration.status, migration.server["status"]) == ("completed", "ACTIVE")
    servers.delete(nova_lab, server["id"])
    # no engine or agent ever heard of it (read before this test asks the engine)
    daemon_logs = [h.agent.log_file for h in stack.hosts.values()]
    assert stack.engine_daemon is not None
    daemon_logs.append(stack.engine_daemon.log_file)
    assert [p.name for p in daemon_logs if server["id"] in p.read_text()] == []
    assert not [e for e in stack.engine.list_audit(limit=500).entries
                if e.instance == server["id"]]
    with pytest.raises(exception.NotFound):
        stack.engine.get_vtpcm(server["id"])


def test_abort_of_a_slowed_live_migration_leaves_everything_on_the_source(
        nova_lab: NovaLab, run: Run) -> None:
    stack = nova_lab.stack
    assert stack is not None
    src = servers.host_of(run.server)
    instance = run.server["id"]
    dst = servers.other_host(nova_lab, src)
    dst_host = nova_lab.stack_host(dst)
    before = stack.agents.get(src, instance)
    record = stack.engine.get_vtpcm(instance)
    started = time.monotonic()

    assert servers.start_live_migration(nova_lab, instance) == ""
    assert servers.slow_down(nova_lab, run.server), "the migration ended before it slowed"
    running = rest.poll("migration running", lambda: servers.in_progress_migration(
        nova_lab, instance), lambda m: m["status"] == "running", 60, 0.2)
    nova_lab.openstack("server", "migration", "abort", instance, str(running["id"]))
    migration = servers.wait_migration(nova_lab, instance, started)

    assert migration.status == "cancelled"
    # Nova 34 rolls the migration back, then re-raises the cancelled job's
    # libvirt error (driver.py _live_migration: future.result()) and the
    # manager marks the instance ERROR, a moment after the rollback; with the
    # stock driver too. The guest runs on the source: an operator resets it.
    server = rest.poll("server in ERROR after the abort", lambda: servers.show(
        nova_lab, instance), lambda s: s["status"] == "ERROR", 60, 0.5)
    assert servers.host_of(server) == src
    nova_lab.openstack("server", "set", "--state", "active", "--auto-approve", instance)
    after = stack.agents.get(src, instance)
    assert (after.state, after.generation, after.pid, after.migration_id) == \
        ("ACTIVE", before.generation, before.pid, None)
    now = stack.engine.get_vtpcm(instance)
    assert (now.host, now.generation) == (record.host, record.generation)
    # (the destination's rollback is a cast: it may still be running)
    rest.poll("no domain left on %s" % dst, lambda: _domains(dst_host.lab_host),
              lambda uuids: instance not in uuids, 60, 0.5)
    assert _domains(nova_lab.stack_host(src).lab_host) == [instance]
    # nothing left on the destination: no vTPCM, no keys, no socket
    assert not list((dst_host.state_dir / "vtpcms").glob("*"))
    assert not list((dst_host.state_dir / "keys").glob("*.keys"))
    assert not dst_host.ctrl_socket(instance).exists()
    report = servers.tpm_report(nova_lab, migration.server)
    assert {k: report[k] for k in ("PCR16", "NV", "EK", "BOOTID")} == \
        {k: run.before[k] for k in ("PCR16", "NV", "EK", "BOOTID")}
    run.server = migration.server


def _resize_and_confirm(nova_lab: NovaLab, run: Run, flavor: str | None) -> dict[str, Any]:
    """Cold-migrate (``flavor`` None) or resize the vTPCM server to the other
    host and confirm, checking the vTPCM at each step; the guest's TPM report
    from before (written just now, so the state the guest powered off with)
    and after."""
    stack = nova_lab.stack
    assert stack is not None
    src = servers.host_of(run.server)
    instance = run.server["id"]
    src_host = nova_lab.stack_host(src)
    vtpcm_id = stack.agents.get(src, instance).vtpcm_id
    generation = stack.engine.get_vtpcm(instance).generation
    with servers.console(nova_lab, run.server) as con:
        con.write(os.urandom(32).hex())
        before = con.report()
    assert before["NV"] != run.before["NV"]

    moved = servers.resize(nova_lab, instance, flavor)  # no host: the scheduler picks

    dst = moved.host
    assert (moved.status, moved.server["status"]) == ("finished", "VERIFY_RESIZE")
    assert dst == servers.other_host(nova_lab, src)
    # until the confirm the source keeps its copy (a revert restarts on it)
    assert stack.engine.get_vtpcm(instance).host == src
    assert (src_host.state_dir / "vtpcms" / vtpcm_id).exists()
    incoming = stack.agents.get(dst, instance)
    assert (incoming.state, incoming.running) == ("MIGRATING_IN", True)
    report = servers.tpm_report(nova_lab, moved.server)
    confirmed = servers.confirm_resize(nova_lab, instance)

    assert (confirmed.status, servers.host_of(confirmed.server)) == ("confirmed", dst)
    record = stack.engine.get_vtpcm(instance)
    assert (record.host, record.generation) == (dst, generation + 1)
    # the source's confirm marks the migration confirmed after the driver's
    gone = stack.agents.get(src, instance)
    assert (gone.state, gone.running) == ("DESTROYED", False)
    assert not (src_host.state_dir / "vtpcms" / vtpcm_id).exists()
    assert not list((src_host.state_dir / "keys").glob(vtpcm_id + "*"))
    # NV and the EK as the guest left them; PCRs afresh after the power off
    assert (report["NV"], report["EK"]) == (before["NV"], before["EK"])
    assert (report["PCR16"], before["PCR16"] != FRESH_PCR) == (FRESH_PCR, True)
    assert report["BOOTID"] != before["BOOTID"]
    after = servers.tpm_report(nova_lab, confirmed.server)
    assert {k: after[k] for k in ("PCR16", "NV", "EK", "BOOTID")} == \
        {k: report[k] for k in ("PCR16", "NV", "EK", "BOOTID")}
    run.server, run.before = confirmed.server, after
    _collect_secrets(nova_lab, dst, instance, "resized " + (flavor or "migrated"), run)
    return confirmed.server


def test_cold_migration_and_confirm_keep_the_tpm_contents(nova_lab: NovaLab,
                                                          run: Run) -> None:
    server = _resize_and_confirm(nova_lab, run, None)
    assert server["flavor"]["original_name"] == VTPCM_FLAVOR


def test_resize_to_another_vtpcm_flavor_and_confirm_keep_the_tpm_contents(
        nova_lab: NovaLab, run: Run) -> None:
    server = _resize_and_confirm(nova_lab, run, VTPCM_FLAVOR_LARGER)
    assert (server["flavor"]["original_name"], server["flavor"]["ram"]) == \
        (VTPCM_FLAVOR_LARGER, 320)


def test_shelve_offload_and_unshelve_elsewhere_keep_the_tpm_contents(
        nova_lab: NovaLab, run: Run) -> None:
    stack = nova_lab.stack
    assert stack is not None
    src = servers.host_of(run.server)
    instance = run.server["id"]
    other = servers.other_host(nova_lab, src)
    generation = stack.engine.get_vtpcm(instance).generation

    servers.shelve(nova_lab, instance)
    record = stack.engine.get_vtpcm(instance)
    assert (record.host, record.state) == (src, "SHELVED")
    server = servers.unshelve(nova_lab, instance, other)

    assert servers.host_of(server) == other
    record = stack.engine.get_vtpcm(instance)
    assert (record.host, record.generation) == (other, generation + 1)
    report = servers.tpm_report(nova_lab, server)
    # NV and the EK come back; PCRs start afresh, as after any power off
    assert (report["NV"], report["EK"]) == (run.before["NV"], run.before["EK"])
    assert report["BOOTID"] != run.before["BOOTID"]
    assert not list((nova_lab.stack_host(src).state_dir / "vtpcms").glob("*"))
    run.server = server
    run.before = dict(run.before, PCR16=report["PCR16"], BOOTID=report["BOOTID"])


def test_live_migration_to_an_untrusted_host_is_refused(nova_lab: NovaLab, run: Run) -> None:
    """After this test the other host stays UNTRUSTED."""
    stack = nova_lab.stack
    assert stack is not None
    src = servers.host_of(run.server)
    instance = run.server["id"]
    bad = servers.other_host(nova_lab, src)
    before = stack.agents.get(src, instance)
    agent_log_offset = len(nova_lab.stack_host(src).agent.log_text())
    with HostTPM(nova_lab.stack_host(bad).tpm.tcti) as tpm:
        tpm.extend_pcr(5, hashlib.sha256(b"unexpected bootloader").digest())
    assert stack.engine.attest(bad).status != "TRUSTED"

    migration = servers.live_migrate(nova_lab, instance, host=bad)

    # refused by the API: the scheduler ran only VTPCMFilter's verdict on ``bad``
    assert migration.status == "refused"
    assert "No valid host was found" in migration.refusal
    assert nova_lab.layout is not None
    scheduler_log = (nova_lab.layout.logs / "nova-scheduler.log").read_text()
    assert "%s fails vTPCM: no fresh TRUSTED verdict" % bad in scheduler_log
    assert (migration.server["status"], migration.host) == ("ACTIVE", src)
    _no_live_vtpcm(stack.agents, bad, instance)
    after = stack.agents.get(src, instance)
    assert (after.state, after.generation, after.pid, after.migration_id) == \
        ("ACTIVE", before.generation, before.pid, before.migration_id)
    report = servers.tpm_report(nova_lab, migration.server)
    assert {k: report[k] for k in ("PCR16", "NV", "EK", "BOOTID")} == \
        {k: run.before[k] for k in ("PCR16", "NV", "EK", "BOOTID")}
    # the source's agent never sealed a key for it
    assert "Sealed the migration key of instance %s" % instance not in \
        nova_lab.stack_host(src).agent.log_text()[agent_log_offset:]


def test_delete_shreds_the_vtpcm(nova_lab: NovaLab, run: Run) -> None:
    stack = nova_lab.stack
    assert stack is not None
    host = servers.host_of(run.server)
    instance = run.server["id"]
    stack_host = nova_lab.stack_host(host)
    vtpcm_id = stack.agents.get(host, instance).vtpcm_id
    assert (stack_host.state_dir / "vtpcms" / vtpcm_id).exists()

    servers.delete(nova_lab, instance)

    with pytest.raises(exception.NotFound):
        stack.engine.get_vtpcm(instance)
    assert not (stack_host.state_dir / "vtpcms" / vtpcm_id).exists()
    assert not list((stack_host.state_dir / "keys").glob(vtpcm_id + "*"))
    assert not stack_host.ctrl_socket(instance).exists()


def test_neutron_stand_in_saw_only_read_only_calls(nova_lab: NovaLab) -> None:
    assert nova_lab.layout is not None
    calls = neutron.read_calls(nova_lab.layout.logs / "neutron-calls.jsonl")
    assert calls, "Nova made no Neutron call at all: is the stand-in wired?"
    assert {c["method"] for c in calls} == {"GET"}
    assert {c["path"] for c in calls} <= EXPECTED_NEUTRON


def test_no_key_or_plaintext_state_in_any_log(nova_lab: NovaLab, run: Run) -> None:
    """Every log of the run: Nova's services (DEBUG), agents, engine, libvirt, QEMU, swtpm."""
    # each vTPCM the run looked at gave both its keys (4 holders in file order)
    assert run.secrets and len(run.secrets) % 2 == 0 and run.windows
    logs = nova_lab.log_files()
    names = {p.name for p in logs}
    assert {"nova-api.log", "nova-conductor.log", "nova-scheduler.log",
            "nova-compute.log", "libvirtd.log"} <= names, sorted(names)
    haystack = b"\n".join(p.read_bytes() for p in logs)
    assert b" DEBUG " in haystack
    # planted control: a key and a window this scan must find in this haystack
    leakscan.assert_finds(run.secrets, run.windows, haystack)
    assert leakscan.hits(run.secrets, haystack) == []
    assert leakscan.window_hits(run.windows, haystack) == 0
