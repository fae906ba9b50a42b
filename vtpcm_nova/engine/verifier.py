"""Pure checks over TPM bytes: AK, KEM certification, quotes, trust verdicts.

Why pure: every security decision of the engine is made here from bytes
only (no DB, no RPC, no clock), so each rule can be tested exhaustively
against real TPM vectors. The order follows keylime's ``checkquote``: the
signature first (nothing in unsigned bytes is trusted), then the nonce
(freshness), then the contents (type, selection, PCR digest).

Byte formats (as the agent sends them, tpm2-pytss 3.0 marshaling):
``ak_public``/``kem_public`` are marshaled TPMT_PUBLIC; ``attest`` is a
marshaled TPMS_ATTEST; ``signature`` is a marshaled TPMT_SIGNATURE.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPMS_ATTEST, TPMT_PUBLIC, TPMT_SIGNATURE

from vtpcm_common import exception, tpmpublic, tpmstruct
from vtpcm_common.tpmstruct import sha256_name as sha256_name

MAX_PCR = 23
UNKNOWN_HOST = "<unknown>"

# bank name -> (TPM algorithm id, digest size)
BANKS: dict[str, tuple[int, int]] = {
    "sha1": (int(TPM2_ALG.SHA1), 20),
    "sha256": (int(TPM2_ALG.SHA256), 32),
    "sha384": (int(TPM2_ALG.SHA384), 48),
    "sha512": (int(TPM2_ALG.SHA512), 64),
}

_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_AK_REQUIRED = TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM

RebootPolicy = Literal["reapprove", "accept"]
_T = TypeVar("_T")


class TrustStatus(enum.StrEnum):
    TRUSTED = "TRUSTED"
    UNTRUSTED = "UNTRUSTED"
    UNKNOWN = "UNKNOWN"


@dataclasses.dataclass(frozen=True)
class AttestationKey:
    """A validated AK: its marshaled public area, TPM name and verifier key."""

    public: bytes = dataclasses.field(repr=False)
    name: bytes
    key: ec.EllipticCurvePublicKey = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class QuoteEvidence:
    """What a verified quote proves (only signed fields, plus checked values)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    bank: str
    pcr_selection: tuple[int, ...]
    pcr_values: Mapping[int, bytes]
    firmware_version: int


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    name: str
    bank: str
    pcrs: Mapping[int, bytes]


@dataclasses.dataclass(frozen=True)
class ClockState:
    clock: int
    reset_count: int
    restart_count: int


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Outcome of ``evaluate``; ``rebooted`` tells the caller a new boot was
    seen: resetCount grew (TPM Reset) or restartCount grew (TPM Restart or
    Resume), i.e. the PCRs may have started again from zero."""

    status: TrustStatus
    reason: str
    rebooted: bool = False

    @property
    def trusted(self) -> bool:
        return self.status is TrustStatus.TRUSTED


def tpm_name(public: bytes) -> bytes:
    """TPM name of a marshaled TPMT_PUBLIC: nameAlg (2 bytes) || H(public)."""
    pub = _unmarshal(TPMT_PUBLIC, public, "public area", exception.InvalidAttestationKey,
                     UNKNOWN_HOST)
    return _name_of(pub, public, exception.InvalidAttestationKey, UNKNOWN_HOST)


def load_ak(ak_public: bytes, *, host: str = UNKNOWN_HOST) -> AttestationKey:
    """Parse and validate an AK: ECC P-256, restricted signing, fixedTPM, ECDSA-SHA256.

    Each distinct public area is parsed once (``_parsed_ak``): the engine
    loads the enrolled AK on every attestation, and parsing costs more than
    verifying the quote. The outcome depends on the bytes alone."""
    if not isinstance(ak_public, bytes | bytearray):
        return _load_ak(ak_public, host)  # refuses, naming the host
    outcome = _parsed_ak(bytes(ak_public))
    if isinstance(outcome, str):
        raise exception.InvalidAttestationKey(host=host, reason=outcome)
    return outcome


@functools.lru_cache(maxsize=4096)
def _parsed_ak(ak_public: bytes) -> AttestationKey | str:
    """The AK, or the reason it is refused (bounded cache of pure results)."""
    try:
        return _load_ak(ak_public, UNKNOWN_HOST)
    except exception.InvalidAttestationKey as err:
        return str(err.kwargs["reason"])


def _load_ak(ak_public: bytes, host: str) -> AttestationKey:
    err = exception.InvalidAttestationKey
    pub = _unmarshal(TPMT_PUBLIC, ak_public, "AK public area", err, host)
    if pub.type != TPM2_ALG.ECC:
        raise err(host=host, reason="AK is not an ECC key")
    detail = pub.parameters.eccDetail
    if detail.curveID != TPM2_ECC.NIST_P256:
        raise err(host=host, reason="AK curve is not NIST P-256")
    attrs = int(pub.objectAttributes)
    if attrs & _AK_REQUIRED != _AK_REQUIRED:
        raise err(host=host, reason="AK must be restricted, sign and fixedTPM")
    if attrs & TPMA_OBJECT.DECRYPT:
        raise err(host=host, reason="AK must not be a decryption key")
    if detail.scheme.scheme != TPM2_ALG.ECDSA or \
            detail.scheme.details.ecdsa.hashAlg != TPM2_ALG.SHA256:
        raise err(host=host, reason="AK scheme is not ECDSA-SHA256")
    key = _ecc_point(pub, err, host, "AK")
    name = _name_of(pub, ak_public, err, host)
    return AttestationKey(public=bytes(ak_public), name=name, key=key)


def verify_certification(ak: AttestationKey, kem_public: bytes, attest: bytes,
                         signature: bytes, nonce: bytes, *,
                         host: str = UNKNOWN_HOST, nonce_mismatch: str | None = None) -> None:
    """Prove the KEM key lives in the same TPM as the AK (TPM2_Certify by the AK).
    ``nonce_mismatch`` replaces the refusal reason when ``nonce`` (the
    expected qualifying data) differs.

    Order: the signature, then the nonce, then the contents: the KEM public
    area must pass ``tpmpublic.kem_public_key`` (the very check the source
    agents make before sealing to it, so a key enrolled here is one they
    accept), and the certified name must be its name."""
    err = exception.CertificationError
    _verify_signature(ak, attest, signature, err, host)
    info = _unmarshal(TPMS_ATTEST, attest, "attestation", err, host)
    _check_header(int(info.magic), TPM2_ST(info.type), bytes(info.extraData),
                  TPM2_ST.ATTEST_CERTIFY, nonce, err, host, nonce_mismatch)
    try:
        kem = tpmpublic.kem_public_key(kem_public)
    except exception.InvalidKemKey as bad:
        raise err(host=host, reason=bad.kwargs["reason"]) from None
    if not hmac.compare_digest(bytes(info.attested.certify.name), kem.name):
        raise err(host=host, reason="certified name is not the name of the KEM key")


def verify_quote(ak: AttestationKey, attest: bytes, signature: bytes, nonce: bytes,
                 pcr_values: Mapping[int, bytes], bank: str = "sha256", *,
                 host: str = UNKNOWN_HOST) -> QuoteEvidence:
    """Check a TPM2_Quote and return what it proves; raise on any mismatch."""
    err = exception.QuoteVerificationError
    if bank not in BANKS:
        raise err(host=host, reason=f"unsupported PCR bank {bank!r}")
    alg, size = BANKS[bank]
    values = _check_pcr_values(pcr_values, size, err, host)
    _verify_signature(ak, attest, signature, err, host)
    quote = tpmstruct.quote(attest) if isinstance(attest, bytes | bytearray) else None
    if quote is None:
        quote = _reference_quote(attest, err, host)
    _check_header(quote.magic, TPM2_ST.ATTEST_QUOTE, quote.extra_data, TPM2_ST.ATTEST_QUOTE,
                  nonce, err, host)
    selection = _selection(quote.pcr_select, alg, bank, err, host)
    if selection != tuple(sorted(values)):
        raise err(host=host, reason=(
            f"quoted PCR selection {list(selection)} differs from reported PCRs "
            f"{sorted(values)}"))
    # the AK's scheme hash (SHA-256) digests the selected PCRs in index order
    digest = hashlib.sha256(b"".join(values[i] for i in selection)).digest()
    if not hmac.compare_digest(quote.pcr_digest, digest):
        raise err(host=host, reason="PCR digest does not match the reported PCR values")
    return QuoteEvidence(
        clock=quote.clock, reset_count=quote.reset_count,
        restart_count=quote.restart_count, safe=quote.safe, bank=bank,
        pcr_selection=selection, pcr_values=dict(sorted(values.items())),
        firmware_version=quote.firmware_version)


def evaluate(evidence: QuoteEvidence, policy: PolicySpec, previous: ClockState | None, *,
             reboot_policy: RebootPolicy = "reapprove") -> Verdict:
    """Decide trust from verified evidence, a golden policy and the last clock state."""
    if reboot_policy not in ("reapprove", "accept"):
        raise exception.InvalidInput(reason=f"unknown reboot policy {reboot_policy!r}")
    reasons: list[str] = []
    if evidence.bank != policy.bank:
        reasons.append(f"quote bank {evidence.bank} is not policy '{policy.name}' bank "
                       f"{policy.bank}")
    else:
        for index in sorted(policy.pcrs):
            value = evidence.pcr_values.get(index)
            if value is None:
                reasons.append(f"PCR {index} of policy '{policy.name}' was not quoted")
            elif not hmac.compare_digest(value, policy.pcrs[index]):
                reasons.append(f"PCR {index} differs from policy '{policy.name}'")
    rebooted = False
    if previous is not None:
        clock_reason, rebooted = _clock_reason(evidence, previous, reboot_policy)
        if clock_reason:
            reasons.append(clock_reason)
    if reasons:
        return Verdict(TrustStatus.UNTRUSTED, "; ".join(reasons), rebooted)
    return Verdict(TrustStatus.TRUSTED, f"quote verified; PCRs match policy '{policy.name}'",
                   rebooted)


def clock_state(evidence: QuoteEvidence) -> ClockState:
    return ClockState(evidence.clock, evidence.reset_count, evidence.restart_count)


def _clock_reason(ev: QuoteEvidence, prev: ClockState,
                  reboot_policy: RebootPolicy) -> tuple[str | None, bool]:
    if ev.reset_count < prev.reset_count:
        return (f"TPM resetCount went backwards ({prev.reset_count} -> {ev.reset_count}): "
                "replay or state rollback", False)
    if ev.reset_count > prev.reset_count:
        if reboot_policy == "accept":
            return None, True
        return (f"host rebooted (resetCount {prev.reset_count} -> {ev.reset_count}); "
                "re-approval required", True)
    if ev.restart_count < prev.restart_count:
        return (f"TPM restartCount went backwards ({prev.restart_count} -> "
                f"{ev.restart_count}): replay or state rollback", False)
    if ev.restart_count > prev.restart_count:
        # TPM Restart (Shutdown(STATE) + Startup(CLEAR)) resets every PCR
        # and keeps resetCount: the host could have run anything, then
        # replayed its golden measurements. A quote cannot tell it from a
        # TPM Resume (PCRs kept), so both count as a reboot.
        if reboot_policy == "accept":
            return None, True
        return (f"TPM restarted (restartCount {prev.restart_count} -> "
                f"{ev.restart_count}): PCRs were reset without a reboot; "
                "re-approval required", True)
    if ev.clock < prev.clock:
        return (f"TPM clock went backwards ({prev.clock} -> {ev.clock}): "
                "replay or state rollback", False)
    return None, False


def _unmarshal(cls: type[_T], data: bytes, what: str,
               err: type[exception.AttestationError], host: str) -> _T:
    if not isinstance(data, bytes | bytearray):
        raise err(host=host, reason=f"{what} must be bytes")
    if not data:
        raise err(host=host, reason=f"{what} is empty")
    try:
        obj, used = cls.unmarshal(bytes(data))  # type: ignore[attr-defined]
    except (TSS2_Exception, ValueError, TypeError, OverflowError):
        raise err(host=host, reason=f"{what} is malformed or truncated") from None
    if used != len(data):
        raise err(host=host, reason=f"{what} has {len(data) - used} trailing bytes")
    return obj  # type: ignore[no-any-return]


def _name_of(pub: Any, raw: bytes, err: type[exception.AttestationError], host: str) -> bytes:
    if pub.nameAlg != TPM2_ALG.SHA256:
        raise err(host=host, reason="name algorithm of a key is not SHA-256")
    return sha256_name(raw)


def _ecc_point(pub: Any, err: type[exception.AttestationError], host: str,
               what: str) -> ec.EllipticCurvePublicKey:
    x, y = bytes(pub.unique.ecc.x), bytes(pub.unique.ecc.y)
    if len(x) != 32 or len(y) != 32:
        raise err(host=host, reason=f"{what} point has the wrong size")
    try:
        return ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()).public_key()
    except ValueError:
        raise err(host=host, reason=f"{what} point is not on curve P-256") from None


def _reference_quote(attest: bytes, err: type[exception.AttestationError],
                     host: str) -> tpmstruct.Quote:
    """A quote ``tpmstruct`` left to tpm2-pytss: another type, or malformed
    (then this raises with the reference parser's reason)."""
    info = _unmarshal(TPMS_ATTEST, attest, "attestation", err, host)
    if info.type != TPM2_ST.ATTEST_QUOTE:
        _check_header(int(info.magic), TPM2_ST(info.type), bytes(info.extraData),
                      TPM2_ST.ATTEST_QUOTE, b"", err, host)
    quote, clock = info.attested.quote, info.clockInfo
    return tpmstruct.Quote(
        magic=int(info.magic), extra_data=bytes(info.extraData), clock=int(clock.clock),
        reset_count=int(clock.resetCount), restart_count=int(clock.restartCount),
        safe=bool(clock.safe), firmware_version=int(info.firmwareVersion),
        pcr_select=tuple(tpmstruct.PcrSelection(int(sel.hash),
                                                bytes(sel.pcrSelect)[:int(sel.sizeofSelect)])
                         for sel in quote.pcrSelect),
        pcr_digest=bytes(quote.pcrDigest))


def _reference_signature(signature: bytes, err: type[exception.AttestationError],
                         host: str) -> tpmstruct.EcdsaSignature:
    sig = _unmarshal(TPMT_SIGNATURE, signature, "signature", err, host)
    if sig.sigAlg != TPM2_ALG.ECDSA:
        raise err(host=host, reason="signature is not ECDSA-SHA256")
    ecdsa = sig.signature.ecdsa
    return tpmstruct.EcdsaSignature(int(ecdsa.hash), bytes(ecdsa.signatureR),
                                    bytes(ecdsa.signatureS))


def _verify_signature(ak: AttestationKey, attest: bytes, signature: bytes,
                      err: type[exception.AttestationError], host: str) -> None:
    sig = tpmstruct.ecdsa_signature(signature) \
        if isinstance(signature, bytes | bytearray) else None
    if sig is None:
        sig = _reference_signature(signature, err, host)
    if sig.hash_alg != TPM2_ALG.SHA256:
        raise err(host=host, reason="signature is not ECDSA-SHA256")
    if not isinstance(attest, bytes | bytearray) or not attest:
        raise err(host=host, reason="attestation must be non-empty bytes")
    der = encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))
    try:
        ak.key.verify(der, bytes(attest), _ECDSA_SHA256)
    except (InvalidSignature, ValueError):
        raise err(host=host, reason="signature does not verify under the enrolled AK") from None


def _check_header(magic: int, kind: TPM2_ST, extra_data: bytes, expected: TPM2_ST,
                  nonce: bytes, err: type[exception.AttestationError], host: str,
                  nonce_mismatch: str | None = None) -> None:
    if magic != TPM2_GENERATED.VALUE:
        raise err(host=host, reason="attestation was not generated by a TPM (bad magic)")
    if kind != expected:
        raise err(host=host, reason=f"attestation type is {kind!s}, expected "
                                    f"{expected!s}")
    if not isinstance(nonce, bytes | bytearray) or not nonce:
        raise err(host=host, reason="nonce must be non-empty bytes")
    if not hmac.compare_digest(extra_data, bytes(nonce)):
        raise err(host=host,
                  reason=nonce_mismatch or "nonce mismatch (stale or replayed attestation)")


def _check_pcr_values(pcr_values: Mapping[int, bytes], size: int,
                      err: type[exception.AttestationError], host: str) -> dict[int, bytes]:
    if not isinstance(pcr_values, Mapping) or not pcr_values:
        raise err(host=host, reason="reported PCR values must be a non-empty mapping")
    out: dict[int, bytes] = {}
    for index, value in pcr_values.items():
        if isinstance(index, bool) or not isinstance(index, int) or \
                not 0 <= index <= MAX_PCR:
            raise err(host=host, reason=f"reported PCR index {index!r} is invalid")
        if not isinstance(value, bytes | bytearray) or len(value) != size:
            raise err(host=host, reason=f"reported PCR {index} value is not {size} bytes")
        out[index] = bytes(value)
    return out


def _selection(pcr_select: tuple[tpmstruct.PcrSelection, ...], alg: int, bank: str,
               err: type[exception.AttestationError], host: str) -> tuple[int, ...]:
    if len(pcr_select) != 1:
        raise err(host=host, reason="quote must select exactly one PCR bank")
    sel = pcr_select[0]
    if sel.hash_alg != alg:
        raise err(host=host, reason=f"quoted PCR bank is not {bank}")
    bitmap = sel.bitmap
    return tuple(byte * 8 + bit for byte, b in enumerate(bitmap)
                 for bit in range(8) if b & (1 << bit))
