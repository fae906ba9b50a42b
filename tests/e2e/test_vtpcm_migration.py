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
from tests.functional import tpmtools
from tests.functional.harness import agent_seals
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.keystore import KeyStore, TPMSealedHostKey
from vtpcm_agent.swtpm.keypipe import key_pipe
from vtpcm_common import exception
from vtpcm_lab import console, domain, hosts, live, migrate, proxy
from vtpcm_lab.exception import LabError
from vtpcm_lab.stack import SWTPM_UID_RANGES, Stack

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
    for hop in (there, back):
        assert stack.engine.get_migration(hop.migration_id).state == "COMMITTED"
        assert hop.protocol_s < hop.libvirt.total_s
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
