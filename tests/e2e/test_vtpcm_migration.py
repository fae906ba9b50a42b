"""VM + vTPCM live migration through the real protocol in the two-host lab:
real libvirt/QEMU (TCG), real swtpm under real vtpcm-agents, a real
vtpcm-engine attesting swtpm host-TPM stand-ins, over the local RabbitMQ.

Tests run in file order on one stack; the one that makes host B untrusted
comes last."""

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from tests import leakscan
from tests.e2e import labcells
from tests.functional import tpmtools
from tests.functional.harness import agent_seals
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.keystore import KeyStore, TPMSealedHostKey
from vtpcm_agent.swtpm.keypipe import key_pipe
from vtpcm_common import exception
from vtpcm_lab import console, domain, hosts, live, migrate, proxy
from vtpcm_lab.exception import LabError
from vtpcm_lab.stack import SWTPM_UID_RANGES, Stack
from vtpcm_nova.virt import lifecycle, livemigration

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(lab):
    the_stack = Stack(lab, exchange="vtpcm-e2e-" + uuid.uuid4().hex[:6])
    try:
        the_stack.up()
        yield the_stack
    finally:
        _destroy_guests(lab)
        the_stack.down()


def _destroy_guests(lab):
    live.destroy_guests(lab, lambda name: name.startswith("vte-"))


@pytest.fixture
def guest(stack):
    name = "vte-" + uuid.uuid4().hex[:6]
    a = stack.host(stack.lab.a)
    instance, con = live.boot_guest(stack, a, name)
    con.write(os.urandom(32).hex())
    before = con.report()
    con.close()
    yield name, instance, before
    _destroy_guests(stack.lab)


def _report(host: hosts.LabHost, name: str) -> dict[str, str]:
    with console.GuestConsole(host.serial_path(name)) as con:
        con.wait_ready(timeout=30)
        return con.report()


def _same_tpm(before, after):
    assert {k: after[k] for k in ("PCR16", "NV", "EK", "BOOTID")} == \
        {k: before[k] for k in ("PCR16", "NV", "EK", "BOOTID")}
    assert float(after["UPTIME"]) > float(before["UPTIME"])


def _dom_state(host: hosts.LabHost, name: str) -> int:
    conn = host.connect()
    try:
        return conn.lookupByName(name).state()[0]
    finally:
        conn.close()


def _runs_in_range(pid, uid_range):
    with open("/proc/%d/status" % pid, encoding="ascii") as fh:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    first, last = (int(n) for n in uid_range.split("-"))
    assert first <= int(status["Uid"].split()[0]) <= last
    assert status["Seccomp"] == "2"


def test_round_trip_keeps_guest_tpm_and_moves_generation(stack, guest):
    name, instance, before = guest
    a, b = stack.host(stack.lab.a), stack.host(stack.lab.b)
    sealed_before = agent_seals(a.agent, instance)
    there = live.live_migrate(stack, name, a, b)
    assert there.verdict == "TRUSTED"
    # control for the untrusted case: a migration to a trusted host is in
    # the source agent's own record of seals
    assert [s.migration_id for s in agent_seals(a.agent, instance)[len(sealed_before):]] \
        == [there.migration_id]
    _same_tpm(before, _report(b.lab_host, name))
    assert stack.engine.get_vtpcm(instance).generation == 1
    # QEMU (the lab user) reached a swtpm that runs as a uid of host B's
    # range, through the public socket link ([agent] swtpm_uid_range)
    _runs_in_range(stack.agents.get(b.name, instance).pid, SWTPM_UID_RANGES["b"])
    back = live.live_migrate(stack, name, b, a)
    _runs_in_range(stack.agents.get(a.name, instance).pid, SWTPM_UID_RANGES["a"])
    _same_tpm(before, _report(a.lab_host, name))
    record = stack.engine.get_vtpcm(instance)
    assert (record.host, record.generation) == (a.name, 2)
    engine_log = stack.engine_daemon.log_text()
    for hop in (there, back):
        assert stack.engine.get_migration(hop.migration_id).state == "COMMITTED"
        assert hop.protocol_s < hop.libvirt.total_s
        # the post-import check ran on real QEMU's transfer and passed: the
        # destination's first write after the import is the source's state
        assert ("Migration %s: post-import check passed" % hop.migration_id) in engine_log
        # ... and the blobs the destination's QEMU set through its proxy are
        # those the source's QEMU read (volatile state included)
        assert ("Migration %s: post-import check passed, the destination %s imported the "
                "source's permanent state and its QEMU set the blobs the source's QEMU read"
                % (hop.migration_id, (b if hop is there else a).name)) in engine_log
    assert stack.agents.get(b.name, instance).state == "DESTROYED"


def test_old_generation_cannot_be_activated_again(stack, guest):
    name, instance, _ = guest
    a, b = stack.host(stack.lab.a), stack.host(stack.lab.b)
    live.live_migrate(stack, name, a, b)
    old = stack.agents.get(a.name, instance)
    assert old.state == "DESTROYED" and not old.running
    assert not (a.state_dir / "keys" / (old.vtpcm_id + ".keys")).exists()
    assert not (a.state_dir / "vtpcms" / old.vtpcm_id).exists()
    with pytest.raises(exception.InvalidTransition):
        stack.agents.start(a.name, instance)
    # the old holder may no longer move it; the new one cannot name the old
    # place as the source
    with pytest.raises(exception.CommandRefused):
        stack.engine_at(a).begin(str(uuid.uuid4()), instance, a.name, b.name)
    with pytest.raises(exception.MigrationError) as err:
        stack.engine_at(b).begin(str(uuid.uuid4()), instance, a.name, b.name)
    assert "source is not where the vTPCM lives" in str(err.value)
    assert stack.agents.get(b.name, instance).state == "ACTIVE"


def test_migration_stream_carries_no_plaintext_vtpcm_state(stack, guest):
    """Seeds, private keys and every other non-public byte of the vTPCM's
    permanent state stay out of the stream. What the guest can read through
    its TPM (EK public area, certificates, its own NV data, names) is in its
    RAM by design, so it is classified as public first, from a clone of the
    state, and must be a minority."""
    name, instance, before = guest
    a, b = stack.host(stack.lab.a), stack.host(stack.lab.b)
    info = stack.agents.get(a.name, instance)
    with HostTPM(a.tpm.tcti) as tpm:
        keys = KeyStore(a.state_dir / "keys", TPMSealedHostKey(
            tpm, a.state_dir / "hostkey.sealed")).get(info.vtpcm_id)
    base = Path(tempfile.mkdtemp(prefix="vtpe", dir="/tmp"))
    try:
        state_dir = a.state_dir / "vtpcms" / info.vtpcm_id
        with tpmtools.plaintext_permanent(state_dir, keys.at_rest_key, base) as plain:
            pass
        public = tpmtools.public_material(state_dir, keys.at_rest_key, base)
        assert any(bytes.fromhex(before["NV"]) in item for item in public)
        secret = tpmtools.secret_offsets(plain, public, proxy.high_entropy_windows(plain))
        assert len(secret) > 1000, "too little of the state counts as secret"
        capture = base / "stream"
        port = live.free_port()
        with proxy.CaptureProxy(("127.0.0.1", port), ("127.0.0.2", port), capture):
            live.live_migrate(stack, name, a, b, port=port, connect_host="127.0.0.1",
                              listen_address="127.0.0.2")
        stream = capture.read_bytes()
        assert len(stream) > 1 << 20, "the stream did not go through the proxy"
        hits = proxy.find_windows(plain, stream, secret)
        assert hits == set(), "%d secret windows of vTPCM state in the stream" % len(hits)
        _same_tpm(before, _report(b.lab_host, name))
        # No key of either host (the destination's fresh at-rest key
        # included) nor a secret window of the state, in any encoding
        # (tests/leakscan.py), in any log or file the run produced: agents
        # (DEBUG), engine, swtpm, libvirtd and QEMU logs, state and key files.
        moved = stack.agents.get(b.name, instance)
        with HostTPM(b.tpm.tcti) as tpm:
            fresh = KeyStore(b.state_dir / "keys", TPMSealedHostKey(
                tpm, b.state_dir / "hostkey.sealed")).get(moved.vtpcm_id)
        assert fresh.migration_key == keys.migration_key
        secrets = [("source at-rest key", keys.at_rest_key),
                   ("migration key", keys.migration_key),
                   ("destination's fresh at-rest key", fresh.at_rest_key)]
        found = {plain[o:o + leakscan.WINDOW] for o in secret}
        files = [stack.engine_daemon.log_file]
        for host in (a, b):
            files += [host.agent.log_file, host.lab_host.log_file,
                      host.lab_host.qemu_log(name), *tpmtools.files(host.state_dir)]
        missing = [f for f in files if not f.is_file()]
        assert missing == [], missing
        assert any(f.parent.name == "logs" for f in files)  # the swtpm logs
        haystack = leakscan.SEP.join(f.read_bytes() for f in files)
        leakscan.assert_finds(secrets, found, haystack)
        assert leakscan.hits(secrets, haystack) == []
        assert leakscan.window_hits(found, haystack) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_destination_that_cannot_load_the_state_leaves_vm_on_source(stack, guest):
    name, instance, before = guest
    a, b = stack.host(stack.lab.a), stack.host(stack.lab.b)
    source_before = stack.agents.get(a.name, instance)
    migration_id = str(uuid.uuid4())
    stack.engine_at(b).check_destination(instance, b.name)
    stack.engine_at(a).begin(migration_id, instance, a.name, b.name)
    incoming = stack.agents.get(b.name, instance)
    assert incoming.state == "MIGRATING_IN" and incoming.running
    # Fault injection: the destination's swtpm is replaced by one with a WRONG
    # migration key at the same socket (what a broken or hostile dest does).
    os.kill(incoming.pid, 15)
    tpmdir = Path(tempfile.mkdtemp(prefix="vtpw", dir="/tmp"))
    wrong = None
    try:
        # where the agent's swtpm bound it (the public path may be a link
        # into the swtpm uid's own directory)
        live_ctrl = Path(os.path.realpath(b.ctrl_socket(instance)))
        for _ in range(100):
            if not live_ctrl.exists():
                break
            time.sleep(0.05)
        wrong = _raw_swtpm(tpmdir, live_ctrl, b.lab_host.uid)
        conn_a, conn_b = a.lab_host.connect(), b.lab_host.connect()
        try:
            dom = conn_a.lookupByName(name)
            xml = domain.render_destination_xml(
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), live_ctrl,
                b.lab_host.serial_path(name))
            with pytest.raises(LabError):
                migrate.migrate(dom, conn_b, b.lab_host.uri, xml, live.free_port(),
                                timeout=60)
        finally:
            conn_a.close()
            conn_b.close()
        info = stack.engine_at(a).abort(migration_id,
                                        "libvirt: destination failed to load state")
        assert info.state == "ABORTED"
    finally:
        if wrong is not None:
            hosts.kill_pid(wrong.pid, timeout=5)
            wrong.wait(timeout=5)
        shutil.rmtree(tpmdir, ignore_errors=True)
    assert _dom_state(a.lab_host, name) == libvirt.VIR_DOMAIN_RUNNING
    _same_tpm(before, _report(a.lab_host, name))
    after = stack.agents.get(a.name, instance)
    assert (after.state, after.generation, after.pid) == \
        ("ACTIVE", source_before.generation, source_before.pid)
    with pytest.raises(exception.NotFound):
        stack.agents.get(b.name, instance)
    assert not (b.state_dir / "keys" / (incoming.vtpcm_id + ".keys")).exists()
    record = stack.engine.get_vtpcm(instance)
    assert (record.host, record.migration_id) == (a.name, None)
    # and the VM can still migrate afterwards
    live.live_migrate(stack, name, a, b)
    _same_tpm(before, _report(b.lab_host, name))


def _raw_swtpm(tpmdir: Path, ctrl: Path, uid: int):
    fds = [key_pipe(os.urandom(32)), key_pipe(os.urandom(32))]
    try:
        proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", "dir=%s" % tpmdir,
             "--ctrl", "type=unixio,path=%s,mode=0660,uid=%d" % (ctrl, uid),
             "--key", "fd=%d,mode=aes-256-cbc,format=binary" % fds[0],
             "--migration-key", "fd=%d,mode=aes-256-cbc,format=binary" % fds[1]],
            pass_fds=tuple(fds), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
    finally:
        for fd in fds:
            os.close(fd)
    deadline = time.monotonic() + 10
    while not ctrl.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return proc



# --- fault cells only real QEMU shows (issue 10 point 4; the others are in
# tests/functional/faults, without QEMU) -------------------------------------

COPY_CAP_MIB = 2  # MiB/s: holds libvirt's copy of the lab guest for seconds
UNCAPPED_MIB = 8192
CELL_TIMEOUT = 90.0  # s: a migration of a cell ends (fails or lands) within it
WATCHDOG_REPORT_S = 15.0  # [agent] swtpm_watchdog_interval 2 s + the report's trip


class _Migrating:
    """``live.live_migrate`` (the driver's sequence: begin, libvirt, then
    commit, or settle/abort on a failure) on a thread, with libvirt's copy
    capped, so that a fault lands while it copies."""

    def __init__(self, stack, name, src, dst):
        self.result = self.error = None
        self._thread = threading.Thread(target=self._run, args=(stack, name, src, dst),
                                        daemon=True)
        self._thread.start()

    def _run(self, stack, name, src, dst):
        try:
            self.result = live.live_migrate(stack, name, src, dst, timeout=CELL_TIMEOUT,
                                            bandwidth_mib=COPY_CAP_MIB)
        except BaseException as err:  # noqa: BLE001 - the test asserts on it
            self.error = err

    def join(self):
        self._thread.join(CELL_TIMEOUT + 60)
        assert not self._thread.is_alive(), "live_migrate never returned"
        return self.result, self.error


def _wait_copying(host, name, instance, stack, dst):
    """Wait (bounded) until libvirt copies RAM and the destination's incoming
    vTPCM is prepared; the job's stats and that vTPCM then. Positive
    control of the cells: the fault lands mid-copy, with the destination's
    vTPCM, state and key file there to be cleaned up."""
    conn = host.lab_host.connect()
    try:
        dom = conn.lookupByName(name)
        deadline = time.monotonic() + 60
        while True:
            stats = dom.jobStats()
            if (stats.get("type") == libvirt.VIR_DOMAIN_JOB_UNBOUNDED
                    and stats.get("memory_processed", 0) >= 256 << 10):
                break
            assert time.monotonic() < deadline, "libvirt's copy never started: %s" % stats
            time.sleep(0.05)
    finally:
        conn.close()
    assert stats["memory_remaining"] > 0, stats
    incoming = stack.agents.get(dst.name, instance)
    assert (incoming.state, incoming.running) == ("MIGRATING_IN", True), incoming
    assert _vtpcm_files(dst, incoming.vtpcm_id) != [], "no incoming state to clean up"
    assert _swtpms_of(instance) != [] and incoming.pid in _swtpms_of(instance)
    return stats, incoming


@pytest.fixture
def lab_cell():
    """The cell's outcome, written to tests/e2e/lab_cells.json at teardown."""
    cell = labcells.LabCell()
    try:
        yield cell
    finally:
        cell.record()


def _vtpcm_files(host, vtpcm_id):
    return [p for p in (host.state_dir / "vtpcms" / vtpcm_id,
                        host.state_dir / "keys" / (vtpcm_id + ".keys")) if p.exists()]


def _swtpms_of(instance):
    """Pids of every live swtpm whose command line names ``instance``
    (its socket and pid file paths carry it), on either lab host."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if os.path.basename(argv[0]) == b"swtpm" and instance.encode() in b" ".join(argv) \
                and ") Z " not in stat:
            found.append(int(proc.name))
    return found


def _incoming_qemu(host, name):
    """Pid of the destination's QEMU waiting for ``name``'s stream."""
    pid_file = host.lab_host.runtime_dir / "libvirt" / "qemu" / "run" / (name + ".pid")
    pid = int(pid_file.read_text().strip())
    argv = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
    assert b"-incoming" in argv and any(name.encode() in a for a in argv), argv[:3]
    return pid


def _only_on(stack, instance, here, there, *, running):
    """The vTPCM is in one place: the engine's record (no migration), that
    host's agent (same id, generation), not in the other agent's list, no
    state or key file of it there, its only swtpm the live one (if any)."""
    record = stack.engine.get_vtpcm(instance)
    assert (record.host, record.migration_id) == (here.name, None), record
    info = stack.agents.get(here.name, instance)
    assert (info.vtpcm_id, info.generation, info.running) == \
        (record.vtpcm_id, record.generation, running), info
    assert info.state == ("ACTIVE" if running else "STOPPED"), info
    assert instance not in {v.instance_uuid for v in stack.agents.list(there.name).vtpcms
                            if v.state != "DESTROYED"}
    ids = {info.vtpcm_id}
    try:
        ids.add(stack.agents.get(there.name, instance).vtpcm_id)  # DESTROYED: shredded
    except exception.NotFound:
        pass
    assert [f for i in ids for f in _vtpcm_files(there, i)] == []
    assert _swtpms_of(instance) == ([info.pid] if running else [])
    return info


def _hard_reboot(stack, host, name, instance):
    """Nova's hard reboot on ``host``: destroy the domain if it runs, start
    the vTPCM (``lifecycle.ensure_running``), define the domain from fresh
    XML and start it; the guest's report once it answers."""
    conn = host.lab_host.connect()
    try:
        try:
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass  # not defined here
        socket_path = lifecycle.ensure_running(stack.engine_at(host), stack.agents_at(host),
                                               instance, host.name, stack.socket_dirs)
        conn.defineXML(domain.render_domain_xml(
            name, stack.lab.image, socket_path, host.lab_host.serial_path(name),
            domain_uuid=instance)).create()
    finally:
        conn.close()
    with console.GuestConsole(host.lab_host.serial_path(name)) as con:
        con.wait_ready(timeout=120)
        return con.report()


def test_destination_qemu_killed_during_the_copy_leaves_vm_on_source(stack, guest, lab_cell):
    """Lab cell: kill -9 of the destination QEMU while libvirt copies RAM.
    libvirt fails the job and resumes nothing (the source never paused);
    the driver's rollback (``settle``) aborts; no operator."""
    name, instance, before = guest
    a, b = stack.host(stack.lab.a), stack.host(stack.lab.b)
    source_before = stack.agents.get(a.name, instance)
    run = _Migrating(stack, name, a, b)
    killed = None
    try:
        _, incoming = _wait_copying(a, name, instance, stack, b)
        killed = _incoming_qemu(b, name)
        lab_cell.begin("dst_qemu/transfer/kill")
        os.kill(killed, 9)
    finally:
        _, error = run.join()
        lab_cell.converged()
        if killed is not None:
            hosts.kill_pid(killed, timeout=5)  # a no-op unless the kill missed
    assert isinstance(error, LabError), error
    assert stack.engine.get_migration(incoming.migration_id).state == "ABORTED"
    assert _dom_state(a.lab_host, name) == libvirt.VIR_DOMAIN_RUNNING
    assert b.lab_host.qemu_pids() == []
    _same_tpm(before, _report(a.lab_host, name))
    after = _only_on(stack, instance, a, b, running=True)
    assert (after.generation, after.pid) == (source_before.generation, source_before.pid)
    with pytest.raises(exception.NotFound):
        stack.agents.get(b.name, instance)
    assert _vtpcm_files(b, incoming.vtpcm_id) == []
    live.live_migrate(stack, name, a, b)
    _same_tpm(before, _report(b.lab_host, name))
    _only_on(stack, instance, b, a, running=True)
    lab_cell.end("survived", "ABORTED on A by the driver's rollback; guest kept running "
                 "there, TPM unchanged")


def test_source_swtpm_killed_during_the_copy_needs_a_hard_reboot(stack, guest, lab_cell):
    """Lab cell: kill -9 of the source's swtpm while libvirt copies RAM.
    QEMU 7.2's TPM front end fails its pre-save (it cannot get the state
    blobs from a dead swtpm), so the migration fails and the VM stays on the
    source; the driver's rollback aborts (no running swtpm needed: the
    vTPCM is STOPPED); the agent reports the crash to the engine's audit
    (the abort that finds its swtpm dead, or the watchdog's pass if it came
    first) and restarts nothing (QEMU never reconnects). The guest's TPM
    fails every command until the documented hard reboot, which starts
    the vTPCM from its permanent state: NV and EK kept, PCRs fresh."""
    name, instance, before = guest
    a, b = stack.host(stack.lab.a), stack.host(stack.lab.b)
    source_before = stack.agents.get(a.name, instance)
    qemu_log = a.lab_host.qemu_log(name)
    log_from = qemu_log.stat().st_size
    run = _Migrating(stack, name, a, b)
    try:
        _, incoming = _wait_copying(a, name, instance, stack, b)
        assert sorted(_swtpms_of(instance)) == sorted([source_before.pid, incoming.pid])
        lab_cell.begin("src_swtpm/transfer/kill")
        os.kill(source_before.pid, 9)
        conn = a.lab_host.connect()
        try:  # let the copy finish: the switchover's pre-save meets the dead swtpm
            conn.lookupByName(name).migrateSetMaxSpeed(UNCAPPED_MIB)
        except libvirt.libvirtError:
            pass  # the job failed already
        finally:
            conn.close()
    finally:
        _, error = run.join()
        lab_cell.converged()
        hosts.kill_pid(source_before.pid, timeout=5)  # a no-op unless the kill missed
    assert isinstance(error, LabError), error
    # libvirt says only "job 'migration out' unexpectedly failed"; QEMU's log
    # says why: its TPM front end's pre-save, not a broken stream
    said = qemu_log.read_bytes()[log_from:].decode(errors="replace")
    assert "tpm-emulator: could not get state blob type 1" in said, said
    assert "pre-save failed: tpm-emulator" in said, said
    assert stack.engine.get_migration(incoming.migration_id).state == "ABORTED"
    assert _dom_state(a.lab_host, name) == libvirt.VIR_DOMAIN_RUNNING
    assert b.lab_host.qemu_pids() == []
    # the guest runs on, its TPM failing every command
    dead = _report(a.lab_host, name)
    assert (dead["NV"], dead["EK"], dead["BOOTID"]) == ("none", "none", before["BOOTID"])
    assert dead["PCR16"] != before["PCR16"]  # unreadable
    stopped = _only_on(stack, instance, a, b, running=False)
    assert stopped.generation == source_before.generation
    assert _vtpcm_files(b, incoming.vtpcm_id) == []
    deadline = time.monotonic() + WATCHDOG_REPORT_S
    while not [e for e in stack.engine.list_audit(limit=50, host=a.name).entries
               if (e.event, e.outcome, e.instance) == ("vtpcm.swtpm", "not-restarted",
                                                       instance)]:
        assert time.monotonic() < deadline, "the watchdog's report never reached the engine"
        time.sleep(0.2)
    rebooted = _hard_reboot(stack, a, name, instance)  # the documented recovery
    assert (rebooted["NV"], rebooted["EK"]) == (before["NV"], before["EK"])
    assert rebooted["PCR16"] == "0" * 64 != before["PCR16"]
    assert rebooted["BOOTID"] != before["BOOTID"]
    _only_on(stack, instance, a, b, running=True)
    live.live_migrate(stack, name, a, b)
    _same_tpm(rebooted, _report(b.lab_host, name))
    _only_on(stack, instance, b, a, running=True)
    lab_cell.end("operator", "QEMU's pre-save failed, ABORTED on A; guest ran on with a "
                 "failing TPM until its hard reboot: NV, EK kept, PCRs fresh")



def test_destination_qemu_killed_after_the_switchover_commits_there(stack, guest, lab_cell):
    """Lab cell: kill -9 of the destination QEMU after the switchover,
    before the commit. The guest is dead (no host runs it); the commit
    (post_live_migration: libvirt reported success) lands anyway, since the
    incoming swtpm holds the state and still runs (QEMU's death closes its
    control connection only). The vTPCM is then in one place, the
    destination, and the guest's next start there (Nova's hard reboot:
    ``ensure_running``, then the domain) finds its permanent state: NV and
    EK kept, PCRs fresh as after any boot. Nothing lost but the guest's run."""
    name, instance, before = guest
    a, b = stack.host(stack.lab.a), stack.host(stack.lab.b)
    source_before = stack.agents.get(a.name, instance)
    at_a = stack.engine_at(a)
    livemigration.check_destination(stack.engine_at(b), instance, b.name)
    migration_id = str(uuid.uuid4())
    livemigration.begin(at_a, migration_id, instance, a.name, b.name)
    conn_a, conn_b = a.lab_host.connect(), b.lab_host.connect()
    try:
        dom = conn_a.lookupByName(name)
        xml = domain.render_destination_xml(
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
            livemigration.destination_socket(stack.agents_at(a), b.name, instance,
                                             stack.socket_dirs),
            b.lab_host.serial_path(name))
        migrate.migrate(dom, conn_b, b.lab_host.uri, xml, live.free_port(),
                        timeout=CELL_TIMEOUT)
    finally:
        conn_a.close()
        conn_b.close()
    # positive control: the guest runs on the destination with its TPM
    _same_tpm(before, _report(b.lab_host, name))
    incoming = stack.agents.get(b.name, instance)
    qemu = _incoming_qemu(b, name)  # the QEMU libvirt started for the incoming stream
    try:
        lab_cell.begin("dst_qemu/after_switchover/kill")
        os.kill(qemu, 9)
        deadline = time.monotonic() + 30
        while _dom_state(b.lab_host, name) == libvirt.VIR_DOMAIN_RUNNING:
            assert time.monotonic() < deadline, "libvirt never saw its QEMU die"
            time.sleep(0.1)
    finally:
        hosts.kill_pid(qemu, timeout=5)  # a no-op unless the kill missed
    assert stack.engine.get_migration(migration_id).state == "PREPARED"
    info = livemigration.commit(at_a, migration_id)
    # the driver's commit answers once B committed; A's shred follows it
    assert info.state in ("COMMITTED", "SHREDDING"), info.state
    live.wait_committed(at_a, migration_id)
    lab_cell.converged()
    assert _dom_state(b.lab_host, name) != libvirt.VIR_DOMAIN_RUNNING
    with pytest.raises(libvirt.libvirtError):
        _dom_state(a.lab_host, name)  # undefined on the source by libvirt
    landed = _only_on(stack, instance, b, a, running=True)
    assert (landed.vtpcm_id, landed.pid, landed.generation) == \
        (incoming.vtpcm_id, incoming.pid, source_before.generation + 1)
    assert stack.agents.get(a.name, instance).state == "DESTROYED"
    assert _vtpcm_files(a, source_before.vtpcm_id) == []
    rebooted = _hard_reboot(stack, b, name, instance)
    assert (rebooted["NV"], rebooted["EK"]) == (before["NV"], before["EK"])
    assert rebooted["PCR16"] == "0" * 64 != before["PCR16"]
    _only_on(stack, instance, b, a, running=True)
    live.live_migrate(stack, name, b, a)
    _same_tpm(rebooted, _report(a.lab_host, name))
    _only_on(stack, instance, a, b, running=True)
    lab_cell.end("operator", "COMMITTED on B (its swtpm outlives QEMU); the dead guest's "
                 "hard reboot there: NV, EK kept, PCRs fresh")


CROSSING = 4  # guests each way
SMALL_GUEST_MIB = 128


def _keys_of(host, vtpcm_id):
    with HostTPM(host.tpm.tcti) as tpm:
        return KeyStore(host.state_dir / "keys", TPMSealedHostKey(
            tpm, host.state_dir / "hostkey.sealed")).get(vtpcm_id)


def _in_parallel(calls):
    """Start ``calls`` at one instant on threads; their results in order,
    or the first error (every thread is joined, with a bound)."""
    results, errors = [None] * len(calls), []
    gate = threading.Barrier(len(calls))

    def one(i):
        try:
            gate.wait(timeout=60)
            results[i] = calls[i]()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a parallel call never returned"
    if errors:
        raise errors[0]
    return results


def test_eight_guests_cross_at_once(stack):
    """Issue 10 point 6: 4 guests A -> B and 4 guests B -> A live-migrated
    at the same time (small guests). Each lands with its own PCR16, NV and
    EK, at generation 1; the sources' copies are shredded; no incoming or
    outgoing vTPCM is left on either host; no key of any of them, nor a
    secret window of two of their states, is in any log or file."""
    a, b = stack.host(stack.lab.a), stack.host(stack.lab.b)
    plan = [(a, b)] * CROSSING + [(b, a)] * CROSSING
    names = ["vte-x%d-%s" % (i, uuid.uuid4().hex[:4]) for i in range(len(plan))]

    def boot(i):
        src = plan[i][0]
        instance, con = live.boot_guest(stack, src, names[i], memory_mib=SMALL_GUEST_MIB)
        try:
            con.write(os.urandom(32).hex())
            return instance, con.report()
        finally:
            con.close()
    base = Path(tempfile.mkdtemp(prefix="vtpx", dir="/tmp"))
    try:
        booted = _in_parallel([lambda i=i: boot(i) for i in range(len(plan))])
        instances = [instance for instance, _ in booted]
        assert len({r["EK"] for _, r in booted}) == len(plan)  # eight distinct TPMs
        keys, found = [], set()
        for i, (src, _) in enumerate(plan):
            old = stack.agents.get(src.name, instances[i])
            k = _keys_of(src, old.vtpcm_id)
            keys += [("at-rest key of %s" % names[i], k.at_rest_key),
                     ("migration key of %s" % names[i], k.migration_key)]
            if i in (0, len(plan) - 1):  # one state each way: its secret windows
                (base / str(i)).mkdir()
                found |= tpmtools.secrets_of_state(src.state_dir / "vtpcms" / old.vtpcm_id,
                                                   k.at_rest_key, base / str(i))

        ports: set[int] = set()
        while len(ports) < len(plan):  # one migration port each, as Nova's range gives
            ports.add(live.free_port())
        hops = _in_parallel([lambda i=i, port=port: live.live_migrate(
            stack, names[i], *plan[i], port=port) for i, port in enumerate(sorted(ports))])

        for i, (src, dst) in enumerate(plan):
            instance, before = booted[i]
            _same_tpm(before, _report(dst.lab_host, names[i]))
            assert stack.engine.get_migration(hops[i].migration_id).state == "COMMITTED"
            record = stack.engine.get_vtpcm(instance)
            assert (record.host, record.generation, record.migration_id) == (dst.name, 1, None)
            assert stack.agents.get(src.name, instance).state == "DESTROYED"
            moved = stack.agents.get(dst.name, instance)
            assert (moved.state, moved.generation, moved.running) == ("ACTIVE", 1, True)
            keys.append(("fresh at-rest key of %s" % names[i],
                         _keys_of(dst, moved.vtpcm_id).at_rest_key))
        # no orphan: each host holds live only what the engine places there
        for host in (a, b):
            for info in stack.agents.list(host.name).vtpcms:
                if info.instance_uuid in instances:
                    expected = "ACTIVE" if stack.engine.get_vtpcm(
                        info.instance_uuid).host == host.name else "DESTROYED"
                    assert info.state == expected, (host.name, info)
        files = [stack.engine_daemon.log_file]
        for host in (a, b):
            files += [host.agent.log_file, host.lab_host.log_file,
                      *(host.lab_host.qemu_log(n) for n in names),
                      *tpmtools.files(host.state_dir)]
        haystack = leakscan.SEP.join(f.read_bytes() for f in files if f.is_file())
        leakscan.assert_finds(keys, found, haystack)
        assert leakscan.hits(keys, haystack) == []
        assert leakscan.window_hits(found, haystack) == 0
        print("\nCROSSING %d guests of %d MiB: libvirt %s s, protocol %s s" % (
            len(plan), SMALL_GUEST_MIB,
            sorted(round(h.libvirt.total_s, 1) for h in hops),
            sorted(round(h.protocol_s, 2) for h in hops)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
        _destroy_guests(stack.lab)


def test_untrusted_destination_gets_no_key_and_vm_stays(stack, guest):
    """Last in the file: host B stays UNTRUSTED afterwards."""
    name, instance, before = guest
    a, b = stack.host(stack.lab.a), stack.host(stack.lab.b)
    source_before = stack.agents.get(a.name, instance)
    sealed_before = agent_seals(a.agent, instance)
    with HostTPM(b.tpm.tcti) as tpm:
        tpm.extend_pcr(5, hashlib.sha256(b"unexpected bootloader").digest())
    stack.engine.attest(b.name)
    with pytest.raises(exception.HostNotTrusted) as err:
        live.live_migrate(stack, name, a, b)
    assert "PCR 5" in str(err.value)
    # begin itself re-checks (the scheduler or the pre-check may be bypassed)
    with pytest.raises(exception.HostNotTrusted):
        stack.engine_at(a).begin(str(uuid.uuid4()), instance, a.name, b.name)
    assert agent_seals(a.agent, instance) == sealed_before  # no key sealed for b
    with pytest.raises(exception.NotFound):
        stack.agents.get(b.name, instance)
    after = stack.agents.get(a.name, instance)
    assert (after.state, after.generation, after.pid, after.migration_id) == \
        ("ACTIVE", source_before.generation, source_before.pid, None)
    assert _dom_state(a.lab_host, name) == libvirt.VIR_DOMAIN_RUNNING
    _same_tpm(before, _report(a.lab_host, name))
    refusals = [e for e in stack.engine.list_audit(limit=50, host=b.name).entries
                if e.outcome == "refused"]
    assert refusals and any("PCR 5" in e.detail for e in refusals)
