"""The migration-key envelope: seal in software, open only inside a TPM.

The source agent seals an instance's migration key to the destination's
certified TPM KEM key (ECC P-256, fixedTPM). Only that TPM can compute the
ECDH shared secret (TPM2_ECDH_ZGen), so only it can open the envelope; the
broker and the engine only ever carry ciphertext. This module is pure
software: the TPM's part is an injected ``zgen(x, y) -> Z.x`` callable.

Construction (version 1)::

    e, E = ephemeral P-256 key pair (software, one per envelope)
    Z    = x coordinate of e * KEM            (32 bytes; TPM side: ZGen(E))
    K    = HKDF-SHA256(ikm=Z, salt=0x04||E.x||E.y,
                       info=b"vtpcm migration-key seal v1" || ctx.aad(), L=32)
    ct   = AES-256-GCM(K, nonce, secret, aad=header || ctx.aad())

    envelope = header || ct(+16-byte tag)
    header   = b"VTPE" | u8 version=1 | E.x (32) | E.y (32) | nonce (12)

The context (migration id, instance, generation, source, destination) is
bound twice (HKDF info and GCM AAD), so an envelope opens only for exactly
the migration it was made for. The header is in the AAD, so no byte of it can
change unnoticed either.

The KEM key is checked by ``vtpcm_common.tpmpublic.kem_public_key``, the
same function the engine enrolled it with: a key the engine accepted is a
key every source agent seals to, and no other.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from oslo_log import log as logging

from vtpcm_common import spans, tpmpublic
from vtpcm_common.exception import HostTPMError, InvalidKemKey, SealError

LOG = logging.getLogger(__name__)

MAGIC = b"VTPE"
VERSION = 1
_HKDF_LABEL = b"vtpcm migration-key seal v1"
_CTX_TAG = b"vtpcm-seal-ctx-v1"
_COORD = 32
_NONCE = 12
_TAG = 16
HEADER_LEN = len(MAGIC) + 1 + 2 * _COORD + _NONCE  # 81
MAX_SECRET = 4096

@dataclass(frozen=True)
class SealContext:
    """Which migration an envelope is for; every field is authenticated."""

    migration_id: str
    instance_uuid: str
    generation: int
    source_host: str
    dest_host: str

    def __post_init__(self) -> None:
        for name in ("migration_id", "instance_uuid", "source_host", "dest_host"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 255:
                raise SealError(reason=f"seal context field {name} must be a 1..255 "
                                       "character string")
            try:  # found by fuzzing: a lone surrogate broke aad() later
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise SealError(reason=f"seal context field {name} is not valid "
                                       "Unicode text") from None
        gen = self.generation
        if isinstance(gen, bool) or not isinstance(gen, int) or not 0 <= gen < 2 ** 63:
            raise SealError(reason="seal context generation must be a non-negative int")

    def aad(self) -> bytes:
        """Canonical encoding: tag, then each field as u32 length + UTF-8.

        The generation is a u64. Length prefixes make it unambiguous (no
        field boundary can shift), the tag makes it versioned.
        """
        out = [struct.pack(">I", len(_CTX_TAG)), _CTX_TAG]
        for value in (self.migration_id, self.instance_uuid):
            raw = value.encode("utf-8")
            out += [struct.pack(">I", len(raw)), raw]
        out.append(struct.pack(">Q", self.generation))
        for value in (self.source_host, self.dest_host):
            raw = value.encode("utf-8")
            out += [struct.pack(">I", len(raw)), raw]
        return b"".join(out)


def _p256_point(x: bytes, y: bytes, what: str) -> ec.EllipticCurvePublicKey:
    if len(x) != _COORD or len(y) != _COORD:
        raise SealError(reason=f"{what}: coordinates must be {_COORD} bytes")
    try:
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()).public_key()
    except ValueError:
        raise SealError(reason=f"{what}: point is not on NIST P-256") from None


def kem_public_key(kem_public: bytes) -> ec.EllipticCurvePublicKey:
    """The destination's KEM public key, checked exactly as at its enrollment."""
    try:
        return tpmpublic.kem_public_key(kem_public).key
    except InvalidKemKey as err:
        raise SealError(reason=err.kwargs["reason"]) from None


def _derive_key(z: bytes, eph_x: bytes, eph_y: bytes, ctx: SealContext) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"\x04" + eph_x + eph_y,
                info=_HKDF_LABEL + ctx.aad())
    return hkdf.derive(z)


def seal(kem_public: bytes, secret: bytes, ctx: SealContext) -> bytes:
    """Envelope ``secret`` (1..4096 bytes) for the TPM owning ``kem_public``."""
    # a span inside, not a decorator: mutmut skips decorated functions, and
    # the mutation smoke run measures this module
    with spans.span("seal"):
        return _seal(kem_public, secret, ctx)


def _seal(kem_public: bytes, secret: bytes, ctx: SealContext) -> bytes:
    if not isinstance(secret, bytes) or not 0 < len(secret) <= MAX_SECRET:
        raise SealError(reason=f"secret must be 1..{MAX_SECRET} bytes")
    if not isinstance(ctx, SealContext):
        raise SealError(reason="a SealContext is required")
    peer = kem_public_key(kem_public)
    eph = ec.generate_private_key(ec.SECP256R1())
    z = eph.exchange(ec.ECDH(), peer)
    nums = eph.public_key().public_numbers()
    eph_x, eph_y = nums.x.to_bytes(_COORD, "big"), nums.y.to_bytes(_COORD, "big")
    nonce = os.urandom(_NONCE)
    header = MAGIC + bytes([VERSION]) + eph_x + eph_y + nonce
    key = _derive_key(z, eph_x, eph_y, ctx)
    ct = AESGCM(key).encrypt(nonce, secret, header + ctx.aad())
    return header + ct


def open_envelope(envelope: bytes, ctx: SealContext,
                  zgen: Callable[[bytes, bytes], bytes]) -> bytes:
    """Open an envelope made by ``seal`` for exactly ``ctx``.

    ``zgen(x, y)`` computes the ECDH x coordinate with the KEM private key
    (``HostTPM.ecdh_zgen`` in production). Raises SealError for a malformed
    envelope, and for a failed authentication, which means one of: another
    migration/instance/generation/source/destination, a changed byte, or a
    TPM that is not the one sealed to (these are cryptographically
    indistinguishable on purpose).
    """
    with spans.span("open_envelope"):
        return _open_envelope(envelope, ctx, zgen)


def _open_envelope(envelope: bytes, ctx: SealContext,
                   zgen: Callable[[bytes, bytes], bytes]) -> bytes:
    if not isinstance(ctx, SealContext):
        raise SealError(reason="a SealContext is required")
    if not isinstance(envelope, bytes):
        raise SealError(reason="envelope must be bytes")
    if len(envelope) < HEADER_LEN + _TAG + 1:
        raise SealError(reason=f"envelope too short ({len(envelope)} bytes)")
    if len(envelope) > HEADER_LEN + MAX_SECRET + _TAG:
        raise SealError(reason=f"envelope too long ({len(envelope)} bytes)")
    if envelope[:len(MAGIC)] != MAGIC:
        raise SealError(reason="not a vTPCM key envelope (bad magic)")
    if envelope[len(MAGIC)] != VERSION:
        raise SealError(reason=f"unsupported envelope version {envelope[len(MAGIC)]}")
    off = len(MAGIC) + 1
    eph_x = envelope[off:off + _COORD]
    eph_y = envelope[off + _COORD:off + 2 * _COORD]
    nonce = envelope[off + 2 * _COORD:HEADER_LEN]
    _p256_point(eph_x, eph_y, "envelope ephemeral key")
    try:
        z = zgen(eph_x, eph_y)
    except HostTPMError as exc:
        raise SealError(reason="destination TPM could not derive the shared "
                               f"secret: {exc.message}") from exc
    if not isinstance(z, bytes) or len(z) != _COORD:
        raise SealError(reason="zgen returned a malformed shared secret")
    key = _derive_key(z, eph_x, eph_y, ctx)
    try:
        return AESGCM(key).decrypt(nonce, envelope[HEADER_LEN:],
                                   envelope[:HEADER_LEN] + ctx.aad())
    except InvalidTag:
        LOG.warning("Key envelope for migration %(mig)s failed authentication",
                    {"mig": ctx.migration_id})
        raise SealError(reason="authentication failed: the envelope was not sealed for "
                               f"this migration context (migration {ctx.migration_id}, instance "
                               f"{ctx.instance_uuid}, generation {ctx.generation}, "
                               f"{ctx.source_host} -> {ctx.dest_host}) and this TPM, "
                               "or it was altered") from None
