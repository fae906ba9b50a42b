"""The keyed digest of a vTPCM's permanent state: the post-import check's unit.

Why: the engine must know, before the commit point, that the state the
destination's swtpm imported is the source's, without either agent sending
state. Each agent decrypts its own at-rest ``tpm2-00.permall``
(``vtpcm_agent.swtpm.permall``) and answers this digest, keyed with the
engine's fresh nonce: equal digests mean byte-identical libtpms permanent
state; the digest says nothing else about it, and one check's answers are
no use to another. Pure: no I/O.
"""

import hashlib
import hmac
import struct

from vtpcm_common import exception

NONCE_SIZE = 32
DIGEST_SIZE = 32
_LABEL = b"vtpcm permanent state digest v1\x00"


def permanent_state_digest(nonce: bytes, plaintext: bytes) -> bytes:
    """HMAC-SHA256 under ``nonce`` of a label and the plaintext permanent state."""
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise exception.InvalidInput(reason="a state digest nonce must be %d bytes"
                                     % NONCE_SIZE)
    if not isinstance(plaintext, bytes) or not plaintext:
        raise exception.InvalidInput(reason="the permanent state to digest is empty")
    return hmac.new(nonce, _LABEL + plaintext, hashlib.sha256).digest()


def same(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two digests."""
    return hmac.compare_digest(a, b)


_STREAM_LABEL = b"vtpcm migration stream blobs digest v1\x00"
STREAM_BLOB_TYPES = (1, 2)  # permanent, volatile (a TPM 2's savestate is empty)


def stream_digest(nonce: bytes, blobs: dict[int, tuple[int, int, str]]) -> bytes:
    """HMAC-SHA256 under ``nonce`` of the state blobs one side's QEMU read
    or set through the control-channel proxy: ``{blob type: (state flags,
    size, SHA-256 hex)}``, the permanent and the volatile one both required
    (equal digests: the destination's QEMU set exactly the blobs the
    source's QEMU last read, volatile state included)."""
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise exception.InvalidInput(reason="a state digest nonce must be %d bytes"
                                     % NONCE_SIZE)
    if sorted(blobs) != list(STREAM_BLOB_TYPES):
        raise exception.InvalidInput(reason="a stream digest needs the permanent and the "
                                            "volatile blob, got types %s" % sorted(blobs))
    mac = hmac.new(nonce, _STREAM_LABEL, hashlib.sha256)
    for blob_type in STREAM_BLOB_TYPES:
        flags, size, sha256 = blobs[blob_type]
        mac.update(struct.pack(">III", blob_type, flags, size) + bytes.fromhex(sha256))
    return mac.digest()
