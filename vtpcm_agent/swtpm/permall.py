"""swtpm 0.7.1's at-rest state files, decrypted without swtpm: pure functions.

Why: a post-import check (design, "Open points") needs the destination's
agent to read what its swtpm holds (``tpm2-00.permall``, libtpms' permanent
state) while QEMU holds that swtpm's only control channel, so GET_STATEBLOB
is out of reach; the file, encrypted under the vTPCM's at-rest key (the
agent's ``--key``), is not. Nothing here does I/O: the caller reads the
file, this checks and decrypts its bytes.

Format (swtpm v0.7.1, src/swtpm/swtpm_nvstore.c ``SWTPM_NVRAM_StoreData_Intern``
/ ``SWTPM_NVRAM_EncryptData`` / ``SWTPM_NVRAM_PrependHeader``; tlv.c; swtpm_aes.c),
all integers big-endian:

* header, 10 bytes: u8 version (2), u8 min_version (1), u16 hdrsize (10),
  u16 flags, u32 totlen (header included, = file size). With a 256-bit
  ``--key`` the flags are ENCRYPTED | ENCRYPTED_256BIT_KEY (0x09).
* then TLVs (u16 tag, u32 length, data), written in this order (read in
  any order, each exactly once): 2 the ciphertext, 3 an HMAC-SHA256, 6 the
  IV (32 random bytes: as long as the key).
* HMAC-SHA256 keyed with the at-rest key itself (no derived key) over
  ciphertext || IV (all 32 IV bytes).
* AES-256-CBC with the IV's first 16 bytes, no OpenSSL padding; swtpm pads
  the plaintext itself to a multiple of the KEY length (32, not the 16-byte
  block): 1 to 32 bytes, each holding the pad length.

swtpm's own reader (``SWTPM_NVRAM_DecryptData``) accepts more than its
writer produces (any TLV order, unknown tags, a missing IV meaning zeros,
a longer HMAC field); this reader takes only the three TLVs swtpm 0.7.1
writes, of their sizes, under a version-2 header (min_version up to 2), at
most ``MAX_FILE_SIZE`` bytes, and checks the HMAC (in constant time) before
decrypting anything. Other versions' formats are refused, not guessed.

Errors (``StateFileError``) name the check and offsets, never key or state
bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vtpcm_common import exception

KEY_SIZE = 32
HEADER = struct.Struct(">BBHHI")  # version, min_version, hdrsize, flags, totlen
TLV_HEADER = struct.Struct(">HI")  # tag, length
HEADER_VERSION = 2
FLAG_ENCRYPTED = 0x01
FLAG_ENCRYPTED_256BIT_KEY = 0x08
EXPECTED_FLAGS = FLAG_ENCRYPTED | FLAG_ENCRYPTED_256BIT_KEY
TAG_ENCRYPTED_DATA = 2
TAG_HMAC = 3
TAG_IVEC_ENCRYPTED_DATA = 6
HMAC_SIZE = 32
IV_SIZE = KEY_SIZE  # swtpm rolls an IV as long as the key; AES-CBC uses 16
_AES_BLOCK = 16
# libtpms' permanent state is a few kB (1.4 kB fresh, ~6 kB with an EK,
# its certificates and NV indices); a file the swtpm's uid made larger is
# refused before anything is copied or hashed (review of the reader: a
# 4 GiB file cost ~2x its size in memory before the HMAC refused it)
MAX_FILE_SIZE = 1 << 20
_TAGS = (TAG_ENCRYPTED_DATA, TAG_HMAC, TAG_IVEC_ENCRYPTED_DATA)


def _refuse(name: str, reason: str) -> exception.StateFileError:
    return exception.StateFileError(name=name, reason=reason)


def _check_header(data: bytes, name: str) -> None:
    if len(data) > MAX_FILE_SIZE:
        raise _refuse(name, "%d bytes, more than the %d a state file may have"
                      % (len(data), MAX_FILE_SIZE))
    if len(data) < HEADER.size:
        raise _refuse(name, "%d bytes, shorter than the %d-byte header"
                      % (len(data), HEADER.size))
    version, min_version, hdrsize, flags, totlen = HEADER.unpack_from(data)
    if version != HEADER_VERSION or min_version > HEADER_VERSION:
        raise _refuse(name, "header version %d (minimum %d); only version %d is known"
                      % (version, min_version, HEADER_VERSION))
    if hdrsize != HEADER.size:
        raise _refuse(name, "header size %d, expected %d" % (hdrsize, HEADER.size))
    if totlen != len(data):
        raise _refuse(name, "header gives a length of %d bytes, the file has %d"
                      % (totlen, len(data)))
    if flags != EXPECTED_FLAGS:
        raise _refuse(name, "header flags 0x%02x, expected 0x%02x (encrypted at rest with "
                      "a 256-bit key)" % (flags, EXPECTED_FLAGS))


def _split_tlvs(data: bytes, name: str) -> dict[int, bytes]:
    """The three TLVs after the header, each once, nothing else."""
    fields: dict[int, bytes] = {}
    offset = HEADER.size
    while offset < len(data):
        if offset + TLV_HEADER.size > len(data):
            raise _refuse(name, "truncated TLV header at offset %d" % offset)
        tag, length = TLV_HEADER.unpack_from(data, offset)
        start = offset + TLV_HEADER.size
        if length > len(data) - start:
            raise _refuse(name, "TLV tag %d at offset %d declares %d bytes, %d remain"
                          % (tag, offset, length, len(data) - start))
        if tag not in _TAGS:
            raise _refuse(name, "unknown TLV tag %d at offset %d" % (tag, offset))
        if tag in fields:
            raise _refuse(name, "TLV tag %d repeated at offset %d" % (tag, offset))
        fields[tag] = data[start:start + length]
        offset = start + length
    missing = [tag for tag in _TAGS if tag not in fields]
    if missing:
        raise _refuse(name, "TLV tag(s) %s missing" % ", ".join(str(t) for t in missing))
    return fields


def decrypt_state_file(data: bytes, at_rest_key: bytes, *,
                       name: str = "tpm2-00.permall") -> bytes:
    """The plaintext libtpms state blob inside swtpm's at-rest file ``data``.

    ``at_rest_key`` is the 32-byte key the agent gives swtpm with ``--key``.
    ``name`` only labels errors. Raises StateFileError on a header other
    than swtpm 0.7.1's for a 256-bit key, malformed or truncated TLVs, an
    HMAC that does not match (wrong key or tampering) or bad padding.
    """
    if not isinstance(at_rest_key, bytes) or len(at_rest_key) != KEY_SIZE:
        raise exception.InvalidInput(reason="at-rest key must be %d bytes" % KEY_SIZE)
    if not isinstance(data, bytes):
        raise exception.InvalidInput(reason="state file contents must be bytes")
    _check_header(data, name)
    fields = _split_tlvs(data, name)
    ciphertext, mac, iv = (fields[TAG_ENCRYPTED_DATA], fields[TAG_HMAC],
                           fields[TAG_IVEC_ENCRYPTED_DATA])
    if len(mac) != HMAC_SIZE:
        raise _refuse(name, "HMAC of %d bytes, expected %d" % (len(mac), HMAC_SIZE))
    if len(iv) != IV_SIZE:
        raise _refuse(name, "IV of %d bytes, expected %d" % (len(iv), IV_SIZE))
    if not ciphertext or len(ciphertext) % KEY_SIZE:
        raise _refuse(name, "ciphertext of %d bytes, not a positive multiple of %d"
                      % (len(ciphertext), KEY_SIZE))
    expected = hmac.new(at_rest_key, ciphertext + iv, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        raise _refuse(name, "HMAC mismatch (wrong at-rest key, or the file was altered)")
    decryptor = Cipher(algorithms.AES(at_rest_key), modes.CBC(iv[:_AES_BLOCK])).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    pad = padded[-1]
    if not 1 <= pad <= KEY_SIZE or padded[-pad:] != bytes([pad]) * pad:
        raise _refuse(name, "bad padding after a valid HMAC (not written by swtpm 0.7.1)")
    return padded[:-pad]
