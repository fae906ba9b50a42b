"""The one check of a host's KEM key public area (enrollment and sealing).

Why one function: the engine enrolls a host's KEM key and every source agent
later seals migration keys to it. If the two sides asked different things of
the key, a host could enroll with a key that every migration to it then
refuses (or, worse, the other way round). Both call ``kem_public_key``.

What the key must be (what ``vtpcm_agent.hosttpm`` creates from the template
``ecc256:ecdh-sha256:null``): an ECC NIST P-256 key with name algorithm
SHA-256, the ECDH scheme, the attributes decrypt, fixedTPM, fixedParent and
sensitiveDataOrigin (created inside its TPM and never able to leave it, not
even under another parent of the same TPM), neither sign nor restricted, and
a public point on the curve.

Parsing is tpm2-pytss's ``TPMT_PUBLIC.unmarshal``; the name is its
``get_name()`` over the same bytes (the encoding must be canonical, so the
name is the name of exactly the bytes given).
"""

from __future__ import annotations

from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPMT_PUBLIC

from vtpcm_common.exception import InvalidKemKey

# (attribute, its name in TPM 2.0 Part 2), in the order a refusal names them
KEM_REQUIRED: tuple[tuple[TPMA_OBJECT, str], ...] = (
    (TPMA_OBJECT.DECRYPT, "decrypt"),
    (TPMA_OBJECT.FIXEDTPM, "fixedTPM"),
    (TPMA_OBJECT.FIXEDPARENT, "fixedParent"),
    (TPMA_OBJECT.SENSITIVEDATAORIGIN, "sensitiveDataOrigin"),
)
KEM_FORBIDDEN: tuple[tuple[TPMA_OBJECT, str], ...] = (
    (TPMA_OBJECT.SIGN_ENCRYPT, "sign"),
    (TPMA_OBJECT.RESTRICTED, "restricted"),
)
_COORD = 32


class KemKey(NamedTuple):
    """A checked KEM key: its public key and its TPM name (nameAlg || digest)."""

    key: ec.EllipticCurvePublicKey
    name: bytes


def kem_public_key(tpmt_public: bytes) -> KemKey:
    """Check a marshaled TPMT_PUBLIC as a KEM key; raise InvalidKemKey naming
    the first requirement it misses."""
    pub = _unmarshal(tpmt_public)
    if pub.type != TPM2_ALG.ECC:
        raise InvalidKemKey(reason="KEM key is not an ECC key")
    if pub.nameAlg != TPM2_ALG.SHA256:
        raise InvalidKemKey(reason="KEM key name algorithm is not SHA-256")
    detail = pub.parameters.eccDetail
    if detail.curveID != TPM2_ECC.NIST_P256:
        raise InvalidKemKey(reason="KEM key curve is not NIST P-256")
    attrs = int(pub.objectAttributes)
    missing = [name for bit, name in KEM_REQUIRED if not attrs & bit]
    if missing:
        raise InvalidKemKey(reason="KEM key lacks the attribute%s %s" % (
            "s" if len(missing) > 1 else "", ", ".join(missing)))
    present = [name for bit, name in KEM_FORBIDDEN if attrs & bit]
    if present:
        raise InvalidKemKey(reason="KEM key must not have the attribute%s %s" % (
            "s" if len(present) > 1 else "", ", ".join(present)))
    if detail.scheme.scheme != TPM2_ALG.ECDH:
        raise InvalidKemKey(reason="KEM key scheme is not ECDH")
    key = _p256_point(bytes(pub.unique.ecc.x), bytes(pub.unique.ecc.y))
    return KemKey(key=key, name=bytes(pub.get_name()))


def _unmarshal(data: bytes) -> TPMT_PUBLIC:
    if not isinstance(data, bytes | bytearray):
        raise InvalidKemKey(reason="KEM public area must be bytes")
    if not data:
        raise InvalidKemKey(reason="KEM public area is empty")
    try:
        pub, used = TPMT_PUBLIC.unmarshal(bytes(data))
    except (TSS2_Exception, ValueError, TypeError, OverflowError):
        raise InvalidKemKey(reason="KEM public area is malformed or truncated") from None
    if used != len(data):
        raise InvalidKemKey(reason=f"KEM public area has {len(data) - used} trailing bytes")
    if bytes(pub.marshal()) != bytes(data):
        raise InvalidKemKey(reason="KEM public area is not canonically encoded")
    return pub


def _p256_point(x: bytes, y: bytes) -> ec.EllipticCurvePublicKey:
    if len(x) != _COORD or len(y) != _COORD:
        raise InvalidKemKey(reason=f"KEM key point coordinates are not {_COORD} bytes")
    try:
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()).public_key()
    except ValueError:
        raise InvalidKemKey(reason="KEM key point is not on curve NIST P-256") from None
