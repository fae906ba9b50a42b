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
