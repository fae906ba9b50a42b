"""Client of swtpm 0.7.1's control channel (unix socket), and state transfer.

Why pure Python: the agent must read and set a vTPCM's state blobs whenever
QEMU is not attached (cold migration, resize, shelve, verification) without
shelling out to ``swtpm_ioctl`` and without ever holding plaintext state.

Three layers, each usable alone:

* framing (``encode_*``, ``response_length``, ``parse_*``): pure functions
  over bytes, no I/O, unit-tested with truncated and tampered replies;
* ``CtrlClient``: one connection, one write per command, every read bounded
  by a deadline; any failure closes the connection (a failed reply may leave
  unread bytes behind: see ``response_length``), the next command reconnects;
* ``export_state`` / ``import_state``: whole-TPM transfer for a swtpm that
  QEMU is NOT attached to (the control socket serves one client at a time).

Protocol (big-endian): request = u32 command code + request struct, reply =
response struct only. Replies of result-carrying commands start with a TPM
1.2 style u32 result; on an error swtpm may send just those 4 bytes (e.g.
GET_STATEBLOB on a stopped TPM) or the full header (GET_STATEBLOB failing
inside swtpm). The client therefore reads 4 bytes first and stops there on
any non-zero result.

Never log or raise with blob contents: only command names, result codes and
sizes appear in messages.
"""

from __future__ import annotations

import dataclasses
import enum
import socket
import struct
import time
from pathlib import Path
from types import TracebackType

from oslo_log import log as logging

from vtpcm_common import exception

LOG = logging.getLogger(__name__)

MAX_BLOB_SIZE = 256 * 1024
"""Default bound on one state blob (a full NVRAM is ~75 KB)."""

MAX_INFO_SIZE = 64 * 1024


class Command(enum.IntEnum):
    GET_CAPABILITY = 0x01
    INIT = 0x02
    SHUTDOWN = 0x03
    SET_LOCALITY = 0x05
    STORE_VOLATILE = 0x0A
    GET_STATEBLOB = 0x0C
    SET_STATEBLOB = 0x0D
    STOP = 0x0E
    GET_CONFIG = 0x0F
    GET_INFO = 0x12


class BlobType(enum.IntEnum):
    PERMANENT = 1
    VOLATILE = 2
    SAVESTATE = 3


INIT_FLAG_DELETE_VOLATILE = 0x1
STATE_FLAG_DECRYPTED = 0x1  # request: strip the at-rest (file key) layer
STATE_FLAG_ENCRYPTED = 0x2  # reply/SET: inner layer is under the file key
CONFIG_FLAG_FILE_KEY = 0x1
CONFIG_FLAG_MIGRATION_KEY = 0x2

# Flags of swtpm's 10-byte blob header (version, min_version, hdrsize, flags,
# totlen), found at the start of every blob and every state file.
BLOB_HEADER = struct.Struct(">BBHHI")
BLOB_FLAG_ENCRYPTED = 0x01
BLOB_FLAG_MIGRATION_ENCRYPTED = 0x02
BLOB_FLAG_MIGRATION_DATA = 0x04
BLOB_FLAG_ENCRYPTED_256BIT_KEY = 0x08
BLOB_FLAG_MIGRATION_256BIT_KEY = 0x10

TPM_SUCCESS = 0
TPM_BAD_PARAMETER = 0x03
TPM_FAIL = 0x09
TPM_BAD_ORDINAL = 0x0A  # also "TPM is (not) running" on the control channel

_RESULT_NAMES = {
    0x01: "TPM_AUTHFAIL",
    TPM_BAD_PARAMETER: "TPM_BAD_PARAMETER",
    TPM_FAIL: "TPM_FAIL",
    TPM_BAD_ORDINAL: "TPM_BAD_ORDINAL (TPM not running, or running when it must be stopped)",
    0x0D: "TPM_KEYNOTFOUND",
    0x1F: "TPM_IOERROR",
    0x21: "TPM_DECRYPT_ERROR",
    0x2B: "TPM_BAD_DATASIZE",
    0x2E: "TPM_BAD_VERSION",
    0x3D: "TPM_BAD_LOCALITY",
}

_U32 = struct.Struct(">I")
_RESULT_ONLY = frozenset({
    Command.INIT, Command.SHUTDOWN, Command.SET_LOCALITY, Command.STORE_VOLATILE,
    Command.SET_STATEBLOB, Command.STOP,
})
_STATEBLOB_HEADER = struct.Struct(">IIII")  # result, flags, totlength, length
_INFO_HEADER = struct.Struct(">III")  # result, totlength, length


def result_name(code: int) -> str:
    """Human-readable name of a control-channel result code."""
    return "0x%08x %s" % (code, _RESULT_NAMES.get(code, ""))


def _fail(command: Command | str, reason: str,
          result: int | None = None) -> exception.CtrlChannelError:
    name = command.name if isinstance(command, Command) else command
    return exception.CtrlChannelError(command=name, reason=reason, result=result)


def error_result(exc: exception.CtrlChannelError) -> int | None:
    """The swtpm result code carried by ``exc``, or None for I/O/protocol errors."""
    value = exc.kwargs.get("result")
    return value if isinstance(value, int) else None


# --------------------------------------------------------------------------
# Framing: pure functions
# --------------------------------------------------------------------------

def encode_request(command: Command, body: bytes = b"") -> bytes:
    """Frame one request: u32 command code followed by the request struct."""
    return _U32.pack(int(command)) + body


def encode_init(delete_volatile: bool) -> bytes:
    return encode_request(Command.INIT,
                          _U32.pack(INIT_FLAG_DELETE_VOLATILE if delete_volatile else 0))


def encode_get_stateblob(blob_type: BlobType, *, decrypted: bool = True) -> bytes:
    """Request a whole blob (offset 0; a unix socket delivers it unchunked)."""
    flags = STATE_FLAG_DECRYPTED if decrypted else 0
    return encode_request(Command.GET_STATEBLOB,
                          struct.pack(">III", flags, int(BlobType(blob_type)), 0))


def encode_set_stateblob(blob_type: BlobType, data: bytes, flags: int = 0,
                         *, max_size: int = MAX_BLOB_SIZE) -> bytes:
    """Frame SET_STATEBLOB; an empty ``data`` clears a blob cached by a prior SET."""
    if len(data) > max_size:
        raise _fail(Command.SET_STATEBLOB,
                    "blob of %d bytes exceeds the limit of %d" % (len(data), max_size))
    if flags & ~STATE_FLAG_ENCRYPTED:
        raise _fail(Command.SET_STATEBLOB, "unknown state flags 0x%x" % flags)
    return encode_request(Command.SET_STATEBLOB,
                          struct.pack(">III", flags, int(BlobType(blob_type)), len(data)) + data)


def encode_set_locality(locality: int) -> bytes:
    if not 0 <= locality <= 4:
        raise _fail(Command.SET_LOCALITY, "locality %r is not in 0..4" % (locality,))
    return encode_request(Command.SET_LOCALITY, bytes([locality]))


def encode_get_info(flags: int) -> bytes:
    return encode_request(Command.GET_INFO, struct.pack(">QII", flags, 0, 0))


def response_length(command: Command, received: bytes, *,
                    max_payload: int = MAX_BLOB_SIZE) -> int:
    """Total reply length implied by the bytes ``received`` so far.

    The reader calls this after every chunk and stops once it holds that
    many bytes. A non-zero result always ends the reply after 4 bytes: on
    GET_STATEBLOB swtpm may still send 12 more header bytes, so a caller
    that saw an error must drop the connection instead of reusing it.
    """
    if command is Command.GET_CAPABILITY:
        return 8
    if len(received) < 4:
        return 4
    (result,) = _U32.unpack_from(received)
    if result != TPM_SUCCESS or command in _RESULT_ONLY:
        return 4
    if command is Command.GET_CONFIG:
        return 8
    if command is Command.GET_STATEBLOB:
        if len(received) < _STATEBLOB_HEADER.size:
            return _STATEBLOB_HEADER.size
        _, _, totlength, length = _STATEBLOB_HEADER.unpack_from(received)
        _check_payload(command, totlength, length, max_payload)
        return _STATEBLOB_HEADER.size + int(length)
    if command is Command.GET_INFO:
        if len(received) < _INFO_HEADER.size:
            return _INFO_HEADER.size
        _, totlength, length = _INFO_HEADER.unpack_from(received)
        _check_payload(command, totlength, length, min(max_payload, MAX_INFO_SIZE))
        return _INFO_HEADER.size + int(length)
    raise _fail(command, "no reply format known for this command")


def _check_payload(command: Command, totlength: int, length: int, max_payload: int) -> None:
    if length != totlength:
        raise _fail(command, "chunked reply (length %d of %d) is not supported"
                    % (length, totlength))
    if length > max_payload:
        raise _fail(command, "reply announces %d bytes, limit is %d" % (length, max_payload))


def check_result(command: Command, data: bytes) -> None:
    """Raise CtrlChannelError naming ``command`` and the code unless data says success."""
    if len(data) < 4:
        raise _fail(command, "truncated reply: %d of 4 bytes" % len(data))
    (result,) = _U32.unpack_from(data)
    if result != TPM_SUCCESS:
        raise _fail(command, "swtpm returned %s" % result_name(result), result=result)


def parse_result(command: Command, data: bytes) -> None:
    """Parse the reply of a result-only command."""
    check_result(command, data)
    if len(data) != 4:
        raise _fail(command, "reply has %d bytes, expected 4" % len(data))


def parse_capability(data: bytes) -> int:
    """GET_CAPABILITY: 8-byte capability mask, no result code."""
    if len(data) != 8:
        raise _fail(Command.GET_CAPABILITY, "reply has %d bytes, expected 8" % len(data))
    (caps,) = struct.unpack(">Q", data)
    return int(caps)


def parse_config(data: bytes) -> int:
    """GET_CONFIG: result + flags (1 file key, 2 migration key)."""
    check_result(Command.GET_CONFIG, data)
    if len(data) != 8:
        raise _fail(Command.GET_CONFIG, "reply has %d bytes, expected 8" % len(data))
    (flags,) = _U32.unpack_from(data, 4)
    if flags & ~(CONFIG_FLAG_FILE_KEY | CONFIG_FLAG_MIGRATION_KEY):
        raise _fail(Command.GET_CONFIG, "unknown config flags 0x%x" % flags)
    return int(flags)


@dataclasses.dataclass(frozen=True)
class StateBlob:
    """One state blob as swtpm hands it out. ``data`` never appears in repr."""

    blob_type: BlobType
    flags: int
    data: bytes = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return "StateBlob(blob_type=%s, flags=0x%x, size=%d)" % (
            BlobType(self.blob_type).name, self.flags, len(self.data))


def parse_stateblob(blob_type: BlobType, data: bytes, *,
                    max_size: int = MAX_BLOB_SIZE) -> StateBlob:
    """GET_STATEBLOB: result, flags, totlength, length, then exactly length bytes."""
    command = Command.GET_STATEBLOB
    check_result(command, data)
    if len(data) < _STATEBLOB_HEADER.size:
        raise _fail(command, "truncated reply: %d of %d header bytes"
                    % (len(data), _STATEBLOB_HEADER.size))
    _, flags, totlength, length = _STATEBLOB_HEADER.unpack_from(data)
    _check_payload(command, totlength, length, max_size)
    if len(data) != _STATEBLOB_HEADER.size + length:
        raise _fail(command, "reply has %d payload bytes, header announces %d"
                    % (len(data) - _STATEBLOB_HEADER.size, length))
    if flags & ~STATE_FLAG_ENCRYPTED:
        raise _fail(command, "unknown state flags 0x%x" % flags)
    return StateBlob(BlobType(blob_type), flags, bytes(data[_STATEBLOB_HEADER.size:]))


def parse_info(data: bytes) -> str:
    """GET_INFO: result, totlength, length, NUL-terminated JSON text."""
    command = Command.GET_INFO
    check_result(command, data)
    if len(data) < _INFO_HEADER.size:
        raise _fail(command, "truncated reply: %d of %d header bytes"
                    % (len(data), _INFO_HEADER.size))
    _, totlength, length = _INFO_HEADER.unpack_from(data)
    _check_payload(command, totlength, length, MAX_INFO_SIZE)
    if len(data) != _INFO_HEADER.size + length:
        raise _fail(command, "reply has %d payload bytes, header announces %d"
                    % (len(data) - _INFO_HEADER.size, length))
    text = data[_INFO_HEADER.size:].rstrip(b"\0")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(command, "info text is not UTF-8") from None


@dataclasses.dataclass(frozen=True)
class BlobHeader:
    """swtpm's clear-text header in front of every blob and state file."""

    version: int
    min_version: int
    flags: int
    total_length: int

    @property
    def migration_encrypted(self) -> bool:
        return bool(self.flags & BLOB_FLAG_MIGRATION_ENCRYPTED)

    @property
    def at_rest_encrypted(self) -> bool:
        return bool(self.flags & BLOB_FLAG_ENCRYPTED)


def parse_blob_header(data: bytes) -> BlobHeader:
    """Parse and sanity-check the 10-byte blob header (no decryption)."""
    if len(data) < BLOB_HEADER.size:
        raise exception.InvalidInput(reason="state blob shorter than its %d-byte header"
                                     % BLOB_HEADER.size)
    version, min_version, hdrsize, flags, totlen = BLOB_HEADER.unpack_from(data)
    if hdrsize != BLOB_HEADER.size:
        raise exception.InvalidInput(reason="state blob header size %d, expected %d"
                                     % (hdrsize, BLOB_HEADER.size))
    if totlen != len(data):
        raise exception.InvalidInput(reason="state blob announces %d bytes but has %d"
                                     % (totlen, len(data)))
    return BlobHeader(version, min_version, flags, totlen)


# --------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------

class CtrlClient:
    """One connection to a swtpm control socket.

    ``timeout`` bounds each command (connect, write and every read). The
    channel serves one client at a time: while QEMU (or another client) is
    connected, commands time out; keep the client open only as long as a
    transaction needs it.
    """

    def __init__(self, path: Path | str, timeout: float = 5.0, *,
                 max_blob_size: int = MAX_BLOB_SIZE) -> None:
        if timeout <= 0:
            raise exception.InvalidInput(reason="timeout must be positive, got %r" % (timeout,))
        self.path = Path(path)
        self.timeout = timeout
        self.max_blob_size = max_blob_size
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        return "CtrlClient(path=%r, timeout=%r)" % (str(self.path), self.timeout)

    def __enter__(self) -> CtrlClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _connect(self, command: Command, deadline: float) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise _fail(command, "cannot connect to control socket %s: %s"
                        % (self.path, exc.strerror or type(exc).__name__)) from None
        self._sock = sock
        return sock

    def _transact(self, command: Command, request: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout
        sock = self._connect(command, deadline)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(request)
            received = bytearray()
            while True:
                need = response_length(command, bytes(received), max_payload=self.max_blob_size)
                if len(received) >= need:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(min(need - len(received), 1 << 16))
                if not chunk:
                    raise _fail(command, "swtpm closed the connection after %d of %d bytes"
                                % (len(received), need))
                received += chunk
        except TimeoutError:
            self.close()
            raise _fail(command, "no complete reply within %.1fs (swtpm busy, or another "
                        "client such as QEMU holds the control channel)" % self.timeout) from None
        except OSError as exc:
            self.close()
            raise _fail(command, "I/O error on control socket: %s"
                        % (exc.strerror or type(exc).__name__)) from None
        except exception.CtrlChannelError:
            self.close()
            raise
        data = bytes(received)
        if command is not Command.GET_CAPABILITY and _U32.unpack_from(data)[0] != TPM_SUCCESS:
            # Unread header bytes may follow an error: never reuse the stream.
            self.close()
        return data

    def get_capability(self) -> int:
        return parse_capability(self._transact(Command.GET_CAPABILITY,
                                               encode_request(Command.GET_CAPABILITY)))

    def init(self, delete_volatile: bool = False) -> None:
        parse_result(Command.INIT, self._transact(Command.INIT, encode_init(delete_volatile)))

    def shutdown(self) -> None:
        """Terminate the swtpm process (it replies first)."""
        parse_result(Command.SHUTDOWN, self._transact(Command.SHUTDOWN,
                                                      encode_request(Command.SHUTDOWN)))
        self.close()

    def stop(self) -> None:
        parse_result(Command.STOP, self._transact(Command.STOP, encode_request(Command.STOP)))

    def get_config(self) -> int:
        return parse_config(self._transact(Command.GET_CONFIG, encode_request(Command.GET_CONFIG)))

    def store_volatile(self) -> None:
        parse_result(Command.STORE_VOLATILE,
                     self._transact(Command.STORE_VOLATILE, encode_request(Command.STORE_VOLATILE)))

    def get_stateblob(self, blob_type: BlobType, *, decrypted: bool = True) -> StateBlob:
        """Read one blob; the TPM must be running.

        Reading the volatile blob makes swtpm store it and then delete the
        volatile state file. With ``--migration-key`` the blob is always
        encrypted under that key, whatever ``decrypted`` says; ``decrypted``
        only strips the at-rest layer so a target with another at-rest key
        can take it.
        """
        data = self._transact(Command.GET_STATEBLOB,
                              encode_get_stateblob(blob_type, decrypted=decrypted))
        return parse_stateblob(blob_type, data, max_size=self.max_blob_size)

    def set_stateblob(self, blob_type: BlobType, data: bytes, flags: int = 0) -> None:
        """Set one blob; the TPM must be stopped. It is used at the next INIT."""
        request = encode_set_stateblob(blob_type, data, flags, max_size=self.max_blob_size)
        parse_result(Command.SET_STATEBLOB, self._transact(Command.SET_STATEBLOB, request))

    def set_locality(self, locality: int) -> None:
        parse_result(Command.SET_LOCALITY,
                     self._transact(Command.SET_LOCALITY, encode_set_locality(locality)))

    def get_info(self, flags: int) -> str:
        return parse_info(self._transact(Command.GET_INFO, encode_get_info(flags)))


# --------------------------------------------------------------------------
# Whole-state transfer (QEMU not attached)
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExportedState:
    """Permanent + volatile blobs, both sealed under the migration key."""

    permanent: bytes = dataclasses.field(repr=False)
    volatile: bytes = dataclasses.field(repr=False)
    permanent_flags: int = 0
    volatile_flags: int = 0

    def __repr__(self) -> str:
        return ("ExportedState(permanent=<%d bytes>, volatile=<%d bytes>, "
                "permanent_flags=0x%x, volatile_flags=0x%x)" % (
                    len(self.permanent), len(self.volatile),
                    self.permanent_flags, self.volatile_flags))


def _require_sealed(blob: bytes, what: str) -> None:
    """Refuse blobs not encrypted under a migration key.

    swtpm 0.7.1 accepts a SET of a blob that carries no migration-key layer
    even when it runs with --migration-key ("upgrade" path): without this
    check anyone able to hand us a blob could inject plaintext state.
    """
    header = parse_blob_header(blob)
    if not header.migration_encrypted:
        raise exception.InvalidInput(reason="%s blob is not encrypted under a migration key"
                                     % what)
    if not header.flags & BLOB_FLAG_MIGRATION_256BIT_KEY:
        raise exception.InvalidInput(reason="%s blob is not sealed with a 256-bit migration key"
                                     % what)


def export_state(path: Path | str, timeout: float = 5.0, *,
                 max_blob_size: int = MAX_BLOB_SIZE) -> ExportedState:
    """Read permanent + volatile state from a swtpm QEMU is not attached to.

    The TPM is started (INIT, keeping the volatile state file) if it was
    stopped, and left running. Refuses a swtpm without a migration key: its
    blobs would come out in plaintext.
    """
    with CtrlClient(path, timeout, max_blob_size=max_blob_size) as client:
        config = client.get_config()
        if not config & CONFIG_FLAG_MIGRATION_KEY:
            raise _fail("export_state", "swtpm runs without a migration key; "
                        "refusing to export plaintext state")
        try:
            permanent = client.get_stateblob(BlobType.PERMANENT)
        except exception.CtrlChannelError as exc:
            if error_result(exc) != TPM_BAD_ORDINAL:
                raise
            LOG.debug("TPM behind %(path)s not running; INIT before export", {"path": str(path)})
            client.init(delete_volatile=False)
            permanent = client.get_stateblob(BlobType.PERMANENT)
        volatile = client.get_stateblob(BlobType.VOLATILE)
    for blob, what in ((permanent.data, "permanent"), (volatile.data, "volatile")):
        try:
            _require_sealed(blob, what)
        except exception.InvalidInput as exc:
            raise _fail("export_state", exc.message) from None
    LOG.info("Exported swtpm state from %(path)s: permanent %(p)d bytes, volatile %(v)d bytes",
             {"path": str(path), "p": len(permanent.data), "v": len(volatile.data)})
    return ExportedState(permanent.data, volatile.data, permanent.flags, volatile.flags)


def _validate_import(state: ExportedState, max_blob_size: int) -> None:
    for blob, flags, what in ((state.permanent, state.permanent_flags, "permanent"),
                              (state.volatile, state.volatile_flags, "volatile")):
        if not blob:
            raise exception.InvalidInput(reason="%s blob is empty" % what)
        if len(blob) > max_blob_size:
            raise exception.InvalidInput(reason="%s blob of %d bytes exceeds the limit of %d"
                                         % (what, len(blob), max_blob_size))
        if flags & ~STATE_FLAG_ENCRYPTED:
            raise exception.InvalidInput(reason="%s blob has unknown flags 0x%x" % (what, flags))
        _require_sealed(blob, what)


def import_state(path: Path | str, state: ExportedState, timeout: float = 5.0, *,
                 vtpcm_id: str = "<unnamed>", max_blob_size: int = MAX_BLOB_SIZE,
                 empty_target: bool = False) -> None:
    """Replace the state of a swtpm QEMU is not attached to, then run it.

    Sequence: (INIT if stopped,) snapshot the target's own blobs, STOP,
    SET permanent, SET volatile, INIT(delete volatile): the TPM then
    continues where the exporter stopped (no TPM2_Startup needed).

    If swtpm rejects a blob (other migration key, tampering) the snapshot is
    set back and the TPM restarted, so the target's TPM state is as it was
    (a blob that was already accepted stays cached in libtpms until the next
    INIT, and a zero-length SET does not clear it: it sets an EMPTY state,
    hence the snapshot). A target that was stopped is stopped again.
    StateImportError is raised. Bad input is refused before any contact.

    ``empty_target``: the swtpm was started on an empty state directory and
    never initialized (an incoming vTPCM). The blobs are set and INIT run as
    QEMU's incoming side does; there is nothing to snapshot, and INITing it
    first would manufacture a TPM. After a failure the caller discards it.
    """
    try:
        _validate_import(state, max_blob_size)
    except exception.InvalidInput as exc:
        raise exception.StateImportError(vtpcm_id=vtpcm_id, reason=exc.message) from None
    with CtrlClient(path, timeout, max_blob_size=max_blob_size) as client:
        config = client.get_config()
        if config != CONFIG_FLAG_FILE_KEY | CONFIG_FLAG_MIGRATION_KEY:
            raise exception.StateImportError(
                vtpcm_id=vtpcm_id,
                reason="target swtpm must run with an at-rest and a migration key "
                       "(config flags 0x%x)" % config)
        was_running = False
        snapshot: tuple[StateBlob, StateBlob] | None = None
        if not empty_target:
            was_running = _ensure_running(client)
            snapshot = (client.get_stateblob(BlobType.PERMANENT),
                        client.get_stateblob(BlobType.VOLATILE))
            client.stop()
        try:
            client.set_stateblob(BlobType.PERMANENT, state.permanent, state.permanent_flags)
            client.set_stateblob(BlobType.VOLATILE, state.volatile, state.volatile_flags)
            client.init(delete_volatile=True)
        except exception.CtrlChannelError as exc:
            if snapshot is not None:
                _restore_after_failed_import(client, snapshot, was_running, vtpcm_id)
            raise exception.StateImportError(
                vtpcm_id=vtpcm_id,
                reason="swtpm refused the state (%s); wrong migration key or damaged blob%s"
                % (exc.message, "; target restored" if snapshot is not None else "")
            ) from None
    LOG.info("Imported swtpm state into %(kind)svTPCM %(id)s (%(p)d + %(v)d bytes)",
             {"kind": "empty " if empty_target else "", "id": vtpcm_id,
              "p": len(state.permanent), "v": len(state.volatile)})


def _ensure_running(client: CtrlClient) -> bool:
    """INIT a stopped TPM (keeping its volatile file); True if it was running."""
    try:
        client.store_volatile()
    except exception.CtrlChannelError as exc:
        if error_result(exc) != TPM_BAD_ORDINAL:
            raise
        client.init(delete_volatile=False)
        return False
    return True


def _restore_after_failed_import(client: CtrlClient, snapshot: tuple[StateBlob, StateBlob],
                                 was_running: bool, vtpcm_id: str) -> None:
    """Set the target's own blobs back and restart it from them."""
    try:
        client.stop()
        for blob in snapshot:
            client.set_stateblob(blob.blob_type, blob.data, blob.flags)
        client.init(delete_volatile=True)
        if not was_running:
            client.store_volatile()
            client.stop()
    except exception.CtrlChannelError as exc:
        LOG.error("vTPCM %(id)s: restoring the target after a failed import failed: %(err)s",
                  {"id": vtpcm_id, "err": exc.message})
        raise exception.StateImportError(
            vtpcm_id=vtpcm_id,
            reason="import failed and the target could not be restored (%s)" % exc.message
        ) from None
