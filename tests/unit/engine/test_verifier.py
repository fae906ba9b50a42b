"""Verifier tests over real swtpm vectors (vectors/tpm_vectors.json) plus
software-signed variants that isolate each check behind a valid signature."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMS_ATTEST,
    TPMS_SIGNATURE_ECC,
    TPMT_PUBLIC,
    TPMT_SIGNATURE,
    TPMU_SIGNATURE,
)

from tests.refusal import refused
from vtpcm_common import exception, tpmpublic
from vtpcm_nova.engine import verifier as V

VECTORS = json.loads((Path(__file__).parent / "vectors" / "tpm_vectors.json").read_text())
A = VECTORS["tpm_a"]
B = VECTORS["tpm_b"]
H = bytes.fromhex


def pcrs_of(q: dict[str, Any]) -> dict[int, bytes]:
    return {int(k): H(v) for k, v in q["pcr_values"].items()}


def quote_args(tpm: dict[str, Any], boot: str = "boot1", name: str = "quote1"
               ) -> tuple[bytes, bytes, bytes, dict[int, bytes]]:
    q = tpm[boot][name]
    return H(q["attest"]), H(q["signature"]), H(q["nonce"]), pcrs_of(q)


AK_A = V.load_ak(H(A["ak_public"]))
AK_B = V.load_ak(H(B["ak_public"]))


# ---- software "TPM" to sign crafted attestations ---------------------------------

AK_ATTRS = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH)


def soft_public(key: ec.EllipticCurvePrivateKey, template: str = "ecc256:ecdsa-sha256:null",
                attrs: int = AK_ATTRS) -> bytes:
    pub = TPM2B_PUBLIC.parse(template, objectAttributes=attrs).publicArea
    nums = key.public_key().public_numbers()
    pub.unique.ecc.x = nums.x.to_bytes(32, "big")
    pub.unique.ecc.y = nums.y.to_bytes(32, "big")
    return bytes(pub.marshal())


def soft_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA, signature=TPMU_SIGNATURE(
        ecdsa=TPMS_SIGNATURE_ECC(hash=TPM2_ALG.SHA256, signatureR=r.to_bytes(32, "big"),
                                 signatureS=s.to_bytes(32, "big"))))
    return bytes(sig.marshal())


@pytest.fixture(scope="module")
def soft() -> tuple[ec.EllipticCurvePrivateKey, V.AttestationKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, V.load_ak(soft_public(key))


def resign(soft: Any, attest: TPMS_ATTEST) -> tuple[bytes, bytes]:
    raw = bytes(attest.marshal())
    return raw, soft_sign(soft[0], raw)


def real_quote_obj() -> TPMS_ATTEST:
    obj, _ = TPMS_ATTEST.unmarshal(H(A["boot1"]["quote1"]["attest"]))
    return obj


# ---- load_ak ----------------------------------------------------------------------

def test_load_ak_computes_tpm_name() -> None:
    assert AK_A.name.hex() == A["ak_name"]
    assert V.tpm_name(H(A["kem_public"])).hex() == A["kem_name"]
    assert "public" not in repr(AK_A)


def test_load_ak_rejects_kem_key() -> None:
    with refused(exception.InvalidAttestationKey,
                 'Attestation key of host h1 rejected: AK must be restricted, sign and fixedTPM'):
        V.load_ak(H(A["kem_public"]), host="h1")


@pytest.mark.parametrize("template,attrs,reason", [
    ("ecc384:ecdsa-sha384:null", AK_ATTRS, "P-256"),
    ("ecc256:ecdsa-sha384:null", AK_ATTRS, "ECDSA-SHA256"),
    ("ecc256:ecdsa-sha256:null", AK_ATTRS & ~TPMA_OBJECT.FIXEDTPM, "fixedTPM"),
    ("ecc256:ecdsa-sha256:null", AK_ATTRS & ~TPMA_OBJECT.RESTRICTED, "restricted"),
])
def test_load_ak_rejects_wrong_key_kinds(template: str, attrs: int, reason: str) -> None:
    pub = TPM2B_PUBLIC.parse(template, objectAttributes=attrs).publicArea
    pub.unique.ecc.x = b"\x01" * 32
    pub.unique.ecc.y = b"\x02" * 32
    with pytest.raises(exception.InvalidAttestationKey, match=reason):
        V.load_ak(bytes(pub.marshal()), host="h1")


def test_load_ak_rejects_rsa() -> None:
    pub = TPM2B_PUBLIC.parse("rsa2048", objectAttributes=AK_ATTRS).publicArea
    with refused(exception.InvalidAttestationKey,
                 'Attestation key of host <unknown> rejected: AK is not an ECC key'):
        V.load_ak(bytes(pub.marshal()))


def test_load_ak_rejects_point_off_curve() -> None:
    pub, _ = TPMT_PUBLIC.unmarshal(H(A["ak_public"]))
    pub.unique.ecc.y = b"\x00" * 31 + b"\x05"
    with refused(exception.InvalidAttestationKey,
                 'Attestation key of host <unknown> rejected: AK point is not on curve P-256'):
        V.load_ak(bytes(pub.marshal()))


@pytest.mark.parametrize("data", [b"", b"\x00", H(A["ak_public"])[:-1],
                                  H(A["ak_public"]) + b"\x00", "text", None])
def test_load_ak_malformed(data: Any) -> None:
    with pytest.raises(exception.InvalidAttestationKey, match="host h9"):
        V.load_ak(data, host="h9")


# ---- verify_certification ---------------------------------------------------------

def cert_args(tpm: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes]:
    c = tpm["certify"]
    return H(tpm["kem_public"]), H(c["attest"]), H(c["signature"]), H(c["nonce"])


@pytest.mark.parametrize("tpm,ak", [(A, AK_A), (B, AK_B)])
def test_certification_valid(tpm: dict[str, Any], ak: V.AttestationKey) -> None:
    V.verify_certification(ak, *cert_args(tpm))


def test_certification_by_unknown_ak() -> None:
    with refused(exception.CertificationError,
                 'KEM key certification of host h1 rejected: signature does not verify under the '
                 'enrolled AK'):
        V.verify_certification(AK_A, *cert_args(B), host="h1")


def test_certification_of_other_kem_key() -> None:
    _, attest, sig, nonce = cert_args(A)
    with refused(exception.CertificationError,
                 'KEM key certification of host <unknown> rejected: certified name is not the '
                 'name of the KEM key'):
        V.verify_certification(AK_A, H(B["kem_public"]), attest, sig, nonce)


def test_certification_wrong_nonce() -> None:
    kem, attest, sig, _ = cert_args(A)
    with refused(exception.CertificationError,
                 'KEM key certification of host <unknown> rejected: nonce mismatch (stale or '
                 'replayed attestation)'):
        V.verify_certification(AK_A, kem, attest, sig, b"\x00" * 32)


def test_certification_rejects_quote() -> None:
    attest, sig, nonce, _ = quote_args(A)
    with refused(exception.CertificationError,
                 'KEM key certification of host <unknown> rejected: attestation type is '
                 'attest_quote, expected attest_certify'):
        V.verify_certification(AK_A, H(A["kem_public"]), attest, sig, nonce)


def test_certification_of_signing_key_refused(soft: Any) -> None:
    # a certify by a valid AK of a key that is not a decryption key
    other = soft_public(ec.generate_private_key(ec.SECP256R1()))
    obj, _ = TPMS_ATTEST.unmarshal(H(A["certify"]["attest"]))
    obj.attested.certify.name = V.tpm_name(other)
    attest, sig = resign(soft, obj)
    with refused(exception.CertificationError,
                 'KEM key certification of host <unknown> rejected: KEM key lacks the attribute '
                 'decrypt'):
        V.verify_certification(soft[1], other, attest, sig, H(A["certify"]["nonce"]))


KEM_ATTRS = int(TPMT_PUBLIC.unmarshal(H(A["kem_public"]))[0].objectAttributes)


def kem_variant(attrs: int) -> bytes:
    """tpm_a's real KEM public area with other attributes (not re-certified)."""
    pub, _ = TPMT_PUBLIC.unmarshal(H(A["kem_public"]))
    pub.objectAttributes = attrs
    return bytes(pub.marshal())


@pytest.mark.parametrize("bit,name", tpmpublic.KEM_REQUIRED,
                         ids=[n for _, n in tpmpublic.KEM_REQUIRED])
def test_certification_refuses_kem_key_lacking_attribute(bit: int, name: str) -> None:
    # the real certify (valid signature and nonce) offered with a variant of
    # the key it certified: the public area check names what is missing
    # before the name binding would refuse the substitution anyway
    _, attest, sig, nonce = cert_args(A)
    with pytest.raises(exception.CertificationError) as err:
        V.verify_certification(AK_A, kem_variant(KEM_ATTRS & ~bit), attest, sig, nonce,
                               host="h1")
    assert err.value.kwargs["reason"] == f"KEM key lacks the attribute {name}"
    assert str(err.value) == ("KEM key certification of host h1 rejected: "
                              f"KEM key lacks the attribute {name}")


@pytest.mark.parametrize("bit,name", tpmpublic.KEM_REQUIRED,
                         ids=[n for _, n in tpmpublic.KEM_REQUIRED])
def test_certified_kem_key_lacking_attribute_refused(soft: Any, bit: int, name: str) -> None:
    # properly certified by a valid AK (the name binds this very key): the
    # key a source agent would refuse to seal to must not enroll either
    kem = kem_variant(KEM_ATTRS & ~bit)
    obj, _ = TPMS_ATTEST.unmarshal(H(A["certify"]["attest"]))
    obj.attested.certify.name = V.tpm_name(kem)
    attest, sig = resign(soft, obj)
    with pytest.raises(exception.CertificationError,
                       match=f"KEM key lacks the attribute {name}$"):
        V.verify_certification(soft[1], kem, attest, sig, H(A["certify"]["nonce"]))
    # control: the same certification of the honest key passes
    honest = H(A["kem_public"])
    obj.attested.certify.name = V.tpm_name(honest)
    attest, sig = resign(soft, obj)
    V.verify_certification(soft[1], honest, attest, sig, H(A["certify"]["nonce"]))


def test_certified_kem_key_with_wrong_scheme_refused(soft: Any) -> None:
    pub, _ = TPMT_PUBLIC.unmarshal(H(A["kem_public"]))
    pub.parameters.eccDetail.scheme.scheme = TPM2_ALG.NULL
    kem = bytes(pub.marshal())
    obj, _ = TPMS_ATTEST.unmarshal(H(A["certify"]["attest"]))
    obj.attested.certify.name = V.tpm_name(kem)
    attest, sig = resign(soft, obj)
    with refused(exception.CertificationError,
                 'KEM key certification of host <unknown> rejected: KEM key scheme is not ECDH'):
        V.verify_certification(soft[1], kem, attest, sig, H(A["certify"]["nonce"]))


@pytest.mark.parametrize("cut", [0, 1, 10, 50])
def test_certification_truncated(cut: int) -> None:
    kem, attest, sig, nonce = cert_args(A)
    with pytest.raises(exception.CertificationError):
        V.verify_certification(AK_A, kem, attest, sig[:cut], nonce)
    with pytest.raises(exception.CertificationError):
        V.verify_certification(AK_A, kem[:cut], attest, sig, nonce)


# ---- verify_quote -----------------------------------------------------------------

@pytest.mark.parametrize("tpm,ak,boot,name", [
    (A, AK_A, "boot1", "quote1"), (A, AK_A, "boot1", "quote2"),
    (A, AK_A, "boot1", "quote_tampered_pcr"), (A, AK_A, "boot2", "quote1"),
    (B, AK_B, "boot1", "quote1")])
def test_quote_valid(tpm: dict[str, Any], ak: V.AttestationKey, boot: str, name: str) -> None:
    attest, sig, nonce, pcrs = quote_args(tpm, boot, name)
    ev = V.verify_quote(ak, attest, sig, nonce, pcrs)
    assert ev.pcr_selection == (0, 1, 2, 3, 7, 16)
    assert ev.pcr_values == pcrs
    assert ev.bank == "sha256"
    assert ev.reset_count == (2 if boot == "boot2" else 1)


def test_quote_clock_advances() -> None:
    e1 = V.verify_quote(AK_A, *quote_args(A, "boot1", "quote1"))
    e2 = V.verify_quote(AK_A, *quote_args(A, "boot1", "quote2"))
    assert e2.clock > e1.clock and e2.reset_count == e1.reset_count


# byte ranges of the 145-byte quote: magic, type, qualifiedSigner, extraData,
# clockInfo, firmwareVersion, pcrSelect, pcrDigest
REGIONS = {"magic": 1, "type": 5, "signer": 10, "extra": 45, "clock": 80,
           "reset": 89, "safe": 96, "firmware": 100, "selection": 110, "digest": 130}


@pytest.mark.parametrize("region", sorted(REGIONS))
def test_quote_tampered_attest(region: str) -> None:
    attest, sig, nonce, pcrs = quote_args(A)
    bad = bytearray(attest)
    bad[REGIONS[region]] ^= 0x01
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: signature does not verify under the '
                 'enrolled AK'):
        V.verify_quote(AK_A, bytes(bad), sig, nonce, pcrs)


@pytest.mark.parametrize("offset", [8, 20, 40, 60])
def test_quote_tampered_signature(offset: int) -> None:
    attest, sig, nonce, pcrs = quote_args(A)
    bad = bytearray(sig)
    bad[offset] ^= 0x80
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: signature does not verify under the '
                 'enrolled AK'):
        V.verify_quote(AK_A, attest, bytes(bad), nonce, pcrs)


def test_quote_from_other_tpm() -> None:
    with refused(exception.QuoteVerificationError,
                 'Quote from host h1 rejected: signature does not verify under the enrolled AK'):
        V.verify_quote(AK_A, *quote_args(B), host="h1")


def test_quote_swapped_signature() -> None:
    attest, _, nonce, pcrs = quote_args(A, name="quote1")
    _, sig2, _, _ = quote_args(A, name="quote2")
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: signature does not verify under the '
                 'enrolled AK'):
        V.verify_quote(AK_A, attest, sig2, nonce, pcrs)


def test_quote_replayed_nonce() -> None:
    attest, sig, _, pcrs = quote_args(A, name="quote1")
    fresh = quote_args(A, name="quote2")[2]
    with refused(exception.QuoteVerificationError,
                 'Quote from host h1 rejected: nonce mismatch (stale or replayed attestation)'):
        V.verify_quote(AK_A, attest, sig, fresh, pcrs, host="h1")


def test_quote_pcr_value_lie() -> None:
    # the agent reports the golden values while the TPM quoted the rogue PCR 16
    attest, sig, nonce, _ = quote_args(A, name="quote_tampered_pcr")
    golden = pcrs_of(A["boot1"]["quote1"])
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: PCR digest does not match the reported PCR '
                 'values'):
        V.verify_quote(AK_A, attest, sig, nonce, golden)


@pytest.mark.parametrize("change", ["drop", "add"])
def test_quote_selection_mismatch(change: str) -> None:
    attest, sig, nonce, pcrs = quote_args(A)
    if change == "drop":
        del pcrs[16]
    else:
        pcrs[10] = b"\x00" * 32
    with pytest.raises(exception.QuoteVerificationError, match="selection"):
        V.verify_quote(AK_A, attest, sig, nonce, pcrs)


def test_quote_certify_is_not_a_quote() -> None:
    c = A["certify"]
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: attestation type is attest_certify, '
                 'expected attest_quote'):
        V.verify_quote(AK_A, H(c["attest"]), H(c["signature"]), H(c["nonce"]),
                       pcrs_of(A["boot1"]["quote1"]))


def test_quote_bad_magic(soft: Any) -> None:
    obj = real_quote_obj()
    obj.magic = 0x12345678
    attest, sig = resign(soft, obj)
    _, _, nonce, pcrs = quote_args(A)
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: attestation was not generated by a TPM '
                 '(bad magic)'):
        V.verify_quote(soft[1], attest, sig, nonce, pcrs)


def test_quote_wrong_type_signed(soft: Any) -> None:
    obj = real_quote_obj()
    obj.type = TPM2_ST.ATTEST_TIME
    attest, sig = resign(soft, obj)
    _, _, nonce, pcrs = quote_args(A)
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: attestation type is attest_time, expected '
                 'attest_quote'):
        V.verify_quote(soft[1], attest, sig, nonce, pcrs)


def test_quote_wrong_bank(soft: Any) -> None:
    obj = real_quote_obj()
    obj.attested.quote.pcrSelect[0].hash = TPM2_ALG.SHA1
    attest, sig = resign(soft, obj)
    _, _, nonce, pcrs = quote_args(A)
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: quoted PCR bank is not sha256'):
        V.verify_quote(soft[1], attest, sig, nonce, pcrs)


def test_quote_resigned_valid(soft: Any) -> None:
    # sanity for the software signer: an unmodified re-signed quote passes
    attest, sig = resign(soft, real_quote_obj())
    _, _, nonce, pcrs = quote_args(A)
    assert V.verify_quote(soft[1], attest, sig, nonce, pcrs).reset_count == 1


@pytest.mark.parametrize("bad_pcrs,reason", [
    ({}, "non-empty"), ({0: b"\x00" * 20}, "32 bytes"), ({24: b"\x00" * 32}, "index"),
    ({-1: b"\x00" * 32}, "index"), ({"0": b"\x00" * 32}, "index"),
    ({0: "00" * 32}, "32 bytes"), ([1, 2], "mapping")])
def test_quote_bad_pcr_values(bad_pcrs: Any, reason: str) -> None:
    attest, sig, nonce, _ = quote_args(A)
    with pytest.raises(exception.QuoteVerificationError, match=reason):
        V.verify_quote(AK_A, attest, sig, nonce, bad_pcrs)


def test_quote_unsupported_bank() -> None:
    with refused(exception.QuoteVerificationError,
                 "Quote from host <unknown> rejected: unsupported PCR bank 'md5'"):
        V.verify_quote(AK_A, *quote_args(A), bank="md5")


@pytest.mark.parametrize("which", ["attest", "signature"])
@pytest.mark.parametrize("cut", [0, 1, 4, 60, -1])
def test_quote_truncated(which: str, cut: int) -> None:
    attest, sig, nonce, pcrs = quote_args(A)
    if which == "attest":
        attest = attest[:cut]
    else:
        sig = sig[:cut]
    with pytest.raises(exception.QuoteVerificationError):
        V.verify_quote(AK_A, attest, sig, nonce, pcrs)


def test_quote_trailing_bytes_rejected() -> None:
    attest, sig, nonce, pcrs = quote_args(A)
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: signature has 1 trailing bytes'):
        V.verify_quote(AK_A, attest, sig + b"\x00", nonce, pcrs)


def test_quote_empty_nonce_refused() -> None:
    attest, sig, _, pcrs = quote_args(A)
    with refused(exception.QuoteVerificationError,
                 'Quote from host <unknown> rejected: nonce must be non-empty bytes'):
        V.verify_quote(AK_A, attest, sig, b"", pcrs)


# ---- evaluate ---------------------------------------------------------------------

def ev(clock: int = 100, reset: int = 1, restart: int = 0,
       pcrs: dict[int, bytes] | None = None, bank: str = "sha256") -> V.QuoteEvidence:
    values = pcrs if pcrs is not None else {0: b"\x00" * 32, 16: b"\x16" * 32}
    return V.QuoteEvidence(clock=clock, reset_count=reset, restart_count=restart, safe=True,
                           bank=bank, pcr_selection=tuple(sorted(values)),
                           pcr_values=values, firmware_version=1)


GOLDEN = V.PolicySpec("golden", "sha256", {0: b"\x00" * 32, 16: b"\x16" * 32})


def test_evaluate_trusted() -> None:
    v = V.evaluate(ev(), GOLDEN, None)
    assert v.trusted and "golden" in v.reason and not v.rebooted


def test_evaluate_names_every_differing_pcr() -> None:
    v = V.evaluate(ev(pcrs={0: b"\x01" * 32, 16: b"\x17" * 32}), GOLDEN, None)
    assert v.status is V.TrustStatus.UNTRUSTED
    assert "PCR 0 differs from policy 'golden'" in v.reason
    assert "PCR 16 differs from policy 'golden'" in v.reason


def test_evaluate_missing_pcr() -> None:
    v = V.evaluate(ev(pcrs={0: b"\x00" * 32}), GOLDEN, None)
    assert not v.trusted and "PCR 16 of policy 'golden' was not quoted" in v.reason


def test_evaluate_extra_quoted_pcrs_ok() -> None:
    assert V.evaluate(ev(pcrs={0: b"\x00" * 32, 7: b"\x07" * 32, 16: b"\x16" * 32}),
                      GOLDEN, None).trusted


def test_evaluate_bank_mismatch() -> None:
    v = V.evaluate(ev(bank="sha384"), GOLDEN, None)
    assert not v.trusted and "bank" in v.reason


PREV = V.ClockState(clock=100, reset_count=5, restart_count=2)


@pytest.mark.parametrize("clock,reset,restart,policy,status,fragment,rebooted", [
    (150, 5, 2, "reapprove", "TRUSTED", "golden", False),
    (100, 5, 2, "reapprove", "TRUSTED", "golden", False),
    (99, 5, 2, "reapprove", "UNTRUSTED", "clock went backwards (100 -> 99)", False),
    (99, 5, 2, "accept", "UNTRUSTED", "clock went backwards", False),
    # TPM Restart (Shutdown(STATE) + Startup(CLEAR)): PCRs reset, resetCount kept
    (5, 5, 3, "reapprove", "UNTRUSTED",
     "TPM restarted (restartCount 2 -> 3): PCRs were reset without a reboot; "
     "re-approval required", True),
    (5, 5, 3, "accept", "TRUSTED", "golden", True),
    (500, 5, 9, "reapprove", "UNTRUSTED", "TPM restarted (restartCount 2 -> 9)", True),
    (500, 5, 1, "reapprove", "UNTRUSTED", "restartCount went backwards (2 -> 1)", False),
    (5, 6, 0, "reapprove", "UNTRUSTED",
     "host rebooted (resetCount 5 -> 6); re-approval required", True),
    (5, 6, 0, "accept", "TRUSTED", "golden", True),
    (500, 4, 9, "reapprove", "UNTRUSTED", "resetCount went backwards (5 -> 4)", False),
    (500, 4, 9, "accept", "UNTRUSTED", "resetCount went backwards", False),
])
def test_evaluate_clock(clock: int, reset: int, restart: int, policy: Any, status: str,
                        fragment: str, rebooted: bool) -> None:
    v = V.evaluate(ev(clock, reset, restart), GOLDEN, PREV, reboot_policy=policy)
    assert v.status.value == status
    assert fragment in v.reason
    assert v.rebooted is rebooted


def test_evaluate_combines_reasons() -> None:
    v = V.evaluate(ev(clock=1, pcrs={0: b"\x01" * 32, 16: b"\x16" * 32}), GOLDEN, PREV)
    assert "PCR 0 differs" in v.reason and "resetCount went backwards" in v.reason


def test_evaluate_unknown_reboot_policy() -> None:
    with refused(exception.InvalidInput, "Invalid input: unknown reboot policy 'sometimes'"):
        V.evaluate(ev(), GOLDEN, None, reboot_policy="sometimes")  # type: ignore[arg-type]


def test_evaluate_with_real_vectors() -> None:
    e1 = V.verify_quote(AK_A, *quote_args(A, "boot1", "quote1"))
    e2 = V.verify_quote(AK_A, *quote_args(A, "boot1", "quote2"))
    rogue = V.verify_quote(AK_A, *quote_args(A, "boot1", "quote_tampered_pcr"))
    reboot = V.verify_quote(AK_A, *quote_args(A, "boot2", "quote1"))
    golden = V.PolicySpec("golden", "sha256", dict(e1.pcr_values))
    assert V.evaluate(e2, golden, V.clock_state(e1)).trusted
    # replaying the older quote after the newer one: clock rollback
    assert "clock went backwards" in V.evaluate(e1, golden, V.clock_state(e2)).reason
    assert V.evaluate(rogue, golden, V.clock_state(e2)).reason == \
        "PCR 16 differs from policy 'golden'"
    v = V.evaluate(reboot, golden, V.clock_state(e2))
    assert v.reason == "host rebooted (resetCount 1 -> 2); re-approval required"
    assert V.evaluate(reboot, golden, V.clock_state(e2), reboot_policy="accept").trusted


def test_vectors_nonce_derivation_is_documented() -> None:
    # nonces in the vectors are sha256(label + tag): keeps regenerated vectors stable
    assert A["boot1"]["quote1"]["nonce"] == hashlib.sha256(b"tpm_aq1").hexdigest()


# ---- found by mutation testing (tools/mutation.sh verifier) ------------------------

def test_evaluate_reasons_are_exact() -> None:
    v = V.evaluate(ev(clock=1, reset=5, restart=2, pcrs={0: b"\x01" * 32, 16: b"\x16" * 32}),
                   GOLDEN, PREV)
    assert v.reason == ("PCR 0 differs from policy 'golden'; TPM clock went backwards "
                        "(100 -> 1): replay or state rollback")
    assert v.rebooted is False
    v = V.evaluate(ev(clock=1, reset=6, restart=0), GOLDEN, PREV, reboot_policy="accept")
    assert (v.status, v.rebooted) == (V.TrustStatus.TRUSTED, True)
    assert v.reason == "quote verified; PCRs match policy 'golden'"
    for reset, restart, text in (
            (4, 2, "TPM resetCount went backwards (5 -> 4): replay or state rollback"),
            (5, 1, "TPM restartCount went backwards (2 -> 1): replay or state rollback")):
        assert V.evaluate(ev(500, reset, restart), GOLDEN, PREV).reason == text


def test_quote_evidence_carries_the_clock_and_firmware() -> None:
    attest, sig, nonce, pcrs = quote_args(A)
    evidence = V.verify_quote(AK_A, attest, sig, nonce, pcrs, host="h1")
    info, _ = TPMS_ATTEST.unmarshal(attest)
    assert evidence.safe is bool(info.clockInfo.safe) is True
    assert evidence.firmware_version == int(info.firmwareVersion) != 0
    assert evidence.restart_count == int(info.clockInfo.restartCount)


def test_load_ak_keeps_its_public_area_and_name() -> None:
    ak = V.load_ak(H(A["ak_public"]), host="h1")
    assert ak.public == H(A["ak_public"]) and ak.name == V.tpm_name(H(A["ak_public"]))


def _ecc_public(template: str, decrypt: bool = False, name_alg: int | None = None,
                x_len: int = 32) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = TPM2B_PUBLIC.parse(template, objectAttributes=AK_ATTRS).publicArea
    if decrypt:  # set after parsing: the parser refuses sign together with decrypt
        pub.objectAttributes |= TPMA_OBJECT.DECRYPT
    nums = key.public_key().public_numbers()
    pub.unique.ecc.x = nums.x.to_bytes(32, "big")[:x_len]
    pub.unique.ecc.y = nums.y.to_bytes(32, "big")
    if name_alg is not None:
        pub.nameAlg = name_alg
    return bytes(pub.marshal())


@pytest.mark.parametrize(("public", "reason"), [
    (b"\x00\x23garbage", "AK public area is malformed or truncated"),
    (_ecc_public("ecc384:ecdsa-sha256:null"), "AK curve is not NIST P-256"),
    (_ecc_public("ecc256:ecdsa-sha256:null", decrypt=True), "AK must not be a decryption key"),
    (_ecc_public("ecc256:ecdsa-sha384:null"), "AK scheme is not ECDSA-SHA256"),
    (_ecc_public("ecc256:ecdsa-sha256:null", name_alg=TPM2_ALG.SHA1),
     "name algorithm of a key is not SHA-256"),
    (_ecc_public("ecc256:ecdsa-sha256:null", x_len=31), "AK point has the wrong size"),
], ids=["garbage", "p384", "decrypt", "sha384", "name-sha1", "short-x"])
def test_ak_refusals_name_host_and_reason(public: bytes, reason: str) -> None:
    with refused(exception.InvalidAttestationKey,
                 "Attestation key of host h1 rejected: " + reason):
        V.load_ak(public, host="h1")


@pytest.mark.parametrize(("public", "reason"), [
    (b"\x00\x23garbage", "public area is malformed or truncated"),
    (_ecc_public("ecc256:ecdsa-sha256:null", name_alg=TPM2_ALG.SHA1),
     "name algorithm of a key is not SHA-256"),
], ids=["garbage", "name-sha1"])
def test_tpm_name_refusals(public: bytes, reason: str) -> None:
    with refused(exception.InvalidAttestationKey,
                 "Attestation key of host <unknown> rejected: " + reason):
        V.tpm_name(public)


def test_certification_of_garbage_and_custom_nonce_reason(soft: Any) -> None:
    garbage = b"\xff\x54\x43\x47garbage"
    with refused(exception.CertificationError, "KEM key certification of host h1 rejected: "
                 "attestation is malformed or truncated"):
        V.verify_certification(soft[1], H(A["kem_public"]), garbage,
                               soft_sign(soft[0], garbage), b"n" * 32, host="h1")
    c = A["certify"]
    obj, _ = TPMS_ATTEST.unmarshal(H(c["attest"]))
    attest, sig = resign(soft, obj)
    with refused(exception.CertificationError, "KEM key certification of host h1 rejected: "
                 "not this enrollment's nonce"):
        V.verify_certification(soft[1], H(A["kem_public"]), attest, sig, b"other nonce",
                               host="h1", nonce_mismatch="not this enrollment's nonce")


def test_quote_refusals_name_host_and_reason(soft: Any) -> None:
    attest, sig, nonce, pcrs = quote_args(A)
    garbage = b"\xff\x54\x43\x47garbage"
    cases = [
        (AK_A, attest, sig, nonce, {}, "reported PCR values must be a non-empty mapping"),
        (AK_A, attest, sig, nonce, {**pcrs, 24: b"\x00" * 32},
         "reported PCR index 24 is invalid"),
        (AK_A, attest, sig, nonce, {**pcrs, 0: b"\x00" * 31},
         "reported PCR 0 value is not 32 bytes"),
        (AK_A, b"", sig, nonce, pcrs, "attestation must be non-empty bytes"),
        (soft[1], garbage, soft_sign(soft[0], garbage), nonce, pcrs,
         "attestation is malformed or truncated"),
    ]
    for ak, at, sg, nc, values, reason in cases:
        with refused(exception.QuoteVerificationError, "Quote from host h1 rejected: " + reason):
            V.verify_quote(ak, at, sg, nc, values, host="h1")


def test_a_pcr_at_the_highest_index_passes_the_value_check() -> None:
    attest, sig, nonce, pcrs = quote_args(A)
    with refused(exception.QuoteVerificationError,  # the selection, not the index
                 "Quote from host h1 rejected: quoted PCR selection [0, 1, 2, 3, 7, 16] "
                 "differs from reported PCRs [0, 1, 2, 3, 7, 16, 23]"):
        V.verify_quote(AK_A, attest, sig, nonce, {**pcrs, 23: b"\x00" * 32}, host="h1")


@pytest.mark.parametrize(("sig_alg", "hash_alg"), [(TPM2_ALG.ECDSA, TPM2_ALG.SHA1),
                                                    (TPM2_ALG.ECSCHNORR, TPM2_ALG.SHA256)],
                         ids=["ecdsa-sha1", "schnorr-sha256"])
def test_signature_scheme_is_checked_both_ways(soft: Any, sig_alg: int, hash_alg: int) -> None:
    obj = real_quote_obj()
    attest, good = resign(soft, obj)
    sig, _ = TPMT_SIGNATURE.unmarshal(good)
    sig.sigAlg = sig_alg
    sig.signature.ecdsa.hash = hash_alg
    _, _, nonce, pcrs = quote_args(A)
    with refused(exception.QuoteVerificationError,
                 "Quote from host h1 rejected: signature is not ECDSA-SHA256"):
        V.verify_quote(soft[1], attest, bytes(sig.marshal()), nonce, pcrs, host="h1")


def test_a_quote_over_two_banks_is_refused(soft: Any) -> None:
    from tpm2_pytss.types import TPML_PCR_SELECTION
    obj = real_quote_obj()
    obj.attested.quote.pcrSelect = TPML_PCR_SELECTION.parse("sha256:0,1+sha1:0")
    attest, sig = resign(soft, obj)
    _, _, nonce, pcrs = quote_args(A)
    with refused(exception.QuoteVerificationError,
                 "Quote from host h1 rejected: quote must select exactly one PCR bank"):
        V.verify_quote(soft[1], attest, sig, nonce, pcrs, host="h1")
