"""The post-import check's stream digests (agent API 1.13, ``[agent]
ctrl_proxy``) with REAL swtpm 0.7.1, the agent's own proxies (each run as
its swtpm's uid) and two InstanceManagers: QEMU's part (pre-save on the
source, post-load on the destination) goes through each VM's public
control socket, as QEMU's does.

Shown: the same blobs on both sides give equal stream digests; the pairing
a stream writer can make with swtpm 0.7.1 alone (review HIGH 2: today's
permanent blob with an earlier volatile one of the same key epoch) passes
the permanent-state digest (positive control) but not the stream digest;
a second import through the public socket is refused and makes the
destination's answer "refused"; the swtpm's own socket is its uid's alone
and the public path leads to the proxy; the proxy outlives an agent
restart and is adopted by it.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

from tests.functional import tpmtools
from tests.functional.agent.test_state_digest import (
    WAIT,
    Host,
    _simulate_crash,
    _tear_down,
    _wait_captured,
)
from tests.functional.agent.test_state_digest import _stop_all as state_digest_stop_all
from tests.functional.hosttpm_fixture import (  # noqa: F401
    TEST_KEY_AUTH,
    HostTPMStandIn,
    host_tpm_standin,
)
from tests.refusal import refused
from vtpcm_agent import association, instances, sealing
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.keystore import DevKeyFileHostKey, KeyStore
from vtpcm_agent.swtpm import ctrl, ctrlproxy, process, proxyctl, uidprocs
from vtpcm_common import exception

pytestmark = pytest.mark.functional

OWN_UIDS = {"src": (1953000000, 1953000009), "dst": (1953000010, 1953000019)}
assert WAIT > 0


def _manager(root: Path, name: str, host_tpm: HostTPM | None) -> instances.InstanceManager:
    settings = instances.AgentSettings(
        host=name, state_root=root / "state", run_dir=root / "run", create_ek=False,
        # the source's guest writes through a data socket; the destination
        # is as in production (QEMU passes its data channel, SET_DATAFD)
        expose_data_socket=name == "src", swtpm_uids=OWN_UIDS[name], ctrl_proxy=True)
    settings.state_root.mkdir(exist_ok=True)
    assoc = association.AssociationList(settings.state_root / "associations.sqlite")
    keys = KeyStore(settings.state_root / "keys", DevKeyFileHostKey(root / "hostkey"))
    return instances.InstanceManager(settings, assoc, keys, host_tpm)


def _stop_all(manager: instances.InstanceManager) -> None:
    """test_state_digest's, then the proxies found before (each exits with
    its swtpm; one that did not is stopped by pid)."""
    records = [manager.proxy_record(r.instance_uuid) for r in manager.list_vtpcms()]
    proxies = [(proxyctl.find(record), record) for record in records]
    state_digest_stop_all(manager)
    for pid, record in proxies:
        if pid is not None:
            proxyctl.stop(pid, record, timeout=5.0)


@pytest.fixture
def hosts(short_dir: Path, tmp_path: Path,
          host_tpm_standin: HostTPMStandIn) -> Iterator[tuple[Host, Host]]:  # noqa: F811
    os.chmod(short_dir, 0o711)  # noqa: S103  (the swtpm uids traverse it)
    (short_dir / "s").mkdir()
    (short_dir / "d").mkdir()
    made: list[Host] = []
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH,
                 key_file=tmp_path / "hostkeys.tpm") as tpm:
        try:
            made.append(Host("src", short_dir / "s", None,
                             _manager(short_dir / "s", "src", None)))
            made.append(Host("dst", short_dir / "d", tpm,
                             _manager(short_dir / "d", "dst", tpm)))
            yield made[0], made[1]
        finally:
            _tear_down(made, _stop_all)


def _paths(host: Host, instance: str) -> process.SwtpmPaths:
    return host.manager.paths(instance, host.manager.get(instance).vtpcm_id)


def _qemu(host: Host, instance: str) -> process.SwtpmPaths:
    """The paths as QEMU sees them: its control channel is the public path."""
    return replace(_paths(host, instance),
                   ctrl_socket=host.manager.public_ctrl_socket(instance))


def _source(src: Host) -> str:
    instance = str(uuid.uuid4())
    src.manager.create(instance)
    src.manager.start(instance)
    tpmtools.write_guest_state(_paths(src, instance), os.urandom(32), os.urandom(32),
                               make_key=False)
    return instance


def _prepare(src: Host, dst: Host, instance: str) -> sealing.SealContext:
    ctx = sealing.SealContext(migration_id=str(uuid.uuid4()), instance_uuid=instance,
                              generation=src.manager.get(instance).generation,
                              source_host=src.name, dest_host=dst.name)
    assert dst.host_tpm is not None
    envelope = src.manager.seal_migration_key(ctx, dst.host_tpm.identity(b"").kem_public)
    dst.manager.prepare_incoming(ctx, envelope)
    return ctx


def _post_load(paths: process.SwtpmPaths, blobs: list[ctrl.StateBlob]) -> None:
    """QEMU 7.2's post-load: empty blobs (a TPM 2's savestate) are not sent."""
    tpmtools.qemu_post_load(paths, [b for b in blobs if b.data])


def _extend_pcr(paths: process.SwtpmPaths) -> None:
    """A guest's PCR extend: volatile state only (no NV write)."""
    with tpmtools.esapi(paths) as esys:
        digests = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                                              digest=TPMU_HA(sha256=os.urandom(32)))])
        esys.pcr_extend(ESYS_TR.PCR16, digests)


def _ask(host: Host, ctx: sealing.SealContext, side: str,
         nonce: bytes) -> instances.StateDigests:
    return host.manager.state_digest(ctx, side, nonce, streams=True)


def test_a_live_migration_through_the_proxies_gives_equal_stream_digests(hosts):
    src, dst = hosts
    instance = _source(src)
    # the public path leads to the proxy; swtpm's own socket is its uid's alone
    public = src.manager.public_ctrl_socket(instance)
    assert Path(os.readlink(public)) == src.manager.proxy_socket(instance)
    uid = src.manager.associations.uid_of(instance)
    own = os.stat(_paths(src, instance).ctrl_socket)
    assert (stat.S_IMODE(own.st_mode), own.st_uid, own.st_gid) == (0o600, uid, uid)
    proxy_pid = proxyctl.find(src.manager.proxy_record(instance))
    assert proxy_pid is not None and uidprocs.pin(proxy_pid) is not None
    assert os.stat("/proc/%d" % proxy_pid).st_uid == uid

    ctx = _prepare(src, dst, instance)
    _post_load(_qemu(dst, instance), tpmtools.qemu_pre_save(_qemu(src, instance)))
    _wait_captured(dst, instance)
    nonce = os.urandom(32)
    source, dest = _ask(src, ctx, "source", nonce), _ask(dst, ctx, "destination", nonce)
    assert source.stream_reason == dest.stream_reason == ""
    assert source.stream is not None and source.stream == dest.stream
    assert source.digest == dest.digest
    assert _ask(src, ctx, "source", os.urandom(32)).stream != source.stream  # keyed


def test_an_older_volatile_blob_passes_the_permanent_digest_but_not_the_stream_digest(hosts):
    src, dst = hosts
    instance = _source(src)
    src_qemu = _qemu(src, instance)
    old = tpmtools.qemu_pre_save(src_qemu)
    _extend_pcr(_paths(src, instance))  # the guest measures something: PCR16 moves
    new = tpmtools.qemu_pre_save(src_qemu)
    ctx = _prepare(src, dst, instance)
    # today's permanent blob, yesterday's volatile one (same key epoch)
    _post_load(_qemu(dst, instance), [new[0], old[1]])
    _wait_captured(dst, instance)
    nonce = os.urandom(32)
    source, dest = _ask(src, ctx, "source", nonce), _ask(dst, ctx, "destination", nonce)
    assert source.digest == dest.digest  # the permanent check alone passes it
    assert source.stream is not None and dest.stream is not None
    assert source.stream != dest.stream  # seen equal when both sides digested "got"


def test_a_second_import_through_the_public_socket_is_refused(hosts):
    src, dst = hosts
    instance = _source(src)
    blobs = tpmtools.qemu_pre_save(_qemu(src, instance))
    ctx = _prepare(src, dst, instance)
    dst_qemu = _qemu(dst, instance)
    _post_load(dst_qemu, blobs)
    _wait_captured(dst, instance)
    with ctrl.CtrlClient(dst_qemu.ctrl_socket) as client:
        client.stop()
        with refused(exception.CtrlChannelError,
                     "swtpm control channel SET_STATEBLOB failed: swtpm returned "
                     "0x00000003 TPM_BAD_PARAMETER"):
            client.set_stateblob(blobs[1].blob_type, blobs[1].data, blobs[1].flags)
    answer = _ask(dst, ctx, "destination", os.urandom(32))
    assert answer.digest is None and answer.stream is None
    assert answer.reason == answer.stream_reason == (
        instances.PROXY_REFUSED + ": SET_STATEBLOB volatile after the TPM started: state "
        "is set only before the first INIT (one import per swtpm)")
    record = ctrlproxy.read_record(dst.manager.proxy_record(instance))
    assert record is not None and record["refused_count"] == 1


def test_the_proxy_outlives_an_agent_restart_and_is_adopted(hosts):
    src, dst = hosts
    instance = _source(src)
    record = src.manager.proxy_record(instance)
    before = proxyctl.find(record)
    _simulate_crash(src)
    src.manager.associations.close()
    src.manager = _manager(src.root, src.name, None)
    assert instance in src.manager.recover()["adopted"]
    assert proxyctl.find(record) == before  # the same process, not a new one
    blobs = tpmtools.qemu_pre_save(_qemu(src, instance))
    assert len(blobs[0].data) > 0
    got = ctrlproxy.read_record(record)
    assert got is not None and set(got["got"]) == {"1", "2"}


def test_a_stream_after_the_agents_own_import_is_refused(hosts):
    """A source that signs a transfer during a live migration (the engine
    then carries the blobs, cold): the incoming swtpm's open proxy is
    replaced by a closed one, so the destination QEMU's later stream import
    fails instead of passing unchecked (review of the agent side, LOW 2)."""
    src, dst = hosts
    instance = _source(src)
    blobs = tpmtools.qemu_pre_save(_qemu(src, instance))
    ctx = _prepare(src, dst, instance)
    record = dst.manager.proxy_record(instance)
    opened = ctrlproxy.read_record(record)
    assert opened is not None and opened["closed"] is False  # waiting for the stream
    _, exported = src.manager.export_state(instance)
    dst.manager.import_state(instance, ctx.migration_id, ctx.generation, exported)
    closed = ctrlproxy.read_record(record)
    assert closed is not None and closed["closed"] is True
    assert closed["proxy_pid"] != opened["proxy_pid"]
    with ctrl.CtrlClient(_qemu(dst, instance).ctrl_socket) as client:
        client.stop()
        with refused(exception.CtrlChannelError,
                     "swtpm control channel SET_STATEBLOB failed: swtpm returned "
                     "0x00000003 TPM_BAD_PARAMETER"):
            client.set_stateblob(blobs[0].blob_type, blobs[0].data, blobs[0].flags)


def test_only_an_incoming_swtpm_waiting_for_its_stream_takes_state(hosts):
    src, _ = hosts
    instance = _source(src)
    running = ctrlproxy.read_record(src.manager.proxy_record(instance))
    assert running is not None and running["closed"] is True
    blobs = tpmtools.qemu_pre_save(_qemu(src, instance))
    with ctrl.CtrlClient(_qemu(src, instance).ctrl_socket) as client:
        client.stop()  # a STOP that succeeds: only the closed proxy refuses
        with refused(exception.CtrlChannelError,
                     "swtpm control channel SET_STATEBLOB failed: swtpm returned "
                     "0x00000003 TPM_BAD_PARAMETER"):
            client.set_stateblob(blobs[0].blob_type, blobs[0].data, blobs[0].flags)


def test_a_stream_without_its_volatile_blob_fails_the_destination(hosts):
    """A stream writer sets the volatile blob's size to 0: QEMU sets only
    the permanent one and starts the TPM without volatile state. The
    permanent digests agree (positive control); the destination answers
    none, so the check fails whatever require_stream_check says (review of
    the proxy, HIGH 2)."""
    src, dst = hosts
    instance = _source(src)
    blobs = tpmtools.qemu_pre_save(_qemu(src, instance))
    ctx = _prepare(src, dst, instance)
    _post_load(_qemu(dst, instance), [blobs[0]])
    _wait_captured(dst, instance)
    nonce = os.urandom(32)
    assert _ask(src, ctx, "source", nonce).stream is not None
    source = _ask(src, ctx, "source", nonce)
    dest = _ask(dst, ctx, "destination", nonce)
    assert source.digest is not None and dest.digest is None
    assert dest.reason == dest.stream_reason == (
        instances.PROXY_INCOMPLETE + ": the destination's QEMU set no permanent and "
        "volatile blob through the proxy")


def test_an_agent_restart_keeps_a_migrated_vms_proxy_and_its_qemu_connection(hosts):
    """QEMU never reconnects: the restarted agent adopts the proxy as it is,
    before and after the commit (review round 2, HIGH: it was replaced by a
    closed one, cutting the channel and failing the check)."""
    src, dst = hosts
    instance = _source(src)
    blobs = tpmtools.qemu_pre_save(_qemu(src, instance))
    ctx = _prepare(src, dst, instance)
    record = dst.manager.proxy_record(instance)
    with ctrl.CtrlClient(_qemu(dst, instance).ctrl_socket) as qemu:  # held open, as QEMU
        qemu.stop()
        for blob in blobs:
            if blob.data:
                qemu.set_stateblob(blob.blob_type, blob.data, blob.flags)
        qemu.init(delete_volatile=True)
        _wait_captured(dst, instance)
        before = proxyctl.find(record)
        for step in ("before the commit", "after the commit"):
            _simulate_crash(dst)
            dst.manager.associations.close()
            dst.manager = _manager(dst.root, dst.name, dst.host_tpm)
            assert instance in dst.manager.recover()["adopted"], step
            assert proxyctl.find(record) == before, step
            assert qemu.get_capability() > 0, step  # the same connection still works
            if step == "before the commit":
                nonce = os.urandom(32)
                source = _ask(src, ctx, "source", nonce)
                dest = _ask(dst, ctx, "destination", nonce)
                assert source.stream is not None and source.stream == dest.stream
                dst.manager.commit_incoming(ctx)


def test_no_client_reaches_swtpm_while_the_agent_imports(hosts, monkeypatch):
    """A client STOPs through the open proxy and leaves; while the agent
    imports (and starts the TPM) directly, a client through the public path
    must not get through at all (review round 3: it reached the closed
    proxy, round 2: the open one, and a SET whose tail swtpm reads as
    commands then hit a running TPM); after the import only a closed
    proxy answers."""
    src, dst = hosts
    instance = _source(src)
    blobs = tpmtools.qemu_pre_save(_qemu(src, instance))
    ctx = _prepare(src, dst, instance)
    public = _qemu(dst, instance).ctrl_socket
    with ctrl.CtrlClient(public) as client:
        client.stop()
    real_import = instances.ctrl.import_state
    during: list[str] = []

    def racing_import(*args: object, **kwargs: object) -> object:
        try:
            with ctrl.CtrlClient(public, timeout=1.0) as client:
                client.stop()
            during.append("reached swtpm")
        except exception.CtrlChannelError as exc:
            during.append("refused: " + exc.message)
        return real_import(*args, **kwargs)

    monkeypatch.setattr(instances.ctrl, "import_state", racing_import)
    _, exported = src.manager.export_state(instance)
    dst.manager.import_state(instance, ctx.migration_id, ctx.generation, exported)
    assert len(during) == 1 and during[0].startswith("refused: "), during  # no listener
    with ctrl.CtrlClient(public) as client:
        with refused(exception.CtrlChannelError,
                     "swtpm control channel SET_STATEBLOB failed: swtpm returned "
                     "0x00000003 TPM_BAD_PARAMETER"):
            client.set_stateblob(blobs[0].blob_type, blobs[0].data, blobs[0].flags)
    record = ctrlproxy.read_record(dst.manager.proxy_record(instance))
    assert record is not None and record["refused"] == [
        "SET_STATEBLOB permanent into a swtpm that takes no stream (not an incoming one "
        "waiting for its state)"]


def test_a_data_channel_passed_before_the_agents_import_dies_with_the_old_swtpm(hosts):
    """A client of the open proxy hands the incoming swtpm a data channel
    (SET_DATAFD) and leaves; the agent then imports: it does so into a
    fresh swtpm, so that channel reaches nothing and the guest's QEMU gets
    its own (review round 4, MEDIUM 1: the stray kept the migrated TPM,
    QEMU's SET_DATAFD got TPM_IOERROR)."""
    import socket
    import struct

    src, dst = hosts
    instance = _source(src)
    ctx = _prepare(src, dst, instance)
    public = _qemu(dst, instance).ctrl_socket

    def set_datafd() -> tuple[bytes, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.settimeout(5)
            control.connect(str(public))
            socket.send_fds(control, [struct.pack(">I", 0x10)], [theirs.fileno()])
            theirs.close()
            result = control.recv(4)
        ours.settimeout(5)
        return result, ours

    result, stray = set_datafd()
    assert result == b"\0\0\0\0"  # positive control: the open proxy passed it on
    _, exported = src.manager.export_state(instance)
    dst.manager.import_state(instance, ctx.migration_id, ctx.generation, exported)
    with stray:
        try:
            stray.sendall(bytes.fromhex("80010000000c0000017b0008"))  # TPM2_GetRandom
            answer = stray.recv(64)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        assert answer == b""  # its swtpm is gone (seen answering before the fix)
    result, data = set_datafd()
    with data:
        assert result == b"\0\0\0\0"  # the guest's QEMU gets the data channel


def test_a_stream_landing_as_the_agent_imports_is_refused_and_fails_the_check(hosts,
                                                                              monkeypatch):
    """The stream's import lands while the agent stops the proxy (a source
    that signed a transfer during its live migration): the agent's import
    is refused, nothing is wiped, and the destination's check cannot pass."""
    src, dst = hosts
    instance = _source(src)
    blobs = tpmtools.qemu_pre_save(_qemu(src, instance))
    ctx = _prepare(src, dst, instance)
    real_stop = dst.manager._stop_proxy

    def stream_lands_first(assoc: object) -> None:
        _post_load(_qemu(dst, instance), blobs)
        real_stop(assoc)  # type: ignore[arg-type]

    monkeypatch.setattr(dst.manager, "_stop_proxy", stream_lands_first)
    _, exported = src.manager.export_state(instance)
    vtpcm = dst.manager.get(instance).vtpcm_id
    with refused(exception.StateImportError, "Importing state into vTPCM %s failed: this "
                 "vTPCM already holds state" % vtpcm):
        dst.manager.import_state(instance, ctx.migration_id, ctx.generation, exported)
    incoming = _paths(dst, instance)
    assert (incoming.state_dir / instances.PERMANENT_STATE_FILE).exists()  # not wiped
    assert dst.manager.is_running(dst.manager.get(instance))
    answer = _ask(dst, ctx, "destination", os.urandom(32))
    assert answer.digest is None and answer.reason.startswith(instances.PROXY_INCOMPLETE)
    record = ctrlproxy.read_record(dst.manager.proxy_record(instance))
    assert proxyctl.find(dst.manager.proxy_record(instance)) is not None
    assert record is not None and record["closed"] is True
    assert record["swtpm_pid"] == dst.manager.get(instance).pid


def test_bad_blobs_are_refused_before_the_incoming_swtpm_is_touched(hosts):
    src, dst = hosts
    instance = _source(src)
    ctx = _prepare(src, dst, instance)
    before = dst.manager.get(instance).pid
    proxy = proxyctl.find(dst.manager.proxy_record(instance))
    assert proxy is not None
    _, exported = src.manager.export_state(instance)
    with refused(exception.StateImportError, "Importing state into vTPCM %s failed: Invalid "
                 "input: volatile blob is empty" % dst.manager.get(instance).vtpcm_id):
        dst.manager.import_state(instance, ctx.migration_id, ctx.generation,
                                 replace(exported, volatile=b""))
    assert dst.manager.get(instance).pid == before
    assert proxyctl.find(dst.manager.proxy_record(instance)) == proxy  # still open


def test_the_guests_start_brings_back_a_missing_proxy(hosts):
    src, dst = hosts
    instance = _source(src)
    ctx = _prepare(src, dst, instance)
    _, exported = src.manager.export_state(instance)
    dst.manager.import_state(instance, ctx.migration_id, ctx.generation, exported)
    record = dst.manager.proxy_record(instance)
    found = proxyctl.find(record)
    assert found is not None
    proxyctl.stop(found, record, timeout=5.0)  # as if it had failed to start
    assert proxyctl.find(record) is None
    dst.manager.start(instance)
    restarted = ctrlproxy.read_record(record)
    assert proxyctl.find(record) is not None and restarted is not None
    assert restarted["closed"] is True
    assert restarted["swtpm_pid"] == dst.manager.get(instance).pid
