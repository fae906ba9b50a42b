"""The one KEM key check, over the real swtpm KEM keys and variants of them.

Enrollment (``verifier.verify_certification``) and sealing (``sealing.seal``)
both call ``tpmpublic.kem_public_key``; their own tests check that each of
them refuses with the reason asserted here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import TPMS_ATTEST, TPMT_PUBLIC

from tests.unit.engine.fakes import CERTIFY_TEMPLATE, FakeTPM
from vtpcm_agent import hostkeys, hosttpm, sealing
from vtpcm_common import tpmpublic
from vtpcm_common.exception import CertificationError, InvalidKemKey, SealError
from vtpcm_nova.engine import verifier

VECTORS = json.loads((Path(__file__).parents[1] / "engine" / "vectors" /
                      "tpm_vectors.json").read_text())
REAL_KEM = bytes.fromhex(VECTORS["tpm_a"]["kem_public"])


def variant(change: Callable[[Any], None], base: bytes = REAL_KEM) -> bytes:
    """The real swtpm KEM public area with one field changed."""
    pub, _ = TPMT_PUBLIC.unmarshal(base)
    change(pub)
    return bytes(pub.marshal())


def set_attrs(attrs: int) -> Callable[[Any], None]:
    def change(pub: Any) -> None:
        pub.objectAttributes = attrs
    return change


REAL_ATTRS = int(TPMT_PUBLIC.unmarshal(REAL_KEM)[0].objectAttributes)


@pytest.mark.parametrize("tpm", ["tpm_a", "tpm_b"])
def test_real_swtpm_kem_keys_accepted(tpm: str) -> None:
    raw = bytes.fromhex(VECTORS[tpm]["kem_public"])
    kem = tpmpublic.kem_public_key(raw)
    assert kem.name.hex() == VECTORS[tpm]["kem_name"]
    pub, _ = TPMT_PUBLIC.unmarshal(raw)
    nums = kem.key.public_numbers()
    assert isinstance(kem.key.curve, ec.SECP256R1)
    assert nums.x.to_bytes(32, "big") == bytes(pub.unique.ecc.x)
    assert nums.y.to_bytes(32, "big") == bytes(pub.unique.ecc.y)


def test_the_agents_template_is_what_the_check_requires() -> None:
    # drift guard: the key the agent creates (hostkeys) passes, and the
    # template has exactly the required attributes and none forbidden
    tmpl = TPMT_PUBLIC.parse(hostkeys.KEM_TEMPLATE, objectAttributes=hostkeys.KEM_ATTRS)
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    tmpl.unique.ecc.x = key.x.to_bytes(32, "big")
    tmpl.unique.ecc.y = key.y.to_bytes(32, "big")
    assert tpmpublic.kem_public_key(bytes(tmpl.marshal())).key.public_numbers() == key
    for bit, _ in tpmpublic.KEM_REQUIRED:
        assert hostkeys.KEM_ATTRS & bit
    for bit, _ in tpmpublic.KEM_FORBIDDEN:
        assert not hostkeys.KEM_ATTRS & bit


@pytest.mark.parametrize("bit,name", tpmpublic.KEM_REQUIRED,
                         ids=[n for _, n in tpmpublic.KEM_REQUIRED])
def test_each_missing_attribute_is_named(bit: TPMA_OBJECT, name: str) -> None:
    with pytest.raises(InvalidKemKey) as err:
        tpmpublic.kem_public_key(variant(set_attrs(REAL_ATTRS & ~bit)))
    assert err.value.kwargs["reason"] == f"KEM key lacks the attribute {name}"


def test_several_missing_attributes_are_all_named() -> None:
    attrs = REAL_ATTRS & ~(TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN)
    with pytest.raises(InvalidKemKey,
                       match="lacks the attributes fixedParent, sensitiveDataOrigin"):
        tpmpublic.kem_public_key(variant(set_attrs(attrs)))


@pytest.mark.parametrize("bit,name", tpmpublic.KEM_FORBIDDEN,
                         ids=[n for _, n in tpmpublic.KEM_FORBIDDEN])
def test_each_forbidden_attribute_is_named(bit: TPMA_OBJECT, name: str) -> None:
    with pytest.raises(InvalidKemKey) as err:
        tpmpublic.kem_public_key(variant(set_attrs(REAL_ATTRS | bit)))
    assert err.value.kwargs["reason"] == f"KEM key must not have the attribute {name}"


def _scheme(alg: TPM2_ALG) -> Callable[[Any], None]:
    def change(pub: Any) -> None:
        pub.parameters.eccDetail.scheme.scheme = alg
    return change


def _curve(pub: Any) -> None:
    pub.parameters.eccDetail.curveID = TPM2_ECC.NIST_P384


def _name_alg(pub: Any) -> None:
    pub.nameAlg = TPM2_ALG.SHA384


def _off_curve(pub: Any) -> None:
    pub.unique.ecc.y = b"\x00" * 31 + b"\x05"


def _short_x(pub: Any) -> None:
    pub.unique.ecc.x = bytes(pub.unique.ecc.x)[1:]


@pytest.mark.parametrize("change,reason", [
    (_scheme(TPM2_ALG.ECDSA), "KEM key scheme is not ECDH"),
    (_scheme(TPM2_ALG.NULL), "KEM key scheme is not ECDH"),
    (_curve, "KEM key curve is not NIST P-256"),
    (_name_alg, "KEM key name algorithm is not SHA-256"),
    (_off_curve, "KEM key point is not on curve NIST P-256"),
    (_short_x, "KEM key point coordinates are not 32 bytes"),
], ids=["ecdsa", "null-scheme", "p384", "sha384-name", "off-curve", "short-x"])
def test_wrong_key_kinds(change: Callable[[Any], None], reason: str) -> None:
    with pytest.raises(InvalidKemKey) as err:
        tpmpublic.kem_public_key(variant(change))
    assert err.value.kwargs["reason"] == reason


def test_rsa_key_refused() -> None:
    rsa = TPMT_PUBLIC.parse("rsa2048", objectAttributes=hosttpm.KEM_ATTRS)
    with pytest.raises(InvalidKemKey, match="not an ECC key"):
        tpmpublic.kem_public_key(bytes(rsa.marshal()))


@pytest.mark.parametrize("data,reason", [
    (REAL_KEM + b"\x00", "1 trailing bytes"),
    (REAL_KEM[:-1], "malformed or truncated"),
    (REAL_KEM[:3], "malformed or truncated"),
    (b"", "empty"),
    ("00" * 88, "must be bytes"),
    (None, "must be bytes"),
])
def test_malformed(data: Any, reason: str) -> None:
    with pytest.raises(InvalidKemKey, match=reason):
        tpmpublic.kem_public_key(data)


def test_message_names_the_key() -> None:
    with pytest.raises(InvalidKemKey) as err:
        tpmpublic.kem_public_key(variant(set_attrs(REAL_ATTRS & ~TPMA_OBJECT.FIXEDTPM)))
    assert str(err.value) == "KEM key rejected: KEM key lacks the attribute fixedTPM"


# ---- one check, one reason: enrollment and sealing agree on every key -------------

def _all_variants() -> list[tuple[str, bytes]]:
    out = [(f"no-{n}", variant(set_attrs(REAL_ATTRS & ~b))) for b, n in tpmpublic.KEM_REQUIRED]
    out += [(f"with-{n}", variant(set_attrs(REAL_ATTRS | b)))
            for b, n in tpmpublic.KEM_FORBIDDEN]
    out += [("ecdsa", variant(_scheme(TPM2_ALG.ECDSA))), ("null", variant(_scheme(TPM2_ALG.NULL))),
            ("p384", variant(_curve)), ("sha384-name", variant(_name_alg)),
            ("off-curve", variant(_off_curve)), ("short-x", variant(_short_x)),
            ("trailing", REAL_KEM + b"\x00"), ("truncated", REAL_KEM[:-1]),
            ("honest", REAL_KEM)]
    return out


def _enrollment_reason(kem_public: bytes) -> str | None:
    """Enroll-time verdict on a key, certified by a valid AK (name bound)."""
    tpm = FakeTPM()
    nonce = b"\x01" * 32
    obj, _ = TPMS_ATTEST.unmarshal(CERTIFY_TEMPLATE)
    obj.extraData = nonce
    try:
        obj.attested.certify.name = TPMT_PUBLIC.unmarshal(kem_public)[0].get_name()
    except (RuntimeError, ValueError):  # unparsable: any name, the area is refused first
        obj.attested.certify.name = b"\x00\x0b" + b"\x00" * 32
    attest, sig = tpm._sign(obj)
    try:
        verifier.verify_certification(verifier.load_ak(tpm.ak_public), kem_public, attest,
                                      sig, nonce, host="h1")
    except CertificationError as err:
        return str(err.kwargs["reason"])
    return None


def _sealing_reason(kem_public: bytes) -> str | None:
    ctx = sealing.SealContext("m", "i", 1, "a", "b")
    try:
        sealing.seal(kem_public, b"k" * 32, ctx)
    except SealError as err:
        return str(err.kwargs["reason"])
    return None


@pytest.mark.parametrize("kem_public", [v for _, v in _all_variants()],
                         ids=[n for n, _ in _all_variants()])
def test_enrollment_and_sealing_decide_alike(kem_public: bytes) -> None:
    enrolled = _enrollment_reason(kem_public)
    assert enrolled == _sealing_reason(kem_public)
    assert (enrolled is None) == (kem_public == REAL_KEM)
