"""Unit tests of the migration-key envelope with a software KEM key."""

import dataclasses
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.refusal import refused
from vtpcm_agent import sealing
from vtpcm_common import tpmpublic
from vtpcm_common.exception import HostTPMError, SealError

CTX = sealing.SealContext(migration_id="6a1e7c6e-9d0b-4a44-8f43-2a4f3b0cf001",
                          instance_uuid="0f8a3c1e-3b7d-4c9a-9a57-1b2c3d4e5f60",
                          generation=7, source_host="compute-a", dest_host="compute-b")
SECRET = bytes(range(32))

# TPMA_OBJECT bits of the KEM key: fixedTPM|fixedParent|sensitiveDataOrigin|
# userWithAuth|decrypt, as the host TPM creates it.
KEM_ATTRS = 0x00000002 | 0x00000010 | 0x00000020 | 0x00000040 | 0x00020000


def tpmt_public(x: bytes, y: bytes, attrs: int = KEM_ATTRS, scheme: int = 0x0019,
                curve: int = 0x0003, alg: int = 0x0023) -> bytes:
    """A marshaled ECC TPMT_PUBLIC laid out exactly as the TPM returns it."""
    body = struct.pack(">HHI", alg, 0x000B, attrs) + struct.pack(">H", 0)
    body += struct.pack(">H", 0x0010)  # symmetric NULL
    body += struct.pack(">H", scheme) + (struct.pack(">H", 0x000B) if scheme != 0x0010 else b"")
    body += struct.pack(">HH", curve, 0x0010)  # curve, kdf NULL
    body += struct.pack(">H", len(x)) + x + struct.pack(">H", len(y)) + y
    return body


class SoftKEM:
    """A software stand-in for the TPM's KEM key (unit tests only)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        nums = self.key.public_key().public_numbers()
        self.x = nums.x.to_bytes(32, "big")
        self.y = nums.y.to_bytes(32, "big")
        self.public = tpmt_public(self.x, self.y)

    def zgen(self, x: bytes, y: bytes) -> bytes:
        peer = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                             ec.SECP256R1()).public_key()
        return self.key.exchange(ec.ECDH(), peer)


@pytest.fixture(scope="module")
def kem() -> SoftKEM:
    return SoftKEM()


@pytest.fixture(scope="module")
def envelope(kem: SoftKEM) -> bytes:
    return sealing.seal(kem.public, SECRET, CTX)


def test_round_trip(kem: SoftKEM, envelope: bytes) -> None:
    assert sealing.open_envelope(envelope, CTX, kem.zgen) == SECRET
    assert SECRET not in envelope
    assert len(envelope) == sealing.HEADER_LEN + len(SECRET) + 16
    assert envelope[:5] == b"VTPE\x01"


def test_envelopes_are_randomized(kem: SoftKEM) -> None:
    a, b = (sealing.seal(kem.public, SECRET, CTX) for _ in range(2))
    assert a != b
    assert sealing.open_envelope(a, CTX, kem.zgen) == sealing.open_envelope(b, CTX, kem.zgen)


@pytest.mark.parametrize("field,value", [
    ("migration_id", "6a1e7c6e-9d0b-4a44-8f43-2a4f3b0cf002"),
    ("instance_uuid", "0f8a3c1e-3b7d-4c9a-9a57-1b2c3d4e5f61"),
    ("generation", 8),
    ("generation", 6),
    ("source_host", "compute-c"),
    ("dest_host", "compute-c"),
])
def test_other_context_refused(kem: SoftKEM, envelope: bytes, field: str, value: Any) -> None:
    other = dataclasses.replace(CTX, **{field: value})
    with pytest.raises(SealError) as err:
        sealing.open_envelope(envelope, other, kem.zgen)
    assert "authentication failed" in str(err.value)
    assert SECRET.hex() not in str(err.value)


def test_swapped_hosts_refused(kem: SoftKEM, envelope: bytes) -> None:
    swapped = dataclasses.replace(CTX, source_host=CTX.dest_host, dest_host=CTX.source_host)
    with refused(SealError,
                 'Sealed key envelope rejected: authentication failed: the envelope was not '
                 'sealed for this migration context (migration '
                 '6a1e7c6e-9d0b-4a44-8f43-2a4f3b0cf001, instance '
                 '0f8a3c1e-3b7d-4c9a-9a57-1b2c3d4e5f60, generation 7, compute-b -> compute-a) '
                 'and this TPM, or it was altered'):
        sealing.open_envelope(envelope, swapped, kem.zgen)


def test_aad_is_unambiguous() -> None:
    a = sealing.SealContext("ab", "c", 1, "h1", "h2")
    b = sealing.SealContext("a", "bc", 1, "h1", "h2")
    assert a.aad() != b.aad()
    assert a.aad() == sealing.SealContext("ab", "c", 1, "h1", "h2").aad()


def test_every_flipped_byte_refused(kem: SoftKEM, envelope: bytes) -> None:
    for i in range(len(envelope)):
        for mask in (0x01, 0x80):
            bad = bytearray(envelope)
            bad[i] ^= mask
            with pytest.raises(SealError):
                sealing.open_envelope(bytes(bad), CTX, kem.zgen)


def test_truncated_and_extended_refused(kem: SoftKEM, envelope: bytes) -> None:
    for n in range(len(envelope)):
        with pytest.raises(SealError):
            sealing.open_envelope(envelope[:n], CTX, kem.zgen)
    with refused(SealError,
                 'Sealed key envelope rejected: authentication failed: the envelope was not '
                 'sealed for this migration context (migration '
                 '6a1e7c6e-9d0b-4a44-8f43-2a4f3b0cf001, instance '
                 '0f8a3c1e-3b7d-4c9a-9a57-1b2c3d4e5f60, generation 7, compute-a -> compute-b) '
                 'and this TPM, or it was altered'):
        sealing.open_envelope(envelope + b"\x00", CTX, kem.zgen)


def test_wrong_kem_key_refused(envelope: bytes) -> None:
    with refused(SealError,
                 'Sealed key envelope rejected: authentication failed: the envelope was not '
                 'sealed for this migration context (migration '
                 '6a1e7c6e-9d0b-4a44-8f43-2a4f3b0cf001, instance '
                 '0f8a3c1e-3b7d-4c9a-9a57-1b2c3d4e5f60, generation 7, compute-a -> compute-b) '
                 'and this TPM, or it was altered'):
        sealing.open_envelope(envelope, CTX, SoftKEM().zgen)


def test_zgen_failure_becomes_seal_error(envelope: bytes) -> None:
    def broken(x: bytes, y: bytes) -> bytes:
        raise HostTPMError(reason="ECDH_ZGen failed: tpm:boom")

    with refused(SealError,
                 'Sealed key envelope rejected: destination TPM could not derive the shared '
                 'secret: Host TPM error: ECDH_ZGen failed: tpm:boom'):
        sealing.open_envelope(envelope, CTX, broken)

    with refused(SealError,
                 'Sealed key envelope rejected: zgen returned a malformed shared secret'):
        sealing.open_envelope(envelope, CTX, lambda x, y: b"\x00" * 31)


def test_bad_version_and_magic(kem: SoftKEM, envelope: bytes) -> None:
    with refused(SealError, 'Sealed key envelope rejected: unsupported envelope version 2'):
        sealing.open_envelope(envelope[:4] + b"\x02" + envelope[5:], CTX, kem.zgen)
    with refused(SealError, 'Sealed key envelope rejected: not a vTPCM key envelope (bad magic)'):
        sealing.open_envelope(b"XXXX" + envelope[4:], CTX, kem.zgen)


def test_kem_public_key(kem: SoftKEM) -> None:
    nums = sealing.kem_public_key(kem.public).public_numbers()
    assert (nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big")) == (kem.x, kem.y)


# the names of TPM 2.0 Part 2, as enrollment names them too (test_verifier)
@pytest.mark.parametrize("bit,name", [
    (0x00020000, "decrypt"), (0x00000002, "fixedTPM"), (0x00000010, "fixedParent"),
    (0x00000020, "sensitiveDataOrigin")])
def test_seal_refuses_kem_key_lacking_attribute(kem: SoftKEM, bit: int, name: str) -> None:
    with pytest.raises(SealError) as err:
        sealing.seal(tpmt_public(kem.x, kem.y, attrs=KEM_ATTRS & ~bit), SECRET, CTX)
    assert err.value.kwargs["reason"] == f"KEM key lacks the attribute {name}"
    assert str(err.value) == f"Sealed key envelope rejected: KEM key lacks the attribute {name}"


@pytest.mark.parametrize("kwargs,reason", [
    ({"curve": 0x0004}, "KEM key curve is not NIST P-256"),
    ({"attrs": KEM_ATTRS | 0x00040000}, "KEM key must not have the attribute sign"),
    ({"attrs": KEM_ATTRS | 0x00010000}, "KEM key must not have the attribute restricted"),
    ({"scheme": 0x0018}, "KEM key scheme is not ECDH"),
    ({"scheme": 0x0010}, "KEM key scheme is not ECDH"),
])
def test_kem_public_rejected(kem: SoftKEM, kwargs: dict[str, int], reason: str) -> None:
    with pytest.raises(SealError) as err:
        sealing.seal(tpmt_public(kem.x, kem.y, **kwargs), SECRET, CTX)
    assert err.value.kwargs["reason"] == reason


def test_kem_public_malformed(kem: SoftKEM) -> None:
    with refused(SealError, 'Sealed key envelope rejected: KEM public area has 1 trailing bytes'):
        sealing.kem_public_key(kem.public + b"\x00")
    with refused(SealError,
                 'Sealed key envelope rejected: KEM public area is malformed or truncated'):
        sealing.kem_public_key(kem.public[:-1])
    with refused(SealError,
                 'Sealed key envelope rejected: KEM key point is not on curve NIST P-256'):
        sealing.kem_public_key(tpmt_public(kem.x, bytes(32)))
    with refused(SealError,
                 'Sealed key envelope rejected: KEM key point coordinates are not 32 bytes'):
        sealing.kem_public_key(tpmt_public(kem.x[1:], kem.y))
    # RSA type, ECC layout
    with refused(SealError,
                 'Sealed key envelope rejected: KEM public area is malformed or truncated'):
        sealing.kem_public_key(tpmt_public(kem.x, kem.y, alg=0x0001))


def test_seal_uses_the_enrollment_check(kem: SoftKEM, monkeypatch: pytest.MonkeyPatch) -> None:
    # one check for both sides: sealing asks tpmpublic, nothing of its own
    seen = []
    real = tpmpublic.kem_public_key

    def spy(data: bytes) -> tpmpublic.KemKey:
        seen.append(data)
        return real(data)

    monkeypatch.setattr(tpmpublic, "kem_public_key", spy)
    sealing.seal(kem.public, SECRET, CTX)
    assert seen == [kem.public]


@pytest.mark.parametrize("kwargs", [
    {"migration_id": ""}, {"generation": -1}, {"generation": True}, {"dest_host": 5},
    {"source_host": "x" * 256},
])
def test_bad_context_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SealError):
        dataclasses.replace(CTX, **kwargs)


def test_secret_size_limits(kem: SoftKEM) -> None:
    with refused(SealError, 'Sealed key envelope rejected: secret must be 1..4096 bytes'):
        sealing.seal(kem.public, b"", CTX)
    with refused(SealError, 'Sealed key envelope rejected: secret must be 1..4096 bytes'):
        sealing.seal(kem.public, b"x" * (sealing.MAX_SECRET + 1), CTX)
    big = b"y" * sealing.MAX_SECRET
    assert sealing.open_envelope(sealing.seal(kem.public, big, CTX), CTX, kem.zgen) == big


# -- the envelope format, written a second time from the design document ------
# (seal and open share aad() and _derive_key(): a change to either keeps them
# agreeing with each other and breaks every envelope of the other release)

def _spec_aad(ctx: sealing.SealContext) -> bytes:
    def field(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(4, "big") + raw
    return (field("vtpcm-seal-ctx-v1") + field(ctx.migration_id) + field(ctx.instance_uuid)
            + ctx.generation.to_bytes(8, "big") + field(ctx.source_host)
            + field(ctx.dest_host))


def _spec_open(envelope: bytes, ctx: sealing.SealContext, kem: SoftKEM) -> bytes:
    """ECDH with the KEM key, HKDF-SHA256 (salt: the uncompressed ephemeral
    point; info: the label and the context), AES-256-GCM over header+context."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    assert envelope[:5] == b"VTPE\x01"
    x, y, nonce = envelope[5:37], envelope[37:69], envelope[69:81]
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"\x04" + x + y,
               info=b"vtpcm migration-key seal v1" + _spec_aad(ctx)).derive(kem.zgen(x, y))
    return AESGCM(key).decrypt(nonce, envelope[81:], envelope[:81] + _spec_aad(ctx))


def test_the_envelope_format_is_the_specified_one(kem: SoftKEM) -> None:
    assert CTX.aad() == _spec_aad(CTX)
    big = dataclasses.replace(CTX, generation=2 ** 63 - 1, source_host="é" * 100)
    assert big.aad() == _spec_aad(big)
    for secret in (b"k", SECRET, b"s" * sealing.MAX_SECRET):
        assert _spec_open(sealing.seal(kem.public, secret, big), big, kem) == secret


def test_context_limits_are_inclusive() -> None:
    for ok in (dataclasses.replace(CTX, generation=0),
               dataclasses.replace(CTX, generation=2 ** 63 - 1),
               dataclasses.replace(CTX, dest_host="h" * 255)):
        assert ok.aad()
    with refused(SealError, "Sealed key envelope rejected: seal context field dest_host "
                            "must be a 1..255 character string"):
        dataclasses.replace(CTX, dest_host="h" * 256)
    for bad in (-1, 2 ** 63, True, "7"):
        with refused(SealError, "Sealed key envelope rejected: seal context generation "
                                "must be a non-negative int"):
            dataclasses.replace(CTX, generation=bad)


def test_arguments_are_refused_by_name(kem: SoftKEM, envelope: bytes) -> None:
    with refused(SealError, "Sealed key envelope rejected: a SealContext is required"):
        sealing.seal(kem.public, SECRET, dataclasses.asdict(CTX))  # type: ignore[arg-type]
    with refused(SealError, "Sealed key envelope rejected: a SealContext is required"):
        sealing.open_envelope(envelope, dataclasses.asdict(CTX), kem.zgen)  # type: ignore[arg-type]
    with refused(SealError, "Sealed key envelope rejected: envelope must be bytes"):
        sealing.open_envelope(bytearray(envelope), CTX, kem.zgen)  # type: ignore[arg-type]
    shortest = sealing.HEADER_LEN + 16 + 1
    with refused(SealError, "Sealed key envelope rejected: envelope too short (97 bytes)"):
        sealing.open_envelope(envelope[:shortest - 1], CTX, kem.zgen)
    one_byte = sealing.seal(kem.public, b"k", CTX)
    assert len(one_byte) == shortest and sealing.open_envelope(one_byte, CTX, kem.zgen) == b"k"


def test_a_bad_ephemeral_point_is_named(kem: SoftKEM, envelope: bytes) -> None:
    off_curve = envelope[:5] + b"\x00" * 31 + b"\x01" + envelope[37:]
    with refused(SealError, "Sealed key envelope rejected: envelope ephemeral key: point is "
                            "not on NIST P-256"):
        sealing.open_envelope(off_curve, CTX, kem.zgen)
