"""Fast, strict readers for the two TPM structures every quote carries
(and the strict parsers of a parent's certification, at the end).

Why: tpm2-pytss unmarshals a TPMS_ATTEST in ~4 µs, but each attribute read
of the result goes through its cffi wrappers (~120 reads per quote, ~110 µs):
twice the ECDSA verification itself, and what held the verifier at ~5,000
quotes/s on one core. These readers take the bytes apart with ``struct``.

They are a strict subset of the reference parser: each returns ``None``
for anything it does not fully understand (another attestation type or
signature scheme, a size above what a TPM of ours produces, truncation,
trailing bytes, a ``safe`` byte other than 0 or 1), and the verifier then
parses with tpm2-pytss as before, so every refusal keeps its exact reason.
What they accept they read exactly as tpm2-pytss does (a unit test compares
both on real quotes and on mutations of them). Pure: bytes in, tuples out.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import NamedTuple, TypeVar

_T = TypeVar("_T")

GENERATED_VALUE = 0xFF544347  # TPM2_GENERATED.VALUE
ST_ATTEST_QUOTE = 0x8018  # TPM2_ST.ATTEST_QUOTE
ALG_ECDSA = 0x0018  # TPM2_ALG.ECDSA
ALG_SHA256 = 0x000B  # TPM2_ALG.SHA256

# the largest sizes accepted on the fast path (at most the TPM 2.0 maxima)
MAX_NAME = 66  # TPM2B_NAME: sizeof(TPMU_NAME)
MAX_DATA = 64  # TPM2B_DATA: sizeof(TPMU_HA)
MAX_DIGEST = 64  # TPM2B_DIGEST: sizeof(TPMU_HA)
MAX_BANKS = 16  # TPML_PCR_SELECTION: TPM2_NUM_PCR_BANKS
MAX_SELECT = 3  # TPMS_PCR_SELECTION.sizeofSelect: 24 PCRs
MAX_ECC_PARAMETER = 48  # TPM2B_ECC_PARAMETER: P-384 at most

_SIZE8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HEAD = struct.Struct(">IH")  # magic, type
_CLOCK = struct.Struct(">QIIBQ")  # clock, resetCount, restartCount, safe, firmwareVersion
_SIG_HEAD = struct.Struct(">HH")  # sigAlg, hash


class PcrSelection(NamedTuple):
    hash_alg: int
    bitmap: bytes  # sizeofSelect bytes


class Quote(NamedTuple):
    """The fields of a TPMS_ATTEST of type ATTEST_QUOTE."""

    magic: int
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


class EcdsaSignature(NamedTuple):
    hash_alg: int
    r: bytes
    s: bytes


class _Reader:
    """A cursor over bytes; every read past the end raises ``_Short``."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        end = self.pos + fmt.size
        if end > len(self.data):
            raise _Short
        out = fmt.unpack_from(self.data, self.pos)
        self.pos = end
        return out

    def sized(self, limit: int) -> bytes:
        """A TPM2B: 16-bit size, then that many bytes (at most ``limit``)."""
        (size,) = self.unpack(_U16)
        end = self.pos + size
        if size > limit or end > len(self.data):
            raise _Short
        out = self.data[self.pos:end]
        self.pos = end
        return out


class _Short(Exception):
    """Internal: not on the fast path (the caller returns None)."""


def quote(data: bytes) -> Quote | None:
    """The quote in ``data`` (a marshaled TPMS_ATTEST), or None: see the module."""
    data = bytes(data)
    try:
        r = _Reader(data)
        magic, kind = r.unpack(_HEAD)
        if kind != ST_ATTEST_QUOTE:
            return None
        r.sized(MAX_NAME)  # qualifiedSigner: not used by the verifier
        extra = r.sized(MAX_DATA)
        clock, reset, restart, safe, firmware = r.unpack(_CLOCK)
        if safe > 1:
            return None
        (count,) = r.unpack(_U32)
        if count > MAX_BANKS:
            return None
        banks = []
        for _ in range(count):
            (alg,) = r.unpack(_U16)
            size = r.unpack(_SIZE8)[0]
            if size > MAX_SELECT or r.pos + size > len(data):
                return None
            banks.append(PcrSelection(alg, data[r.pos:r.pos + size]))
            r.pos += size
        digest = r.sized(MAX_DIGEST)
    except _Short:
        return None
    if r.pos != len(data):
        return None
    return Quote(magic, extra, clock, reset, restart, bool(safe), firmware, tuple(banks),
                 digest)


def ecdsa_signature(data: bytes) -> EcdsaSignature | None:
    """The ECDSA signature in ``data`` (a marshaled TPMT_SIGNATURE), or None."""
    data = bytes(data)
    try:
        r = _Reader(data)
        alg, hash_alg = r.unpack(_SIG_HEAD)
        if alg != ALG_ECDSA:
            return None
        sig_r = r.sized(MAX_ECC_PARAMETER)
        sig_s = r.sized(MAX_ECC_PARAMETER)
    except _Short:
        return None
    if r.pos != len(data):
        return None
    return EcdsaSignature(hash_alg, sig_r, sig_s)



# -- TPM2_CertifyCreation of a storage parent (``parentcert``) ---------------
#
# Unlike the readers above these are the only parsers of their structures:
# they raise ``Malformed`` naming the flaw instead of returning None.

ST_ATTEST_CREATION = 0x801A  # TPM2_ST.ATTEST_CREATION
_U8 = struct.Struct(">B")


class Malformed(ValueError):
    """A structure ``creation_attest``/``creation_data`` cannot read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CreationAttest(NamedTuple):
    """The fields of a TPMS_ATTEST of type ATTEST_CREATION."""

    magic: int
    extra_data: bytes
    object_name: bytes
    creation_hash: bytes


class CreationData(NamedTuple):
    """A TPMS_CREATION_DATA: what the TPM recorded when it created an object
    (``parent_name``: the hierarchy handle for a primary)."""

    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes
    locality: int
    parent_name_alg: int
    parent_name: bytes
    parent_qualified_name: bytes
    outside_info: bytes


def _strict(data: bytes, what: str, read: Callable[[_Reader], _T]) -> _T:
    if not isinstance(data, bytes | bytearray):
        raise Malformed(f"{what} must be bytes")
    r = _Reader(bytes(data))
    try:
        out = read(r)
    except _Short:
        raise Malformed(f"{what} is truncated or has an oversized field") from None
    if r.pos != len(r.data):
        raise Malformed(f"{what} has {len(r.data) - r.pos} trailing bytes")
    return out


def _read_creation_attest(r: _Reader) -> CreationAttest:
    magic, kind = r.unpack(_HEAD)
    if kind != ST_ATTEST_CREATION:
        raise Malformed(f"attestation type is 0x{kind:04x}, not ATTEST_CREATION (0x801a)")
    r.sized(MAX_NAME)  # qualifiedSigner
    extra = r.sized(MAX_DATA)
    r.unpack(_CLOCK)
    return CreationAttest(magic, extra, r.sized(MAX_NAME), r.sized(MAX_DIGEST))


def creation_attest(data: bytes) -> CreationAttest:
    """The TPMS_ATTEST of a TPM2_CertifyCreation in ``data``, exactly."""
    return _strict(data, "creation attestation", _read_creation_attest)


def _read_creation_data(r: _Reader) -> CreationData:
    (count,) = r.unpack(_U32)
    if count > MAX_BANKS:
        raise Malformed(f"creation data selects {count} PCR banks (at most {MAX_BANKS})")
    banks = []
    for _ in range(count):
        (alg,) = r.unpack(_U16)
        (size,) = r.unpack(_SIZE8)
        if size > MAX_SELECT:
            raise Malformed(f"creation data has a PCR bitmap of {size} bytes")
        end = r.pos + size
        if end > len(r.data):
            raise _Short
        banks.append(PcrSelection(alg, r.data[r.pos:end]))
        r.pos = end
    digest = r.sized(MAX_DIGEST)
    (locality,) = r.unpack(_U8)
    (name_alg,) = r.unpack(_U16)
    return CreationData(tuple(banks), digest, locality, name_alg, r.sized(MAX_NAME),
                        r.sized(MAX_NAME), r.sized(MAX_DATA))


def creation_data(data: bytes) -> CreationData:
    """The TPMS_CREATION_DATA in ``data``, exactly."""
    return _strict(data, "creation data", _read_creation_data)


def sha256_name(raw: bytes) -> bytes:
    """TPM name of the marshaled TPMT_PUBLIC ``raw`` whose nameAlg the caller
    checked to be SHA-256: 0x000b || SHA-256(raw)."""
    return ALG_SHA256.to_bytes(2, "big") + hashlib.sha256(bytes(raw)).digest()
