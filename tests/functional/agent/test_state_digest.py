"""The post-import check's digests (API 1.12, ``state_digest``) with REAL
swtpm 0.7.1 and a host-TPM stand-in: two InstanceManagers (source host,
destination host), a live migration's state set into the destination's
incoming swtpm as QEMU 7.2 sets it (SET_STATEBLOB + INIT: the agent never
sees it).

Shown: equal digests for the same nonce, different for another; a rolled
back stream (older blobs under the same migration key, or plaintext blobs)
gives different digests; the destination's digest is of its swtpm's FIRST
write, so a guest NV write after the import does not change it; a second
write before the capture reads the first makes it ambiguous; the watch
goes on after the capture, and a second import (or a TPM reset) after it
makes it no answer; a capture older than an agent restart is no answer, a
restart before the import re-arms, a state that arrived while the agent
was down is answered as lost; commit and abort remove the capture and end
the watch.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.functional import tpmtools
from tests.functional.agent.conftest import _kill_hard
from tests.functional.hosttpm_fixture import (  # noqa: F401
    TEST_KEY_AUTH,
    HostTPMStandIn,
    host_tpm_standin,
)
from tests.refusal import refused
from vtpcm_agent import association, instances, sealing
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.keystore import DevKeyFileHostKey, KeyStore
from vtpcm_agent.swtpm import ctrl, firstwrite, permall, process
from vtpcm_common import exception

pytestmark = pytest.mark.functional

# swtpm uids reserved for these tests (outside systemd's and subuid ranges),
# one range per host: a host kills and sweeps the uids of its range
OWN_UIDS = {"src": (1952000000, 1952000009), "dst": (1952000010, 1952000019)}
WAIT = 10.0


@dataclass
class Host:
    name: str
    root: Path
    host_tpm: HostTPM | None
    manager: instances.InstanceManager

    def settings(self) -> instances.AgentSettings:
        return self.manager.settings


def _manager(root: Path, name: str, host_tpm: HostTPM | None,
             own_uids: bool = False) -> instances.InstanceManager:
    settings = instances.AgentSettings(
        host=name, state_root=root / "state", run_dir=root / "run", create_ek=False,
        expose_data_socket=True, swtpm_uids=OWN_UIDS[name] if own_uids else None)
    settings.state_root.mkdir(exist_ok=True)
    assoc = association.AssociationList(settings.state_root / "associations.sqlite")
    keys = KeyStore(settings.state_root / "keys", DevKeyFileHostKey(root / "hostkey"))
    return instances.InstanceManager(settings, assoc, keys, host_tpm)


def _every(steps: Iterable[Callable[[], object]]) -> None:
    """Run every step, also after one that failed, then raise the first
    error (teardown: an error that ended the loop left swtpms running)."""
    errors: list[BaseException] = []
    for step in steps:
        try:
            step()
        except BaseException as err:  # noqa: BLE001 - raised after the others ran
            errors.append(err)
    if errors:
        raise errors[0]


def _stop_one(manager: instances.InstanceManager, record: association.Association) -> None:
    paths = manager.paths(record.instance_uuid, record.vtpcm_id)
    pid = process.find_running(paths) or record.pid
    if pid is not None:
        try:
            process.stop(pid, paths, timeout=6.0)
        finally:
            _kill_hard(pid, paths)


def _stop_all(manager: instances.InstanceManager) -> None:
    """Every vTPCM's swtpm stopped, also after one whose stop failed."""
    _every(lambda r=record: _stop_one(manager, r) for record in manager.list_vtpcms())


def _simulate_crash(host: Host) -> None:
    """The agent process goes away: its watch threads with it (files and
    swtpm processes stay)."""
    for watch in list(host.manager._watches.values()):
        assert watch.stop(WAIT)
    host.manager._watches.clear()


def _tear_down(made: list[Host],
               stop_all: Callable[[instances.InstanceManager], None] | None = None) -> None:
    """Every host's swtpms stopped and its list closed, even when a step
    fails for one (an assert that ended the loop left the other host's
    setsid'd swtpms running past the run)."""
    _every(step for host in made
           for step in (lambda h=host: _simulate_crash(h),
                        lambda h=host: (stop_all or _stop_all)(h.manager),
                        host.manager.associations.close))


def _restart(host: Host) -> dict[str, list[str]]:
    _simulate_crash(host)
    host.manager.associations.close()
    host.manager = _manager(host.root, host.name, host.host_tpm,
                            host.manager.settings.swtpm_uids is not None)
    return host.manager.recover()


@pytest.fixture
def hosts(request: pytest.FixtureRequest, short_dir: Path, tmp_path: Path,
          host_tpm_standin: HostTPMStandIn) -> Iterator[tuple[Host, Host]]:  # noqa: F811
    """Source and destination; ``own_uids`` (indirect parameter): each
    swtpm runs as a uid of its own, as in production."""
    own = getattr(request, "param", "agent-uid") == "own-uids"
    if own:
        os.chmod(short_dir, 0o711)  # noqa: S103  (the swtpm uids traverse it)
    (short_dir / "s").mkdir()
    (short_dir / "d").mkdir()
    made: list[Host] = []
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH,
                 key_file=tmp_path / "hostkeys.tpm") as tpm:
        try:
            made.append(Host("src", short_dir / "s", None,
                             _manager(short_dir / "s", "src", None, own)))
            made.append(Host("dst", short_dir / "d", tpm,
                             _manager(short_dir / "d", "dst", tpm, own)))
            yield made[0], made[1]
        finally:
            _tear_down(made)


def _source(src: Host) -> tuple[str, bytes]:
    """A running source vTPCM with guest state (NV index, PCR, key)."""
    instance = str(uuid.uuid4())
    src.manager.create(instance)
    src.manager.start(instance)
    nv = os.urandom(32)
    tpmtools.write_guest_state(_paths(src, instance), nv, os.urandom(32), make_key=True)
    return instance, nv


def _paths(host: Host, instance: str) -> process.SwtpmPaths:
    record = host.manager.get(instance)
    return host.manager.paths(instance, record.vtpcm_id)


def _prepare(src: Host, dst: Host, instance: str) -> sealing.SealContext:
    generation = src.manager.get(instance).generation
    ctx = sealing.SealContext(migration_id=str(uuid.uuid4()), instance_uuid=instance,
                              generation=generation, source_host=src.name,
                              dest_host=dst.name)
    assert dst.host_tpm is not None
    kem = dst.host_tpm.identity(b"").kem_public
    envelope = src.manager.seal_migration_key(ctx, kem)
    dst.manager.prepare_incoming(ctx, envelope)
    return ctx


# QEMU's pre-save on the source and post-load on the destination
_stream = tpmtools.qemu_pre_save
_set = tpmtools.qemu_post_load


def _digest(host: Host, ctx: sealing.SealContext, side: str,
            nonce: bytes) -> tuple[bytes | None, str]:
    return host.manager.state_digest(ctx, side, nonce)[:2]


def _both(src: Host, dst: Host, ctx: sealing.SealContext,
          nonce: bytes) -> tuple[bytes | None, bytes | None]:
    source, reason = _digest(src, ctx, "source", nonce)
    assert source is not None and reason == ""
    dest, reason = _digest(dst, ctx, "destination", nonce)
    assert reason == ""
    return source, dest


def _nv_write(paths: process.SwtpmPaths) -> bytes:
    data = os.urandom(32)
    with tpmtools.esapi(paths) as esys:
        esys.nv_write(esys.tr_from_tpmpublic(tpmtools.NV_INDEX), data)
    return data


def _captures(host: Host) -> list[str]:
    return sorted(p.name for p in (host.settings().state_root / instances.CAPTURES).iterdir())


def _wait_captured(host: Host, instance: str) -> None:
    watch = host.manager._watches[host.manager.get(instance).vtpcm_id]
    assert watch.done.wait(WAIT)


@pytest.mark.parametrize("hosts", ["agent-uid", "own-uids"], indirect=True)
def test_digests_match_for_a_faithful_transfer_and_ignore_later_guest_writes(hosts):
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    incoming = _paths(dst, instance)
    # before the import: nothing to tell
    assert _digest(dst, ctx, "destination", os.urandom(32)) == (
        None, "no write of the permanent state seen yet")
    _set(incoming, _stream(_paths(src, instance)))
    _wait_captured(dst, instance)
    vtpcm_id = dst.manager.get(instance).vtpcm_id
    assert _captures(dst) == [vtpcm_id + ".permall"]
    mode = os.stat(dst.settings().state_root / instances.CAPTURES / (vtpcm_id + ".permall"))
    assert (mode.st_mode & 0o777, mode.st_uid) == (0o600, os.getuid())
    # the agent's own directory: no swtpm uid can write (or list) it
    mode = os.stat(dst.settings().state_root / instances.CAPTURES)
    assert (mode.st_mode & 0o777, mode.st_uid) == (0o700, os.getuid())
    if dst.settings().swtpm_uids is not None:
        assert incoming.state_dir.stat().st_uid == dst.manager.associations.uid_of(instance)

    nonce, other = os.urandom(32), os.urandom(32)
    source, dest = _both(src, dst, ctx, nonce)
    assert source == dest
    assert _both(src, dst, ctx, other)[0] != source  # keyed by the nonce
    # the guest writes NV at the destination: its swtpm's file changes ...
    key = dst.manager.keystore.get(vtpcm_id).at_rest_key
    before = permall.decrypt_state_file(
        (incoming.state_dir / instances.PERMANENT_STATE_FILE).read_bytes(), key)
    _nv_write(incoming)
    after = permall.decrypt_state_file(
        (incoming.state_dir / instances.PERMANENT_STATE_FILE).read_bytes(), key)
    assert after != before
    # ... but not the digest of what it imported (seen failing when the
    # destination digested its current file); the source's is stable
    assert _both(src, dst, ctx, nonce) == (source, source)

    # commit: the capture goes, the watch has ended
    watch = dst.manager._watches[vtpcm_id]
    dst.manager.commit_incoming(ctx)
    assert not watch.alive() and vtpcm_id not in dst.manager._watches
    assert _captures(dst) == []
    with refused(exception.MigrationError,
                 "vTPCM migration %s failed: vTPCM of instance %s is ACTIVE in migration "
                 "%s, expected MIGRATING_IN" % (ctx.migration_id, instance, ctx.migration_id)):
        _digest(dst, ctx, "destination", nonce)


def test_a_rolled_back_stream_gives_another_digest(hosts, short_dir):
    """Planted rollback (positive control): blobs the source gave before a
    guest NV write, under the same migration key, which swtpm 0.7.1 takes."""
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    old = _stream(_paths(src, instance))
    _nv_write(_paths(src, instance))
    _set(_paths(dst, instance), old)
    _wait_captured(dst, instance)
    nonce = os.urandom(32)
    source, dest = _both(src, dst, ctx, nonce)
    assert dest is not None and source != dest


def test_a_plaintext_rollback_gives_another_digest(hosts, short_dir):
    """A forged plaintext stream of an older state (swtpm 0.7.1 takes it
    despite its migration key)."""
    src, dst = hosts
    instance, _ = _source(src)
    src_paths = _paths(src, instance)
    at_rest = src.manager.keystore.get(src.manager.get(instance).vtpcm_id).at_rest_key
    plain = tpmtools.plaintext_blobs(src_paths.state_dir, at_rest, short_dir)
    assert not ctrl.parse_blob_header(plain[0].data).migration_encrypted
    ctx = _prepare(src, dst, instance)
    _nv_write(src_paths)
    _set(_paths(dst, instance), [*plain, ctrl.StateBlob(ctrl.BlobType.SAVESTATE, 0, b"")])
    _wait_captured(dst, instance)
    source, dest = _both(src, dst, ctx, os.urandom(32))
    assert dest is not None and source != dest


def test_a_second_write_before_the_capture_reads_is_no_answer(hosts):
    """The guest's NV write lands between the import's write and the
    capture's read (driven through the capture's opener): the destination
    cannot tell which write it read."""
    src, dst = hosts
    instance, _ = _source(src)

    def late(path: Path) -> bytes:
        _nv_write(_paths(dst, instance))
        return firstwrite.read_state_file(path)

    dst.manager.capture_opener = late
    ctx = _prepare(src, dst, instance)
    _set(_paths(dst, instance), _stream(_paths(src, instance)))
    _wait_captured(dst, instance)
    assert _digest(dst, ctx, "destination", os.urandom(32)) == (
        None, "2 writes of tpm2-00.permall before the first could be read")


def test_a_restart_after_the_capture_is_no_answer_and_one_before_the_import_rearms(hosts):
    src, dst = hosts
    nonce = os.urandom(32)
    # captured, then the agent restarts: no answer, since an import while
    # it was down cannot be excluded (seen failing before: the capture was
    # answered after the restart)
    first, _ = _source(src)
    ctx1 = _prepare(src, dst, first)
    _set(_paths(dst, first), _stream(_paths(src, first)))
    _wait_captured(dst, first)
    # restarted before the import: watched again by recover
    second, _ = _source(src)
    ctx2 = _prepare(src, dst, second)
    _restart(dst)
    vtpcm2 = dst.manager.get(second).vtpcm_id
    assert dst.manager._watches[vtpcm2].alive()
    assert list(dst.manager._watches) == [vtpcm2]  # the captured one needs none
    assert _digest(dst, ctx1, "destination", nonce) == (
        None, instances.RESTARTED_AFTER_CAPTURE)
    vtpcm1 = dst.manager.get(first).vtpcm_id
    assert _captures(dst) == [vtpcm1 + ".ambiguous", vtpcm1 + ".permall"]  # persisted
    _set(_paths(dst, second), _stream(_paths(src, second)))
    _wait_captured(dst, second)
    source, dest = _both(src, dst, ctx2, nonce)
    assert source == dest


def test_a_state_that_arrived_while_the_agent_was_down_is_lost(hosts):
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    _simulate_crash(dst)  # the agent is down ...
    _set(_paths(dst, instance), _stream(_paths(src, instance)))  # ... when QEMU imports
    _restart(dst)
    assert _digest(dst, ctx, "destination", os.urandom(32)) == (
        None, instances.LOST_IN_RESTART)
    assert dst.manager._watches == {}


def test_abort_removes_the_capture_and_ends_the_watch(hosts):
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    _set(_paths(dst, instance), _stream(_paths(src, instance)))
    _wait_captured(dst, instance)
    assert _captures(dst) != []
    # a second incoming migration's watch, aborted before any write
    other, _ = _source(src)
    ctx2 = _prepare(src, dst, other)
    watch = dst.manager._watches[dst.manager.get(other).vtpcm_id]
    dst.manager.abort_incoming(ctx2)
    assert not watch.alive()
    dst.manager.abort_incoming(ctx)
    assert _captures(dst) == [] and dst.manager._watches == {}
    # and a leftover without an incoming vTPCM goes at the next start
    leftover = dst.settings().state_root / instances.CAPTURES / "gone.permall"
    leftover.write_bytes(b"x")
    _restart(dst)
    assert _captures(dst) == []


def test_the_wrong_side_or_migration_is_refused(hosts):
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    nonce = os.urandom(32)
    with refused(exception.MigrationError,
                 "vTPCM migration %s failed: this host is src, asked as the destination "
                 "side (source src, destination dst)" % ctx.migration_id):
        _digest(src, ctx, "destination", nonce)
    other = sealing.SealContext(migration_id=str(uuid.uuid4()), instance_uuid=instance,
                                generation=ctx.generation, source_host="src",
                                dest_host="dst")
    with refused(exception.MigrationError,
                 "vTPCM migration %s failed: vTPCM of instance %s is MIGRATING_OUT in "
                 "migration %s, expected MIGRATING_OUT" % (other.migration_id, instance,
                                                           ctx.migration_id)):
        _digest(src, other, "source", nonce)


def test_a_state_that_arrives_while_recover_arms_is_ambiguous(hosts, monkeypatch):
    """recover arms first, then looks: a write between the two may or may
    not be the first one (driven: the import runs right after the arming)."""
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    real = instances.InstanceManager._arm_capture

    def arm_then_import(self, vtpcm_id, state_dir):
        watch = real(self, vtpcm_id, state_dir)
        _set(_paths(dst, instance), _stream(_paths(src, instance)))
        return watch

    _simulate_crash(dst)
    monkeypatch.setattr(instances.InstanceManager, "_arm_capture", arm_then_import)
    _restart(dst)
    assert _digest(dst, ctx, "destination", os.urandom(32)) == (
        None, "the state arrived while the agent restarted")
    assert dst.manager._watches == {}


def test_each_answer_is_logged_without_state(hosts, caplog):
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    caplog.set_level("INFO", logger="vtpcm_agent.instances")
    _digest(dst, ctx, "destination", os.urandom(32))
    digest, _ = _digest(src, ctx, "source", os.urandom(32))
    vtpcm_src, vtpcm_dst = (h.manager.get(instance).vtpcm_id for h in (src, dst))
    lines = [r.getMessage() for r in caplog.records if "State digest" in r.getMessage()]
    assert lines == [
        "State digest of vTPCM %s (instance %s, migration %s, destination): none, no write "
        "of the permanent state seen yet" % (vtpcm_dst, instance, ctx.migration_id),
        "State digest of vTPCM %s (instance %s, migration %s, source): answered"
        % (vtpcm_src, instance, ctx.migration_id)]
    assert digest is not None and digest.hex() not in caplog.text


def test_a_capture_that_does_not_decrypt_is_no_answer(hosts):
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    _set(_paths(dst, instance), _stream(_paths(src, instance)))
    _wait_captured(dst, instance)
    kept = (dst.settings().state_root / instances.CAPTURES
            / (dst.manager.get(instance).vtpcm_id + ".permall"))
    data = bytearray(kept.read_bytes())
    data[-1] ^= 1  # the HMAC's last byte
    kept.write_bytes(bytes(data))
    assert _digest(dst, ctx, "destination", os.urandom(32)) == (
        None, "the captured first write does not decrypt: swtpm state file "
              "tpm2-00.permall rejected: HMAC mismatch (wrong at-rest key, or the file "
              "was altered)")


def test_no_watch_no_incoming(hosts, monkeypatch):
    """A host whose inotify is used up refuses prepare_incoming (never an
    incoming vTPCM whose import cannot be checked) and leaves nothing."""
    src, dst = hosts
    instance, _ = _source(src)

    def used_up(self):
        raise OSError(24, "inotify_init1: Too many open files")

    monkeypatch.setattr(firstwrite.FirstWriteWatch, "arm", used_up)
    with pytest.raises(exception.SwtpmError) as err:
        _prepare(src, dst, instance)
    assert str(err.value) == (
        "swtpm error for vTPCM %s: cannot watch its state dir for the post-import check "
        "(inotify_init1: Too many open files)" % err.value.kwargs["vtpcm_id"])
    assert dst.manager.associations.find(instance) is None
    assert _captures(dst) == [] and dst.manager._watches == {}


@pytest.mark.parametrize("hosts", ["agent-uid", "own-uids"], indirect=True)
def test_a_second_import_after_the_capture_is_no_answer(hosts):
    """The review's P1: a genuine import, captured, then an OLD stream under
    the same migration key set again (a second tpm-emulator section in the
    stream, or the destination QEMU on the control socket). Seen failing
    before the watch went on after the capture: the digests were equal
    while the destination ran the old state. A guest NV write between the
    two is the positive control: it does not supersede the capture."""
    src, dst = hosts
    instance, nv_old = _source(src)
    old = _stream(_paths(src, instance))  # recorded earlier
    nv_new = _nv_write(_paths(src, instance))  # the guest moves on
    ctx = _prepare(src, dst, instance)
    incoming = _paths(dst, instance)
    _set(incoming, _stream(_paths(src, instance)))
    _wait_captured(dst, instance)
    nonce = os.urandom(32)
    source, dest = _both(src, dst, ctx, nonce)
    assert source == dest
    _nv_write(incoming)
    assert _both(src, dst, ctx, nonce) == (source, source)
    _set(incoming, old)  # asked at once: the sync drains the queue
    assert _digest(dst, ctx, "destination", nonce) == (None, firstwrite.SUPERSEDED)
    assert tpmtools.read_guest_state(incoming, with_key=False)["nv"] == nv_old != nv_new
    vtpcm_id = dst.manager.get(instance).vtpcm_id
    assert _captures(dst) == [vtpcm_id + ".ambiguous", vtpcm_id + ".permall"]
    _restart(dst)  # the mark is kept
    assert _digest(dst, ctx, "destination", nonce) == (None, firstwrite.SUPERSEDED)


def test_the_start_up_sweep_keeps_what_an_incoming_vtpcm_is_writing(hosts):
    """``write_atomic``'s temporary files (``.<id>.<suffix>.<hex>.tmp``)
    belong to their vTPCM: seen failing before (the sweep took the leading
    dot's empty prefix for an owner and removed them). Leftovers of the
    vTPCM go at its abort."""
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    vtpcm_id = dst.manager.get(instance).vtpcm_id
    gone = str(uuid.uuid4())
    captures = dst.settings().state_root / instances.CAPTURES
    names = [".%s.permall.0123456789ab.tmp" % vtpcm_id, "%s.permall" % gone,
             ".%s.ambiguous.0123456789ab.tmp" % gone, ".x.tmp", "stray"]
    for name in names:
        (captures / name).write_bytes(b"x")
    _restart(dst)
    assert _captures(dst) == [names[0]]
    dst.manager.abort_incoming(ctx)
    assert _captures(dst) == []


def test_a_tpm_reset_after_the_capture_is_no_answer(hosts):
    """QEMU's CMD_INIT alone (a guest reset) opens the storage as an import
    does: the watch cannot tell them apart, so the check gets no answer."""
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    incoming = _paths(dst, instance)
    _set(incoming, _stream(_paths(src, instance)))
    _wait_captured(dst, instance)
    assert _digest(dst, ctx, "destination", os.urandom(32))[1] == ""
    with ctrl.CtrlClient(incoming.ctrl_socket) as client:
        client.init(delete_volatile=False)
    assert _digest(dst, ctx, "destination", os.urandom(32)) == (None, firstwrite.SUPERSEDED)


def test_the_guest_starting_on_what_the_agent_imported_keeps_the_capture(hosts):
    """Cold migration and resize: the agent's own import_state is the only
    import (it refuses a second one), then the guest starts on the incoming
    vTPCM before the confirm (QEMU's CMD_INIT, which opens the storage as
    an import does). The watch settles at the agent's import, so the check
    at the confirm is answered. Seen failing before the settle (answered
    as superseded)."""
    src, dst = hosts
    instance, _ = _source(src)
    ctx = _prepare(src, dst, instance)
    state = ctrl.export_state(_paths(src, instance).ctrl_socket)
    dst.manager.import_state(instance, ctx.migration_id, ctx.generation, state)
    incoming = _paths(dst, instance)
    tpmtools.power_on(incoming)  # the guest's QEMU starts (CMD_INIT), its firmware too
    _nv_write(incoming)
    nonce = os.urandom(32)
    source, dest = _both(src, dst, ctx, nonce)
    assert source == dest
    assert dst.manager._watches[dst.manager.get(instance).vtpcm_id].settled
