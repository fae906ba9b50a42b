"""Framing of swtpm 0.7.1's control channel: pure functions over bytes.

Why apart from the socket: every reply of a peer we do not trust is checked
here without I/O, so the framing tests can feed it truncated and tampered
replies byte by byte.

Protocol (big-endian): request = u32 command code + request struct, reply =
response struct only. Replies of result-carrying commands start with a TPM
1.2 style u32 result; on an error swtpm may send just those 4 bytes (e.g.
GET_STATEBLOB on a stopped TPM) or the full header (GET_STATEBLOB failing
inside swtpm). The client therefore reads 4 bytes first and stops there on
any non-zero result.

Never raise with blob contents: only command names, result codes and sizes
appear in messages.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from vtpcm_common import exception

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
