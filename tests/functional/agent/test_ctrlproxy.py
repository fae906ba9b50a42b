"""The control-channel proxy between QEMU and swtpm, against real swtpm 0.7.1.

A client speaks QEMU 7.2's requests to the proxy (``proxyctl.start``, the
agent's own launcher, so the detached proxy process is the real one): the
state moves through it as in a live migration, the data channel passed with
SET_DATAFD reaches swtpm, and what swtpm 0.7.1 itself would take (a second
import, state set into a running TPM, a plaintext blob) is refused by the
proxy with the specific reason in its record. Every swtpm is stopped by pid
at teardown; the proxy exits with its swtpm, and is stopped by pid too.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vtpcm_agent.swtpm import ctrl, ctrlproxy, framing, process, proxyctl
from vtpcm_common import exception

AT_REST_A = bytes(range(32))
AT_REST_B = bytes(range(1, 33))
MIGRATION = bytes(range(2, 34))
OTHER_MIGRATION = bytes(range(3, 35))

TPM2_STARTUP_CLEAR = bytes.fromhex("80010000000c000001440000")
TPM2_GET_RANDOM_8 = bytes.fromhex("80010000000c0000017b0008")


class Proxied:
    """One swtpm behind its proxy: ``public`` is what QEMU would be given."""

    def __init__(self, paths: process.SwtpmPaths, pid: int, public: Path, record: Path,
                 proxy_pid: int) -> None:
        self.paths = paths
        self.pid = pid
        self.public = public
        self.record = record
        self.proxy_pid = proxy_pid

    def read(self) -> dict[str, object]:
        data = ctrlproxy.read_record(self.record)
        assert data is not None
        return data


@pytest.fixture
def proxied(short_dir: Path, swtpm_paths: Callable[..., process.SwtpmPaths],
            swtpm_factory: Callable[..., int]) -> Iterator[Callable[..., Proxied]]:
    made: list[Proxied] = []

    def make(name: str, at_rest: bytes, migration: bytes = MIGRATION,
             max_blob: int | None = None) -> Proxied:
        paths = swtpm_paths(name, data_socket=False)
        paths.state_dir.mkdir()
        pid = swtpm_factory(paths, at_rest, migration, socket_mode=0o600)
        public = short_dir / ("%s.qemu" % name)
        record = short_dir / ("%s.record" % name)
        proxy_pid = proxyctl.start(public, paths.ctrl_socket, pid, record,
                                   staging_dir=short_dir, log_file=short_dir / (name + ".log"),
                                   max_blob=max_blob, timeout=10.0)
        made.append(Proxied(paths, pid, public, record, proxy_pid))
        return made[-1]

    try:
        yield make
    finally:
        for one in made:
            proxyctl.stop(one.proxy_pid, one.record, timeout=5.0)


def _set_datafd(path: Path) -> tuple[socket.socket, socket.socket]:
    """QEMU's SET_DATAFD: one end of a socketpair passed with SCM_RIGHTS.
    Returns (control connection, our end of the data channel)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.settimeout(5)
    control.connect(str(path))
    socket.send_fds(control, [struct.pack(">I", 0x10)], [theirs.fileno()])
    theirs.close()
    assert control.recv(4) == b"\0\0\0\0"
    ours.settimeout(5)
    return control, ours


def _request(control: socket.socket, raw: bytes, size: int) -> bytes:
    control.sendall(raw)
    reply = b""
    while len(reply) < size:
        chunk = control.recv(size - len(reply))
        assert chunk, "the proxy closed the connection"
        reply += chunk
    return reply


def _tpm(data: socket.socket, command: bytes) -> bytes:
    data.sendall(command)
    reply = data.recv(4096)
    return reply


def _pre_save(path: Path) -> list[ctrl.StateBlob]:
    with ctrl.CtrlClient(path) as client:
        return [client.get_stateblob(t, decrypted=True)
                for t in (ctrl.BlobType.PERMANENT, ctrl.BlobType.VOLATILE)]


def _started_source(proxied: Callable[..., Proxied]) -> tuple[Proxied, list[ctrl.StateBlob]]:
    """A source as QEMU leaves it at a migration's pre-save: its TPM started
    (INIT through the proxy), then its permanent and volatile blobs read."""
    src = proxied("src", AT_REST_A)
    with ctrl.CtrlClient(src.public) as client:
        client.init(delete_volatile=False)
    return src, _pre_save(src.public)


def test_a_live_migration_through_two_proxies_records_the_same_blobs(proxied):
    src = proxied("src", AT_REST_A)
    # QEMU at the source's start: INIT, the data channel, the guest's Startup
    with ctrl.CtrlClient(src.public) as client:
        client.init(delete_volatile=False)
    control, data = _set_datafd(src.public)
    with control, data:
        assert _tpm(data, TPM2_STARTUP_CLEAR)[6:10] == b"\0\0\0\0"
        assert len(_tpm(data, TPM2_GET_RANDOM_8)) == 20
    earlier = _pre_save(src.public)
    blobs = _pre_save(src.public)  # a second read replaces the first in the record
    got = src.read()["got"]
    assert set(got) == {"1", "2"}
    assert [got["1"][1], got["2"][1]] == [len(b.data) for b in blobs]
    assert [got["1"][2], got["2"][2]] == [hashlib.sha256(b.data).hexdigest() for b in blobs]
    assert hashlib.sha256(earlier[1].data).hexdigest() != got["2"][2]  # random IV: new bytes

    dst = proxied("dst", AT_REST_B)
    with ctrl.CtrlClient(dst.public) as client:
        client.stop()
        for blob in blobs:
            client.set_stateblob(blob.blob_type, blob.data, blob.flags)
        client.init(delete_volatile=True)
    record = dst.read()
    assert record["set"] == got and record["started"] is True
    assert record["refused_count"] == 0 and record["failed"] == []
    # the destination's TPM runs on the imported state: the data channel works
    control, data = _set_datafd(dst.public)
    with control, data:
        assert _tpm(data, TPM2_GET_RANDOM_8)[6:10] == b"\0\0\0\0"


def test_a_second_import_or_one_into_a_started_tpm_is_refused(proxied):
    src, blobs = _started_source(proxied)
    # state set into the running source: what swtpm 0.7.1 would take
    with ctrl.CtrlClient(src.public) as client:
        client.stop()
        with pytest.raises(exception.CtrlChannelError, match="TPM_BAD_PARAMETER") as err:
            client.set_stateblob(blobs[0].blob_type, blobs[0].data, blobs[0].flags)
    assert framing.error_result(err.value) == framing.TPM_BAD_PARAMETER
    assert "after the TPM started" in src.read()["refused"][0]

    dst = proxied("dst", AT_REST_B)
    with ctrl.CtrlClient(dst.public) as client:
        client.stop()
        client.set_stateblob(blobs[0].blob_type, blobs[0].data, blobs[0].flags)
        with pytest.raises(exception.CtrlChannelError, match="TPM_BAD_PARAMETER") as err:
            # the same blob again: a second import
            client.set_stateblob(blobs[0].blob_type, blobs[0].data, blobs[0].flags)
    assert framing.error_result(err.value) == framing.TPM_BAD_PARAMETER
    record = dst.read()
    assert record["refused"] == ["a second SET_STATEBLOB permanent (one import per swtpm)"]
    # a new connection does not reopen the import
    with ctrl.CtrlClient(dst.public) as client:
        with pytest.raises(exception.CtrlChannelError, match="TPM_BAD_PARAMETER"):
            client.set_stateblob(blobs[1].blob_type, blobs[1].data, blobs[1].flags)
    assert dst.read()["refused_count"] == 2
    assert "2" not in dst.read()["set"]


def test_a_plaintext_blob_is_refused_and_an_encrypted_one_passes(proxied):
    src, blobs = _started_source(proxied)
    assert framing.parse_blob_header(blobs[0].data).migration_encrypted  # positive control
    header = bytearray(blobs[0].data)
    flags = struct.unpack_from(">H", header, 4)[0]
    struct.pack_into(">H", header, 4, flags & ~framing.BLOB_FLAG_MIGRATION_ENCRYPTED)
    dst = proxied("dst", AT_REST_B)
    with ctrl.CtrlClient(dst.public) as client:
        client.stop()
        with pytest.raises(exception.CtrlChannelError, match="TPM_BAD_PARAMETER") as err:
            client.set_stateblob(blobs[0].blob_type, bytes(header), blobs[0].flags)
    assert framing.error_result(err.value) == framing.TPM_BAD_PARAMETER
    assert "not migration-encrypted" in dst.read()["refused"][0]

    other = proxied("other", AT_REST_B)
    with ctrl.CtrlClient(other.public) as client:
        client.stop()
        client.set_stateblob(blobs[0].blob_type, blobs[0].data, blobs[0].flags)
    assert set(other.read()["set"]) == {"1"}


def test_a_blob_swtpm_refuses_is_recorded_and_closes_the_import(proxied):
    src, blobs = _started_source(proxied)
    dst = proxied("dst", AT_REST_B, migration=OTHER_MIGRATION)  # another key: undecryptable
    with ctrl.CtrlClient(dst.public) as client:
        client.stop()
        with pytest.raises(exception.CtrlChannelError, match="TPM_DECRYPT_ERROR|0x"):
            client.set_stateblob(blobs[0].blob_type, blobs[0].data, blobs[0].flags)
    record = dst.read()
    assert record["set"] == {} and len(record["failed"]) == 1
    assert "swtpm refused SET_STATEBLOB permanent" in record["failed"][0]


def test_the_proxy_exits_with_its_swtpm(proxied):
    src = proxied("src", AT_REST_A)
    assert proxyctl.find(src.record) == src.proxy_pid
    process.stop(src.pid, src.paths, timeout=6.0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and proxyctl.find(src.record) is not None:
        time.sleep(0.02)
    assert proxyctl.find(src.record) is None


def test_the_proxy_frames_with_the_agents_blob_limit(proxied, short_dir):
    """``--max-blob`` reaches the framing (review round 7: it was parsed and
    dropped, the proxy always framed at 256 KiB)."""
    src, blobs = _started_source(proxied)
    assert len(blobs[0].data) > 1024
    dst = proxied("dst", AT_REST_B, max_blob=1024)
    with ctrl.CtrlClient(dst.public) as client:
        client.stop()
        with pytest.raises(exception.CtrlChannelError, match="SET_STATEBLOB"):
            client.set_stateblob(blobs[0].blob_type, blobs[0].data, blobs[0].flags)
    log = (short_dir / "dst.log").read_text()
    assert "closing the client: SET_STATEBLOB announces %d bytes, limit is 1024" % len(
        blobs[0].data) in log


def test_a_proxy_started_with_a_pycache_prefix_is_found(proxied, monkeypatch):
    """``-X pycache_prefix=...`` moves the boot code in the proxy's argv
    (review round 8: ``find`` then missed it and every start failed)."""
    monkeypatch.setattr(proxyctl.sys, "pycache_prefix", "/tmp/vtpcm-pycache-test")
    src = proxied("src", AT_REST_A)
    assert proxyctl.find(src.record) == src.proxy_pid
