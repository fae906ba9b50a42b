"""swtpm 0.7.1's at-rest state file, decrypted without swtpm: bytes only.

The known-answer vector was computed with the openssl CLI (``openssl enc
-aes-256-cbc -nopad`` on the plaintext padded by hand to 32 bytes, ``openssl
dgst -sha256 -mac HMAC`` over ciphertext || IV), not with this module; the
other vectors come from ``_seal``, written from swtpm's source
(swtpm_nvstore.c ``SWTPM_NVRAM_EncryptData``, swtpm_aes.c). The real files
of real swtpm processes are in tests/functional/agent/test_permall_moved.py.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.refusal import refused
from vtpcm_agent.swtpm import permall
from vtpcm_common import exception

KEY = bytes(range(32))
IV = bytes(range(0x40, 0x60))
KAT_PLAIN = b"libtpms permanent state"
KAT_FILE = bytes.fromhex(
    "0201000a0009" "0000007c"
    "0002" "00000020" "46f826505f19e9b9c0f59ddc66b1cb86dba0ede53db66062c957175e5efb7f8c"
    "0003" "00000020" "4cc4110738ff8c3b391364384b90790caa861eb7b80a9e82a3f398f0e1df2bb8"
    "0006" "00000020" + IV.hex())
NAME = "tpm2-00.permall"
PREFIX = "swtpm state file tpm2-00.permall rejected: "


def _tlv(tag: int, value: bytes) -> bytes:
    return struct.pack(">HI", tag, len(value)) + value


def _file(tlvs: bytes, flags: int = 0x09, version: int = 2, min_version: int = 1,
          hdrsize: int = 10, totlen: int | None = None) -> bytes:
    size = 10 + len(tlvs) if totlen is None else totlen
    return struct.pack(">BBHHI", version, min_version, hdrsize, flags, size) + tlvs


def _encrypt(padded: bytes, key: bytes, iv: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CBC(iv[:16])).encryptor()
    return enc.update(padded) + enc.finalize()


def _mac(ciphertext: bytes, key: bytes, iv: bytes) -> bytes:
    return hmac.new(key, ciphertext + iv, hashlib.sha256).digest()


def _seal(plain: bytes, key: bytes = KEY, iv: bytes = IV) -> bytes:
    """What swtpm 0.7.1 writes for ``plain`` under a 256-bit --key."""
    pad = 32 - len(plain) % 32
    ct = _encrypt(plain + bytes([pad]) * pad, key, iv)
    return _file(_tlv(2, ct) + _tlv(3, _mac(ct, key, iv)) + _tlv(6, iv))


def _no_key_in(err: BaseException, key: bytes = KEY) -> None:
    for text in (str(err), repr(err), repr(getattr(err, "kwargs", {}))):
        assert key.hex() not in text.lower()
        assert repr(key)[2:-1] not in text


# ------------------------------------------------------------------ accepted

def test_known_answer_vector():
    assert permall.decrypt_state_file(KAT_FILE, KEY) == KAT_PLAIN


@pytest.mark.parametrize("size", [0, 1, 15, 16, 31, 32, 33, 64, 6427])
def test_roundtrip_of_every_padding_length(size):
    plain = bytes((i * 7) & 0xFF for i in range(size))
    assert permall.decrypt_state_file(_seal(plain), KEY) == plain


def test_tlv_order_is_free():
    """swtpm looks each tag up wherever it is; so does this reader."""
    pad = 32 - len(KAT_PLAIN) % 32
    ct = _encrypt(KAT_PLAIN + bytes([pad]) * pad, KEY, IV)
    data = _file(_tlv(6, IV) + _tlv(2, ct) + _tlv(3, _mac(ct, KEY, IV)))
    assert permall.decrypt_state_file(data, KEY) == KAT_PLAIN


# ------------------------------------------------------------ authentication

def test_wrong_key_is_refused():
    with refused(exception.StateFileError,
                 PREFIX + "HMAC mismatch (wrong at-rest key, or the file was altered)") as err:
        permall.decrypt_state_file(KAT_FILE, bytes(range(1, 33)))
    _no_key_in(err.value)
    _no_key_in(err.value, bytes(range(1, 33)))


@pytest.mark.parametrize("offset", [
    10 + 6,            # first ciphertext byte
    10 + 6 + 31,       # last ciphertext byte (the padding)
    10 + 38 + 6,       # first HMAC byte
    10 + 38 + 6 + 31,  # last HMAC byte
    10 + 76 + 6,       # first IV byte (used by AES-CBC)
    10 + 76 + 6 + 31,  # last IV byte (unused by AES, covered by the HMAC)
])
def test_any_flipped_bit_is_refused(offset):
    data = bytearray(KAT_FILE)
    data[offset] ^= 0x01
    with refused(exception.StateFileError,
                 PREFIX + "HMAC mismatch (wrong at-rest key, or the file was altered)") as err:
        permall.decrypt_state_file(bytes(data), KEY)
    _no_key_in(err.value)


@pytest.mark.parametrize("pad_byte", [0, 33])
def test_bad_padding_under_a_valid_hmac_is_refused(pad_byte):
    ct = _encrypt(KAT_PLAIN + bytes([pad_byte]) * 9, KEY, IV)
    data = _file(_tlv(2, ct) + _tlv(3, _mac(ct, KEY, IV)) + _tlv(6, IV))
    with refused(exception.StateFileError,
                 PREFIX + "bad padding after a valid HMAC (not written by swtpm 0.7.1)"):
        permall.decrypt_state_file(data, KEY)


def test_inconsistent_padding_bytes_are_refused():
    ct = _encrypt(KAT_PLAIN + b"\x08" + b"\x09" * 8, KEY, IV)
    data = _file(_tlv(2, ct) + _tlv(3, _mac(ct, KEY, IV)) + _tlv(6, IV))
    with refused(exception.StateFileError,
                 PREFIX + "bad padding after a valid HMAC (not written by swtpm 0.7.1)"):
        permall.decrypt_state_file(data, KEY)


# -------------------------------------------------------------- truncation

@pytest.mark.parametrize("cut", range(0, len(KAT_FILE)))
def test_every_truncation_is_refused(cut):
    with pytest.raises(exception.StateFileError) as err:
        permall.decrypt_state_file(KAT_FILE[:cut], KEY)
    if cut < 10:
        assert err.value.message == PREFIX + "%d bytes, shorter than the 10-byte header" % cut
    else:
        assert err.value.message == (PREFIX + "header gives a length of 124 bytes, the file "
                                     "has %d" % cut)
    _no_key_in(err.value)


def test_trailing_bytes_are_refused():
    with refused(exception.StateFileError,
                 PREFIX + "header gives a length of 124 bytes, the file has 125"):
        permall.decrypt_state_file(KAT_FILE + b"\x00", KEY)


def test_truncated_tlv_header_is_refused():
    """The header's length agrees with a file cut inside the last TLV header."""
    body = KAT_FILE[10:10 + 76 + 3]
    with refused(exception.StateFileError, PREFIX + "truncated TLV header at offset 86"):
        permall.decrypt_state_file(_file(body), KEY)


def test_truncated_tlv_value_is_refused():
    body = KAT_FILE[10:-1]
    with refused(exception.StateFileError,
                 PREFIX + "TLV tag 6 at offset 86 declares 32 bytes, 31 remain"):
        permall.decrypt_state_file(_file(body), KEY)


def test_oversized_tlv_length_is_refused():
    body = struct.pack(">HI", 2, 0xFFFFFFFF) + KAT_FILE[16:]
    with refused(exception.StateFileError,
                 PREFIX + "TLV tag 2 at offset 10 declares 4294967295 bytes, 108 remain"):
        permall.decrypt_state_file(_file(body), KEY)


# ------------------------------------------------------------------ header

@pytest.mark.parametrize(("fields", "reason"), [
    ({"version": 1}, "header version 1 (minimum 1); only version 2 is known"),
    ({"version": 3}, "header version 3 (minimum 1); only version 2 is known"),
    ({"min_version": 3}, "header version 2 (minimum 3); only version 2 is known"),
    ({"hdrsize": 12}, "header size 12, expected 10"),
    ({"flags": 0x00}, "header flags 0x00, expected 0x09 (encrypted at rest with a 256-bit key)"),
    ({"flags": 0x01}, "header flags 0x01, expected 0x09 (encrypted at rest with a 256-bit key)"),
    ({"flags": 0x0B}, "header flags 0x0b, expected 0x09 (encrypted at rest with a 256-bit key)"),
    ({"flags": 0x19}, "header flags 0x19, expected 0x09 (encrypted at rest with a 256-bit key)"),
])
def test_unknown_header_is_refused(fields, reason):
    with refused(exception.StateFileError, PREFIX + reason):
        permall.decrypt_state_file(_file(KAT_FILE[10:], **fields), KEY)


def test_headerless_version_1_file_is_refused():
    """swtpm reads a file without a valid header as version 1 (SHA-256 +
    data under a zero IV); a 0.7.1 writer never produces one."""
    with refused(exception.StateFileError,
                 PREFIX + "header version 70 (minimum 248); only version 2 is known"):
        permall.decrypt_state_file(bytes.fromhex("46f8265050") + bytes(27), KEY)


# --------------------------------------------------------------------- TLVs

def _parts() -> tuple[bytes, bytes, bytes]:
    return KAT_FILE[16:48], KAT_FILE[54:86], IV


@pytest.mark.parametrize(("tlvs", "reason"), [
    (lambda c, m, i: _tlv(2, c) + _tlv(3, m), "TLV tag(s) 6 missing"),
    (lambda c, m, i: _tlv(2, c) + _tlv(6, i), "TLV tag(s) 3 missing"),
    (lambda c, m, i: _tlv(3, m) + _tlv(6, i), "TLV tag(s) 2 missing"),
    (lambda c, m, i: b"", "TLV tag(s) 2, 3, 6 missing"),
    (lambda c, m, i: _tlv(2, c) + _tlv(3, m) + _tlv(6, i) + _tlv(3, m),
     "TLV tag 3 repeated at offset 124"),
    (lambda c, m, i: _tlv(1, KAT_PLAIN) + _tlv(2, c) + _tlv(3, m) + _tlv(6, i),
     "unknown TLV tag 1 at offset 10"),
    (lambda c, m, i: _tlv(2, c) + _tlv(3, m) + _tlv(6, i) + _tlv(7, i),
     "unknown TLV tag 7 at offset 124"),
    (lambda c, m, i: _tlv(2, c) + _tlv(3, m + bytes(32)) + _tlv(6, i),
     "HMAC of 64 bytes, expected 32"),
    (lambda c, m, i: _tlv(2, c) + _tlv(3, m) + _tlv(6, i[:16]), "IV of 16 bytes, expected 32"),
    (lambda c, m, i: _tlv(2, c[:16]) + _tlv(3, m) + _tlv(6, i),
     "ciphertext of 16 bytes, not a positive multiple of 32"),
    (lambda c, m, i: _tlv(2, b"") + _tlv(3, m) + _tlv(6, i),
     "ciphertext of 0 bytes, not a positive multiple of 32"),
])
def test_malformed_tlvs_are_refused(tlvs, reason):
    with refused(exception.StateFileError, PREFIX + reason):
        permall.decrypt_state_file(_file(tlvs(*_parts())), KEY)


def test_name_labels_the_error():
    with refused(exception.StateFileError,
                 "swtpm state file tpm2-00.volatilestate rejected: 3 bytes, shorter than "
                 "the 10-byte header"):
        permall.decrypt_state_file(b"abc", KEY, name="tpm2-00.volatilestate")


# ---------------------------------------------------------------- the key

@pytest.mark.parametrize("key", [b"", bytes(16), bytes(33), "k" * 32, bytearray(32)])
def test_key_must_be_32_bytes(key):
    with refused(exception.InvalidInput, "Invalid input: at-rest key must be 32 bytes"):
        permall.decrypt_state_file(KAT_FILE, key)


def test_contents_must_be_bytes():
    with refused(exception.InvalidInput, "Invalid input: state file contents must be bytes"):
        permall.decrypt_state_file(bytearray(KAT_FILE), KEY)  # type: ignore[arg-type]


def test_no_refusal_carries_key_or_state_bytes():
    """Every refusal above, once more, looking for the key and the plaintext."""
    cases = [KAT_FILE[:5], KAT_FILE[:50], _file(KAT_FILE[10:], flags=1),
             _file(_tlv(1, KAT_PLAIN)), KAT_FILE[:-1] + b"\x00"]
    for data in cases:
        with pytest.raises(exception.StateFileError) as err:
            permall.decrypt_state_file(data, KEY)
        _no_key_in(err.value)
        assert KAT_PLAIN.hex() not in str(err.value)
        assert "libtpms" not in str(err.value)


@pytest.mark.parametrize("pad", [33, 48, 64])
def test_a_consistent_pad_longer_than_the_key_is_refused(pad):
    """Review of the reader (LOW): swtpm pads to the key's length, at most
    32 bytes (swtpm_aes.c refuses pad_length > userKeyLength); a consistent
    longer pad under a valid HMAC passed a mutant bounding it at 255."""
    ct = _encrypt(b"x" * (96 - pad) + bytes([pad]) * pad, KEY, IV)
    data = _file(_tlv(2, ct) + _tlv(3, _mac(ct, KEY, IV)) + _tlv(6, IV))
    with refused(exception.StateFileError,
                 PREFIX + "bad padding after a valid HMAC (not written by swtpm 0.7.1)"):
        permall.decrypt_state_file(data, KEY)


def test_a_file_larger_than_the_bound_is_refused_before_it_is_hashed():
    """Review of the reader (LOW): a file of up to 4 GiB with a matching
    header was copied and hashed before the HMAC refused it."""
    big = permall.MAX_FILE_SIZE + 1
    data = struct.pack(">BBHHI", 2, 1, 10, 0x09, big) + bytes(big - 10)
    with refused(exception.StateFileError,
                 PREFIX + "%d bytes, more than the %d a state file may have"
                 % (big, permall.MAX_FILE_SIZE)):
        permall.decrypt_state_file(data, KEY)
