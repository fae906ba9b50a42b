"""What the control-channel proxy lets through to swtpm, and what it saw: pure.

Why: swtpm 0.7.1 takes any state blob sealed under its migration key, of
any generation, or a plaintext one, as often as its control client sends
one, and that client is the VM's QEMU for the VM's whole life. Between
QEMU and swtpm the proxy (``ctrlproxy``) lets the state be set once per
blob type, migration-encrypted, before the TPM first starts (what an
incoming QEMU does: STOP, SET_STATEBLOB, INIT), refuses every command
QEMU does not use, and keeps a digest of each blob QEMU read or set: the
post-import check then compares the volatile state too, which swtpm never
writes to disk while it runs.

Framing: QEMU 7.2 sends each request as the u32 command code followed by
its request struct in one write (``tpm_emulator_ctrlcmd``: the union's
size for SET_LOCALITY, INIT and RESET_TPMESTABLISHED), and SET_STATEBLOB
as its 12-byte header, then the blob. The proxy takes exactly those sizes,
so bytes a client sends after a request are a request of their own, checked
like any other, never a tail swtpm might read. No I/O here: ``ctrlproxy``
feeds bytes in and sends what this returns.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct

from vtpcm_agent.swtpm.framing import (
    BLOB_FLAG_MIGRATION_ENCRYPTED,
    BLOB_HEADER,
    MAX_BLOB_SIZE,
    STATE_FLAG_ENCRYPTED,
    TPM_BAD_ORDINAL,
    TPM_BAD_PARAMETER,
    TPM_SUCCESS,
    BlobType,
)

RECORD_VERSION = 1
MAX_REASONS = 8  # refusals and failures the record keeps (the last ones)

_U32 = struct.Struct(">I")
_STATE_REQ = struct.Struct(">III")  # flags, type, offset (GET) / length (SET)
_GET_REPLY_HEADER = struct.Struct(">IIII")  # result, flags, totlength, length


class Op(enum.IntEnum):
    """The control commands QEMU 7.2's tpm-emulator backend sends."""

    GET_CAPABILITY = 0x01
    INIT = 0x02
    SHUTDOWN = 0x03
    GET_TPMESTABLISHED = 0x04
    SET_LOCALITY = 0x05
    CANCEL_TPM_CMD = 0x09
    RESET_TPMESTABLISHED = 0x0B
    GET_STATEBLOB = 0x0C
    SET_STATEBLOB = 0x0D
    STOP = 0x0E
    SET_DATAFD = 0x10
    SET_BUFFERSIZE = 0x11
    # framed but never forwarded: QEMU 7.2 does not send them to swtpm 0.7.1
    STORE_VOLATILE = 0x0A
    GET_CONFIG = 0x0F
    GET_INFO = 0x12
    LOCK_STORAGE = 0x13


# request struct bytes after the command code, as QEMU 7.2 sends them
REQUEST_SIZE = {
    Op.GET_CAPABILITY: 0, Op.INIT: 4, Op.SHUTDOWN: 0, Op.GET_TPMESTABLISHED: 0,
    Op.SET_LOCALITY: 4, Op.CANCEL_TPM_CMD: 0, Op.RESET_TPMESTABLISHED: 4,
    Op.GET_STATEBLOB: _STATE_REQ.size, Op.SET_STATEBLOB: _STATE_REQ.size, Op.STOP: 0,
    Op.SET_DATAFD: 0, Op.SET_BUFFERSIZE: 4,
    Op.STORE_VOLATILE: 0, Op.GET_CONFIG: 0, Op.GET_INFO: 16, Op.LOCK_STORAGE: 4,
}
NEVER_FORWARDED = frozenset({Op.STORE_VOLATILE, Op.GET_CONFIG, Op.GET_INFO, Op.LOCK_STORAGE})


class Malformed(Exception):
    """A request the proxy cannot frame (unknown command, oversized blob):
    the connection ends, since what follows cannot be told apart."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One framed request: its command and all its bytes (code included)."""

    op: Op
    raw: bytes = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return "Request(op=%s, size=%d)" % (self.op.name, len(self.raw))


def frame(buffer: bytes | bytearray, *,
          max_blob: int = MAX_BLOB_SIZE) -> tuple[Request | None, int]:
    """The first complete request in ``buffer`` and its length, or (None, 0)
    while more bytes are needed. Raises ``Malformed`` for a command QEMU
    never sends or a blob larger than ``max_blob``."""
    if len(buffer) < 4:
        return None, 0
    (code,) = _U32.unpack_from(buffer)
    try:
        op = Op(code)
    except ValueError:
        raise Malformed("command 0x%08x is not one QEMU sends" % code) from None
    need = 4 + REQUEST_SIZE[op]
    if op is Op.SET_STATEBLOB and len(buffer) >= need:
        _, _, length = _STATE_REQ.unpack_from(buffer, 4)
        if length > max_blob:
            raise Malformed("SET_STATEBLOB announces %d bytes, limit is %d" % (length, max_blob))
        need += length
    if len(buffer) < need:
        return None, 0
    return Request(op, bytes(buffer[:need])), need


@dataclasses.dataclass(frozen=True)
class BlobSeen:
    """One state blob that passed the proxy: its type, state flags, size and
    SHA-256 (never the blob)."""

    blob_type: int
    flags: int
    size: int
    sha256: str

    def to_json(self) -> list[object]:
        return [self.flags, self.size, self.sha256]


def blob_seen(blob_type: int, flags: int, data: bytes) -> BlobSeen:
    return BlobSeen(blob_type, flags, len(data), hashlib.sha256(data).hexdigest())


@dataclasses.dataclass(frozen=True)
class Refuse:
    """Answer the client ``reply`` (a 4-byte error result) instead of
    forwarding; ``reason`` goes to the record and the log."""

    reply: bytes
    reason: str


@dataclasses.dataclass(frozen=True)
class Forward:
    """Send the request on to swtpm."""


def _error(result: int) -> bytes:
    return _U32.pack(result)


class Policy:
    """One swtpm's proxy state across its clients (QEMU reconnecting does
    not reopen the import): what may pass, and the blobs read and set.

    ``started`` becomes true with the first INIT forwarded: from then on
    the TPM's state is the one it runs with, and only a new swtpm (a new
    proxy) takes state again. ``closed``: no state passes at all (every
    swtpm but an incoming one still waiting for its stream: its state is
    its own, or the agent imported it on a cold path)."""

    def __init__(self, closed: bool = False) -> None:
        self.closed = closed
        self.started = False
        self.got: dict[int, BlobSeen] = {}
        self.set: dict[int, BlobSeen] = {}
        self.refused: list[str] = []  # the last MAX_REASONS
        self.refused_count = 0
        self.failed: list[str] = []
        self._failed_types: set[int] = set()
        # a STOP this proxy forwarded succeeded and no INIT followed: only
        # then is swtpm known to be stopped, so that it reads a whole
        # SET_STATEBLOB (on a running TPM swtpm 0.7.1 answers after 4104
        # bytes and reads the rest of the blob as more commands: review of
        # the proxy, HIGH 1)
        self.stopped = False
        self._in_flight: Request | None = None
        self._reply = bytearray()
        # bumped by every change of what ``record`` returns
        self.changes = 0

    def _fail(self, blob_type: int, reason: str) -> None:
        self._failed_types.add(blob_type)
        self.failed = (self.failed + [reason])[-MAX_REASONS:]
        self.changes += 1

    def disconnected(self) -> None:
        """The client left: a reply still due belongs to no one now. A SET
        whose answer it did not wait for may have reached swtpm: it counts
        as failed (its type closed, the import incomplete), never as
        unseen (review of the proxy, MEDIUM 3)."""
        request = self._in_flight
        if request is not None and request.op is Op.SET_STATEBLOB:
            blob_type = _STATE_REQ.unpack_from(request.raw, 4)[1]
            self._fail(blob_type, "the client left before swtpm answered SET_STATEBLOB %s"
                       % BlobType(blob_type).name.lower())
        self._in_flight = None
        self._reply = bytearray()
        # swtpm's running state is its own, not the connection's: the
        # agent may INIT it directly before the next client comes (review
        # round 2, MEDIUM): a STOP counts on its own connection only
        self.stopped = False

    def decide(self, request: Request) -> Forward | Refuse:
        """Whether ``request`` goes on to swtpm; a forwarded request is the
        one whose reply ``on_reply`` then reads."""
        if request.op in NEVER_FORWARDED:
            return Refuse(_error(TPM_BAD_ORDINAL), "%s is not forwarded" % request.op.name)
        refusal = self._refusal(request)
        if refusal is not None:
            self.refused_count += 1
            self.refused = (self.refused + [refusal])[-MAX_REASONS:]
            self.changes += 1
            return Refuse(_error(TPM_BAD_PARAMETER), refusal)
        if request.op is Op.INIT:
            self.stopped = False
            if not self.started:
                self.started = True
                self.changes += 1
        self._in_flight = request
        self._reply = bytearray()
        return Forward()

    def _refusal(self, request: Request) -> str | None:
        if request.op is not Op.SET_STATEBLOB:
            return None
        flags, blob_type, length = _STATE_REQ.unpack_from(request.raw, 4)
        data = request.raw[4 + _STATE_REQ.size:]
        if blob_type not in (BlobType.PERMANENT, BlobType.VOLATILE, BlobType.SAVESTATE):
            return "SET_STATEBLOB of unknown blob type %d" % blob_type
        name = BlobType(blob_type).name.lower()
        if self.closed:
            return ("SET_STATEBLOB %s into a swtpm that takes no stream (not an incoming "
                    "one waiting for its state)" % name)
        if self.started:
            return ("SET_STATEBLOB %s after the TPM started: state is set only before the "
                    "first INIT (one import per swtpm)" % name)
        if blob_type in self.set or blob_type in self._failed_types:
            return "a second SET_STATEBLOB %s (one import per swtpm)" % name
        if self.refused_count:
            return "SET_STATEBLOB %s after a refused one" % name
        if not self.stopped:
            return ("SET_STATEBLOB %s without a STOP before it (swtpm would read part of "
                    "the blob as commands)" % name)
        if length == 0:
            return "an empty SET_STATEBLOB %s (it would clear a blob set before)" % name
        if flags & ~STATE_FLAG_ENCRYPTED:
            return "SET_STATEBLOB %s with unknown state flags 0x%x" % (name, flags)
        if len(data) < BLOB_HEADER.size:
            return "SET_STATEBLOB %s shorter than a blob header" % name
        header_flags = BLOB_HEADER.unpack_from(data)[3]
        if not header_flags & BLOB_FLAG_MIGRATION_ENCRYPTED:
            return ("a SET_STATEBLOB %s that is not migration-encrypted (swtpm 0.7.1 would "
                    "take it as plaintext)" % name)
        return None

    def awaiting(self) -> bool:
        """Whether a forwarded request's reply is still due: the proxy sends
        swtpm one request at a time, so a client that sends the next one
        early cannot have it read as the tail of the last, nor its reply
        taken for another's."""
        return self._in_flight is not None

    def on_reply(self, chunk: bytes) -> None:
        """Account for bytes swtpm sent back to the request in flight (they
        are forwarded as they come, whatever this concludes). Any reply
        but GET_STATEBLOB's comes in one write of at most 16 bytes."""
        request = self._in_flight
        if request is None:
            return
        if request.op not in (Op.GET_STATEBLOB, Op.SET_STATEBLOB, Op.STOP):
            self._in_flight = None
            return
        self._reply += chunk
        if len(self._reply) < 4:
            return
        (result,) = _U32.unpack_from(self._reply)
        if request.op is Op.STOP:
            self._in_flight = None
            self.stopped = result == TPM_SUCCESS
            return
        flags, blob_type, offset = _STATE_REQ.unpack_from(request.raw, 4)
        if request.op is Op.SET_STATEBLOB:
            self._in_flight = None
            data = request.raw[4 + _STATE_REQ.size:]
            if result == TPM_SUCCESS:
                self.changes += 1
                self.set[blob_type] = blob_seen(blob_type, flags, data)
            else:
                self._fail(blob_type, "swtpm refused SET_STATEBLOB %s: 0x%08x"
                           % (BlobType(blob_type).name.lower(), result))
            return
        # the whole reply is waited for (QEMU reads its 16-byte header even
        # on an error), so that none of it is taken for the next request's
        if len(self._reply) < _GET_REPLY_HEADER.size:
            return
        _, reply_flags, total, length = _GET_REPLY_HEADER.unpack_from(self._reply)
        end = _GET_REPLY_HEADER.size + (length if result == TPM_SUCCESS else 0)
        if len(self._reply) < end:
            return
        self._in_flight = None
        if result != TPM_SUCCESS or offset != 0 or length != total:
            # a failed read, or part of a blob, is not the blob QEMU streams
            return
        self.changes += 1
        self.got[blob_type] = blob_seen(blob_type, reply_flags,
                                        bytes(self._reply[_GET_REPLY_HEADER.size:end]))

    def record(self, swtpm_pid: int) -> dict[str, object]:
        """What the agent reads (``ctrlproxy.read_record``): digests, sizes,
        flags and refusals, never a blob."""
        return {
            "version": RECORD_VERSION, "swtpm_pid": swtpm_pid, "started": self.started,
            "closed": self.closed,
            "got": {str(t): b.to_json() for t, b in sorted(self.got.items())},
            "set": {str(t): b.to_json() for t, b in sorted(self.set.items())},
            "refused_count": self.refused_count, "refused": list(self.refused),
            "failed": list(self.failed),
        }

