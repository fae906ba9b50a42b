"""Framing of swtpm's control channel: pure bytes in, bytes out, no I/O."""

import socket
import struct
import threading

import pytest

from vtpcm_agent.swtpm import ctrl
from vtpcm_common import exception

C = ctrl.Command


def _blob_header(flags: int, payload: bytes) -> bytes:
    return struct.pack(">BBHHI", 2, 1, 10, flags, 10 + len(payload)) + payload


SEALED = _blob_header(0x16, b"\xaa" * 40)  # migration data, encrypted, 256-bit key


# ---------------------------------------------------------------- encoding

def test_encode_simple_commands():
    assert ctrl.encode_request(C.GET_CAPABILITY) == b"\x00\x00\x00\x01"
    assert ctrl.encode_request(C.STOP) == b"\x00\x00\x00\x0e"
    assert ctrl.encode_request(C.GET_CONFIG) == b"\x00\x00\x00\x0f"


def test_encode_init():
    assert ctrl.encode_init(True) == bytes.fromhex("00000002" "00000001")
    assert ctrl.encode_init(False) == bytes.fromhex("00000002" "00000000")


def test_encode_get_stateblob():
    assert ctrl.encode_get_stateblob(ctrl.BlobType.VOLATILE) == bytes.fromhex(
        "0000000c" "00000001" "00000002" "00000000")
    assert ctrl.encode_get_stateblob(ctrl.BlobType.PERMANENT, decrypted=False) == bytes.fromhex(
        "0000000c" "00000000" "00000001" "00000000")


def test_encode_set_stateblob():
    data = b"\x01\x02\x03"
    assert ctrl.encode_set_stateblob(ctrl.BlobType.PERMANENT, data, 2) == bytes.fromhex(
        "0000000d" "00000002" "00000001" "00000003") + data


def test_encode_set_stateblob_limits():
    with pytest.raises(exception.CtrlChannelError, match="exceeds the limit"):
        ctrl.encode_set_stateblob(ctrl.BlobType.PERMANENT, b"x" * 11, max_size=10)
    with pytest.raises(exception.CtrlChannelError, match="unknown state flags"):
        ctrl.encode_set_stateblob(ctrl.BlobType.PERMANENT, b"x", 4)
    with pytest.raises(ValueError):
        ctrl.encode_set_stateblob(9, b"x")  # type: ignore[arg-type]


def test_encode_set_locality_and_info():
    assert ctrl.encode_set_locality(3) == bytes.fromhex("00000005" "03")
    with pytest.raises(exception.CtrlChannelError, match="locality"):
        ctrl.encode_set_locality(5)
    assert ctrl.encode_get_info(1) == bytes.fromhex("00000012" "0000000000000001" "00000000"
                                                    "00000000")


# ------------------------------------------------------- response lengths

def test_response_length_result_only():
    for cmd in (C.INIT, C.STOP, C.SHUTDOWN, C.STORE_VOLATILE, C.SET_STATEBLOB):
        assert ctrl.response_length(cmd, b"") == 4
        assert ctrl.response_length(cmd, b"\0\0\0\0") == 4


def test_response_length_capability_has_no_result_code():
    assert ctrl.response_length(C.GET_CAPABILITY, b"") == 8
    assert ctrl.response_length(C.GET_CAPABILITY, b"\0\0\0\x0a") == 8


def test_response_length_stateblob_grows_with_header():
    assert ctrl.response_length(C.GET_STATEBLOB, b"") == 4
    assert ctrl.response_length(C.GET_STATEBLOB, b"\0\0\0\0") == 16
    header = struct.pack(">IIII", 0, 0, 100, 100)
    assert ctrl.response_length(C.GET_STATEBLOB, header) == 116


def test_response_length_stopped_tpm_quirk_is_four_bytes():
    # A stopped TPM answers GET_STATEBLOB with the result code only.
    assert ctrl.response_length(C.GET_STATEBLOB, b"\0\0\0\x0a") == 4


def test_response_length_rejects_oversized_and_chunked():
    with pytest.raises(exception.CtrlChannelError, match="limit"):
        ctrl.response_length(C.GET_STATEBLOB, struct.pack(">IIII", 0, 0, 1 << 30, 1 << 30))
    with pytest.raises(exception.CtrlChannelError, match="chunked"):
        ctrl.response_length(C.GET_STATEBLOB, struct.pack(">IIII", 0, 0, 5000, 3072))


# ----------------------------------------------------------------- parsing

def test_parse_result_ok_and_errors():
    ctrl.parse_result(C.INIT, b"\0\0\0\0")
    with pytest.raises(exception.CtrlChannelError) as err:
        ctrl.parse_result(C.INIT, b"\0\0\0\x09")
    assert "INIT" in str(err.value) and "0x00000009" in str(err.value)
    assert ctrl.error_result(err.value) == 9
    with pytest.raises(exception.CtrlChannelError, match="truncated"):
        ctrl.parse_result(C.STOP, b"\0\0")
    with pytest.raises(exception.CtrlChannelError, match="expected 4"):
        ctrl.parse_result(C.STOP, b"\0\0\0\0\0")


def test_parse_capability():
    assert ctrl.parse_capability(bytes.fromhex("000000000000ffff")) == 0xFFFF
    with pytest.raises(exception.CtrlChannelError, match="expected 8"):
        ctrl.parse_capability(b"\0\0\0\0")


def test_parse_config():
    assert ctrl.parse_config(bytes.fromhex("00000000" "00000003")) == 3
    with pytest.raises(exception.CtrlChannelError, match="expected 8"):
        ctrl.parse_config(bytes.fromhex("00000000" "0000"))
    with pytest.raises(exception.CtrlChannelError, match="unknown config flags"):
        ctrl.parse_config(bytes.fromhex("00000000" "00000007"))
    with pytest.raises(exception.CtrlChannelError, match="0x0000000a"):
        ctrl.parse_config(bytes.fromhex("0000000a"))


def test_parse_stateblob():
    reply = struct.pack(">IIII", 0, 0, len(SEALED), len(SEALED)) + SEALED
    blob = ctrl.parse_stateblob(ctrl.BlobType.PERMANENT, reply)
    assert blob.data == SEALED and blob.flags == 0
    assert blob.blob_type is ctrl.BlobType.PERMANENT


def test_stateblob_repr_hides_data():
    blob = ctrl.StateBlob(ctrl.BlobType.VOLATILE, 0, b"SECRETSECRET")
    assert "SECRET" not in repr(blob) and "size=12" in repr(blob)
    assert "SECRET" not in str(blob)


@pytest.mark.parametrize("reply, match", [
    (struct.pack(">IIII", 0, 0, 50, 50) + b"x" * 49, "payload bytes"),      # truncated data
    (struct.pack(">IIII", 0, 0, 50, 50) + b"x" * 51, "payload bytes"),      # trailing data
    (struct.pack(">III", 0, 0, 50), "truncated"),                           # truncated header
    (struct.pack(">IIII", 0, 0, 60, 50) + b"x" * 50, "chunked"),            # tampered totlength
    (struct.pack(">IIII", 0, 8, 1, 1) + b"x", "unknown state flags"),        # tampered flags
    (b"\0\0\0\x0a", "0x0000000a"),                                          # stopped TPM
    (struct.pack(">IIII", 0x21, 0, 0, 0), "0x00000021"),                    # error, full header
    (b"", "truncated"),
])
def test_parse_stateblob_rejects(reply, match):
    with pytest.raises(exception.CtrlChannelError, match=match):
        ctrl.parse_stateblob(ctrl.BlobType.PERMANENT, reply)


def test_parse_stateblob_respects_max_size():
    reply = struct.pack(">IIII", 0, 0, 20, 20) + b"y" * 20
    with pytest.raises(exception.CtrlChannelError, match="limit"):
        ctrl.parse_stateblob(ctrl.BlobType.PERMANENT, reply, max_size=10)


def test_parse_info():
    text = b'{"a":1}\0'
    reply = struct.pack(">III", 0, len(text), len(text)) + text
    assert ctrl.parse_info(reply) == '{"a":1}'
    with pytest.raises(exception.CtrlChannelError, match="payload"):
        ctrl.parse_info(reply[:-1])
    with pytest.raises(exception.CtrlChannelError, match="UTF-8"):
        ctrl.parse_info(struct.pack(">III", 0, 2, 2) + b"\xff\xfe")


def test_error_messages_carry_no_data():
    secret = b"TOPSECRETSTATE" * 4
    reply = struct.pack(">IIII", 0, 0, len(secret) + 1, len(secret) + 1) + secret
    with pytest.raises(exception.CtrlChannelError) as err:
        ctrl.parse_stateblob(ctrl.BlobType.PERMANENT, reply)
    assert "TOPSECRET" not in str(err.value) and "TOPSECRET" not in repr(err.value.kwargs)


# ------------------------------------------------------------ blob header

def test_parse_blob_header():
    header = ctrl.parse_blob_header(SEALED)
    assert header.migration_encrypted and header.at_rest_encrypted is False
    assert header.total_length == len(SEALED)


@pytest.mark.parametrize("blob, match", [
    (b"\x02\x01", "shorter"),
    (struct.pack(">BBHHI", 2, 1, 12, 0, 10), "header size"),
    (struct.pack(">BBHHI", 2, 1, 10, 0, 99), "announces"),
])
def test_parse_blob_header_rejects(blob, match):
    with pytest.raises(exception.InvalidInput, match=match):
        ctrl.parse_blob_header(blob)


def test_exported_state_repr_hides_data():
    state = ctrl.ExportedState(b"PERMSECRET", b"VOLSECRET")
    assert "SECRET" not in repr(state) and "10 bytes" in repr(state)


# ------------------------------------------- import input checks (no I/O)

@pytest.mark.parametrize("state, match", [
    (ctrl.ExportedState(b"", SEALED), "permanent blob is empty"),
    (ctrl.ExportedState(SEALED, _blob_header(0x04, b"plain")), "not encrypted under a migration"),
    (ctrl.ExportedState(_blob_header(0x06, b"x"), SEALED), "256-bit"),
    (ctrl.ExportedState(SEALED, SEALED, permanent_flags=1), "unknown flags"),
    (ctrl.ExportedState(SEALED + b"x", SEALED), "announces"),
])
def test_import_refuses_bad_input_without_connecting(state, match):
    # The socket path does not exist: a connection attempt would fail differently.
    with pytest.raises(exception.StateImportError, match=match):
        ctrl.import_state("/nonexistent/ctrl.sock", state, vtpcm_id="v1")


def test_import_max_blob_size_guard():
    big = _blob_header(0x16, b"z" * 300)
    with pytest.raises(exception.StateImportError, match="exceeds the limit"):
        ctrl.import_state("/nonexistent/ctrl.sock", ctrl.ExportedState(big, SEALED),
                          vtpcm_id="v1", max_blob_size=100)


# ------------------------------- client against a scripted fake peer (unit)

class _FakeSwtpm:
    """A socketpair peer that answers each request with canned bytes."""

    def __init__(self, replies):
        self.client_sock, self.server_sock = socket.socketpair()
        self.requests = []
        self.replies = list(replies)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            self.server_sock.settimeout(5)
            for reply in self.replies:
                self.requests.append(self.server_sock.recv(65536))
                if reply is not None:
                    self.server_sock.sendall(reply)
        except OSError:
            pass

    def client(self, timeout=1.0):
        client = ctrl.CtrlClient("/unused", timeout=timeout)
        client._sock = self.client_sock
        return client

    def close(self):
        self.server_sock.close()
        self.thread.join(5)


def test_client_four_byte_reply_on_stopped_tpm_does_not_hang():
    fake = _FakeSwtpm([b"\0\0\0\x0a"])
    try:
        client = fake.client(timeout=2.0)
        with pytest.raises(exception.CtrlChannelError) as err:
            client.get_stateblob(ctrl.BlobType.PERMANENT)
        assert ctrl.error_result(err.value) == ctrl.TPM_BAD_ORDINAL
        assert client._sock is None  # dropped: the stream may hold unread bytes
    finally:
        fake.close()


def test_client_times_out_on_silent_peer():
    fake = _FakeSwtpm([None])
    try:
        client = fake.client(timeout=0.3)
        with pytest.raises(exception.CtrlChannelError, match="no complete reply"):
            client.get_config()
    finally:
        fake.close()


def test_client_times_out_on_truncated_reply():
    fake = _FakeSwtpm([struct.pack(">IIII", 0, 0, 100, 100) + b"x" * 10])
    try:
        client = fake.client(timeout=0.3)
        with pytest.raises(exception.CtrlChannelError, match="no complete reply"):
            client.get_stateblob(ctrl.BlobType.PERMANENT)
    finally:
        fake.close()


def test_client_detects_closed_connection():
    fake = _FakeSwtpm([])
    fake.close()
    client = fake.client(timeout=1.0)
    with pytest.raises(exception.CtrlChannelError, match="closed the connection|I/O error"):
        client.get_config()


def test_client_round_trip_one_write_per_command():
    reply = struct.pack(">IIII", 0, 0, len(SEALED), len(SEALED)) + SEALED
    fake = _FakeSwtpm([bytes.fromhex("0000000000000003"), reply])
    try:
        client = fake.client()
        assert client.get_config() == 3
        blob = client.get_stateblob(ctrl.BlobType.VOLATILE)
        assert blob.data == SEALED
        assert fake.requests[0] == ctrl.encode_request(C.GET_CONFIG)
        assert fake.requests[1] == ctrl.encode_get_stateblob(ctrl.BlobType.VOLATILE)
    finally:
        fake.close()


# --------------- export_state's fail-closed guards (scripted peer, no swtpm)

def _config_reply(flags: int) -> bytes:
    return struct.pack(">II", 0, flags)


def _blob_reply(blob: bytes) -> bytes:
    return struct.pack(">IIII", 0, 0, len(blob), len(blob)) + blob


def _export_against(monkeypatch, replies):
    """Run transfer.export_state against a peer answering ``replies``."""
    from vtpcm_agent.swtpm import transfer
    fake = _FakeSwtpm(replies)
    monkeypatch.setattr(transfer, "CtrlClient", lambda *a, **kw: fake.client())
    try:
        return fake, transfer.export_state("/unused")
    finally:
        fake.close()


def test_export_refuses_a_swtpm_without_migration_key(monkeypatch):
    """Its blobs would come out in plaintext: not even asked for."""
    with pytest.raises(exception.CtrlChannelError) as err:
        _export_against(monkeypatch, [_config_reply(ctrl.CONFIG_FLAG_FILE_KEY),
                                      _blob_reply(SEALED), _blob_reply(SEALED)])
    assert str(err.value) == ("swtpm control channel export_state failed: swtpm runs "
                              "without a migration key; refusing to export plaintext state")


def test_export_asks_for_blobs_only_with_a_migration_key(monkeypatch):
    """Control: the same peer with the migration-key flag set exports."""
    fake, state = _export_against(monkeypatch, [
        _config_reply(ctrl.CONFIG_FLAG_FILE_KEY | ctrl.CONFIG_FLAG_MIGRATION_KEY),
        _blob_reply(SEALED), _blob_reply(SEALED)])
    assert state.permanent == SEALED and state.volatile == SEALED
    assert fake.requests[1] == ctrl.encode_get_stateblob(ctrl.BlobType.PERMANENT)


PLAIN = _blob_header(0x04, b"\xaa" * 40)  # migration data, no encryption layer
SEALED_128 = _blob_header(0x06, b"\xaa" * 40)  # migration-encrypted, 128-bit key


@pytest.mark.parametrize(("permanent", "volatile", "reason"), [
    (PLAIN, SEALED, "permanent blob is not encrypted under a migration key"),
    (SEALED, PLAIN, "volatile blob is not encrypted under a migration key"),
    (SEALED_128, SEALED, "permanent blob is not sealed with a 256-bit migration key"),
    (SEALED, SEALED_128, "volatile blob is not sealed with a 256-bit migration key"),
], ids=["plain-permanent", "plain-volatile", "128bit-permanent", "128bit-volatile"])
def test_export_refuses_blobs_not_sealed_under_the_migration_key(
        monkeypatch, permanent, volatile, reason):
    """A swtpm that claims a migration key but hands out blobs without that
    layer (or with a weaker one): nothing is returned to be sent."""
    with pytest.raises(exception.CtrlChannelError) as err:
        _export_against(monkeypatch, [
            _config_reply(ctrl.CONFIG_FLAG_FILE_KEY | ctrl.CONFIG_FLAG_MIGRATION_KEY),
            _blob_reply(permanent), _blob_reply(volatile)])
    assert str(err.value) == "swtpm control channel export_state failed: Invalid input: " + reason
