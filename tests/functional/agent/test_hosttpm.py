"""HostTPM and the key envelope against real swtpm host TPM stand-ins."""

import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.types import TPMT_PUBLIC

from tests.functional.hosttpm_fixture import (  # noqa: F401
    TEST_KEY_AUTH,
    HostTPMStandIn,
    host_tpm_standin,
    second_host_tpm_standin,
)
from vtpcm_agent import sealing
from vtpcm_agent.hosttpm import HostTPM, SealedObject
from vtpcm_common import tpmpublic
from vtpcm_common.exception import HostTPMError, SealError

pytestmark = pytest.mark.functional

CTX = sealing.SealContext(migration_id="mig-1", instance_uuid="inst-1", generation=3,
                          source_host="host-a", dest_host="host-b")


@pytest.fixture
def tpm(host_tpm_standin: HostTPMStandIn) -> Iterator[HostTPM]:  # noqa: F811
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH) as t:
        yield t


@pytest.fixture
def other_tpm(second_host_tpm_standin: HostTPMStandIn) -> Iterator[HostTPM]:  # noqa: F811
    with HostTPM(second_host_tpm_standin.tcti, TEST_KEY_AUTH) as t:
        yield t


# -- a minimal verifier, written from the spec (the engine has its own) ----
class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.off = data, 0

    def take(self, n: int) -> bytes:
        assert self.off + n <= len(self.data), "truncated"
        out = self.data[self.off:self.off + n]
        self.off += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())


def parse_attest(attest: bytes) -> dict[str, object]:
    r = Reader(attest)
    out: dict[str, object] = {"magic": r.u32(), "type": r.u16(), "signer": r.tpm2b(),
                              "extra": r.tpm2b(), "clock": r.u64(), "reset": r.u32(),
                              "restart": r.u32(), "safe": r.u8(), "fw": r.u64()}
    if out["type"] == 0x8018:  # quote
        sels = []
        for _ in range(r.u32()):
            alg, size = r.u16(), r.u8()
            sels.append((alg, r.take(size)))
        out["pcr_select"] = sels
        out["pcr_digest"] = r.tpm2b()
    elif out["type"] == 0x8017:  # certify
        out["name"] = r.tpm2b()
        out["qualified_name"] = r.tpm2b()
    assert r.off == len(attest), "trailing bytes"
    return out


def verify_signature(ak_public: bytes, attest: bytes, signature: bytes) -> None:
    ak, _ = TPMT_PUBLIC.unmarshal(ak_public)
    x, y = bytes(ak.unique.ecc.x), bytes(ak.unique.ecc.y)
    key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                        ec.SECP256R1()).public_key()
    r = Reader(signature)
    assert (r.u16(), r.u16()) == (0x0018, 0x000B)  # ECDSA, SHA-256
    sig_r, sig_s = int.from_bytes(r.tpm2b(), "big"), int.from_bytes(r.tpm2b(), "big")
    assert r.off == len(signature)
    key.verify(encode_dss_signature(sig_r, sig_s), attest, ec.ECDSA(hashes.SHA256()))


# -- identity -----------------------------------------------------------------
def test_identity_certifies_kem_key(tpm: HostTPM) -> None:
    nonce = os.urandom(32)
    ident = tpm.identity(nonce)
    assert b"\x00\x0b" + hashlib.sha256(ident.ak_public).digest() == ident.ak_name
    assert b"\x00\x0b" + hashlib.sha256(ident.kem_public).digest() == ident.kem_name
    ak, _ = TPMT_PUBLIC.unmarshal(ident.ak_public)
    # restricted|sign|fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA
    assert int(ak.objectAttributes) == 0x00050472
    # the KEM key the TPM made passes the engine's and the agents' one check
    assert tpmpublic.kem_public_key(ident.kem_public).name == ident.kem_name
    verify_signature(ident.ak_public, ident.kem_certify_attest, ident.kem_certify_signature)
    attest = parse_attest(ident.kem_certify_attest)
    assert attest["magic"] == 0xFF544347 and attest["type"] == 0x8017
    assert attest["extra"] == nonce
    assert attest["name"] == ident.kem_name
    assert ident.ek_certificate is None  # a bare stand-in has no EK certificate
    assert "ak_public" in repr(ident)


def test_certify_signature_breaks_when_tampered(tpm: HostTPM) -> None:
    ident = tpm.identity(b"n")
    bad = bytearray(ident.kem_certify_attest)
    bad[-1] ^= 1
    with pytest.raises(InvalidSignature):
        verify_signature(ident.ak_public, bytes(bad), ident.kem_certify_signature)


def test_keys_survive_a_host_reboot(host_tpm_standin: HostTPMStandIn) -> None:  # noqa: F811
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH) as first:
        a = first.identity(b"1")
    host_tpm_standin.stop()
    host_tpm_standin.start()  # a reboot of the host: the same blobs load again
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH) as second:
        b = second.identity(b"2")
    assert (a.ak_public, a.ak_name, a.kem_public, a.kem_name) == (
        b.ak_public, b.ak_name, b.kem_public, b.kem_name)


def test_different_tpms_have_different_keys(tpm: HostTPM, other_tpm: HostTPM) -> None:
    assert tpm.identity(b"").kem_public != other_tpm.identity(b"").kem_public


def test_ek_certificate_is_read(tmp_path: Path) -> None:
    with HostTPMStandIn(tmp_path, "ek", with_ek_cert=True) as standin:
        with HostTPM(standin.tcti, TEST_KEY_AUTH) as t:
            cert_der = t.identity(b"x").ek_certificate
    assert cert_der is not None
    # NV indices may be padded after the DER certificate: parse the DER length.
    cert = x509.load_der_x509_certificate(cert_der[:4 + int.from_bytes(cert_der[2:4], "big")])
    assert cert.public_key() is not None


# -- quote --------------------------------------------------------------------
def check_quote(tpm: HostTPM, nonce: bytes, pcrs: list[int]) -> dict[str, object]:
    ak_public = tpm.identity(b"").ak_public
    q = tpm.quote(nonce, pcrs)
    verify_signature(ak_public, q.attest, q.signature)
    attest = parse_attest(q.attest)
    assert attest["magic"] == 0xFF544347 and attest["type"] == 0x8018
    assert attest["extra"] == nonce
    assert sorted(q.pcr_values) == sorted(pcrs)
    expected = hashlib.sha256(b"".join(q.pcr_values[i] for i in sorted(pcrs))).digest()
    assert attest["pcr_digest"] == expected
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    assert attest["pcr_select"] == [(0x000B, bytes(bitmap))]
    return attest


def test_quote_all_24_pcrs(tpm: HostTPM) -> None:
    check_quote(tpm, os.urandom(32), list(range(24)))


def test_quote_few_pcrs_and_extend(tpm: HostTPM) -> None:
    pcrs = [0, 7, 16]
    before = check_quote(tpm, b"n1", pcrs)
    tpm.extend_pcr(16, hashlib.sha256(b"untrusted kernel").digest())
    after = check_quote(tpm, b"n2", pcrs)
    assert before["pcr_digest"] != after["pcr_digest"]
    value = tpm.read_pcrs([16])[16]
    assert value == hashlib.sha256(bytes(32) + hashlib.sha256(b"untrusted kernel").digest()
                                   ).digest()


def test_quote_retries_when_pcrs_change_meanwhile(
        tpm: HostTPM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PCR extended between TPM2_Quote and TPM2_PCR_Read: quote again."""
    real_read = HostTPM._read_pcrs
    calls = []

    def racing_read(e: object, indices: list[int], bank: str) -> dict[int, bytes]:
        calls.append(1)
        if len(calls) == 1:
            tpm.extend_pcr(16, bytes(32))  # "another process" extends meanwhile
        return real_read(e, indices, bank)  # type: ignore[arg-type]

    monkeypatch.setattr(tpm, "_read_pcrs", racing_read)
    attest = check_quote(tpm, b"n", [16])
    assert len(calls) == 2 and attest["extra"] == b"n"

    def always_racing(e: object, indices: list[int], bank: str) -> dict[int, bytes]:
        tpm.extend_pcr(16, bytes(32))
        return real_read(e, indices, bank)  # type: ignore[arg-type]

    monkeypatch.setattr(tpm, "_read_pcrs", always_racing)
    with pytest.raises(HostTPMError, match="kept changing"):
        tpm.quote(b"n", [16])


def test_quote_and_pcr_input_validation(tpm: HostTPM) -> None:
    for bad in ([], [24], [-1], [1, 1]):
        with pytest.raises(HostTPMError):
            tpm.quote(b"n", bad)
    with pytest.raises(HostTPMError):
        tpm.quote(b"n" * 65, [0])
    with pytest.raises(HostTPMError):
        tpm.quote(b"n", [0], bank="md5")
    with pytest.raises(HostTPMError):
        tpm.extend_pcr(16, b"short")


# -- ECDH and the envelope ----------------------------------------------------
def test_envelope_opens_only_in_destination_tpm(tpm: HostTPM, other_tpm: HostTPM) -> None:
    dest_kem = tpm.identity(b"").kem_public
    secret = os.urandom(32)
    env = sealing.seal(dest_kem, secret, CTX)
    assert sealing.open_envelope(env, CTX, tpm.ecdh_zgen) == secret
    with pytest.raises(SealError, match="authentication failed"):
        sealing.open_envelope(env, CTX, other_tpm.ecdh_zgen)


def test_ecdh_zgen_matches_software(tpm: HostTPM) -> None:
    kem = tpmpublic.kem_public_key(tpm.identity(b"").kem_public).key
    eph = ec.generate_private_key(ec.SECP256R1())
    nums = eph.public_key().public_numbers()
    z = tpm.ecdh_zgen(nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big"))
    assert z == eph.exchange(ec.ECDH(), kem)


def test_ecdh_zgen_rejects_bad_points(tpm: HostTPM) -> None:
    with pytest.raises(HostTPMError, match="not on the required curve"):
        tpm.ecdh_zgen(b"\x01" * 32, b"\x02" * 32)
    with pytest.raises(HostTPMError, match="32 bytes"):
        tpm.ecdh_zgen(b"\x01" * 31, b"\x02" * 32)


# -- sealing in the host TPM --------------------------------------------------
def test_seal_unseal(tpm: HostTPM, other_tpm: HostTPM) -> None:
    secret = os.urandom(32)
    sealed = tpm.seal(secret)
    blob = sealed.to_bytes()
    assert secret not in blob
    assert secret.hex() not in repr(sealed)
    restored = SealedObject.from_bytes(blob)
    assert tpm.unseal(restored) == secret
    with pytest.raises(HostTPMError, match="owner storage primary the TPM answered has "
                       "name .* not the pinned"):
        other_tpm.unseal(restored)


def test_sealed_object_parsing(tpm: HostTPM) -> None:
    blob = tpm.seal(b"s").to_bytes()
    for bad in (blob[:-1], blob + b"\x00", b"XXXX" + blob[4:], b""):
        with pytest.raises(HostTPMError):
            SealedObject.from_bytes(bad)
    sealed = SealedObject.from_bytes(blob)
    tampered = SealedObject(public=sealed.public,
                            private=sealed.private[:-1] + bytes([sealed.private[-1] ^ 1]))
    with pytest.raises(HostTPMError):
        tpm.unseal(tampered)
    with pytest.raises(HostTPMError):
        tpm.seal(b"")
    with pytest.raises(HostTPMError):
        tpm.seal(b"x" * 129)


def test_slots_are_not_leaked(tpm: HostTPM) -> None:
    """Hundreds of operations in a TPM with 3 object slots: nothing leaks."""
    for _ in range(30):
        tpm.identity(b"n")
        tpm.quote(b"n", [0])
        tpm.unseal(tpm.seal(b"s"))
        with pytest.raises(HostTPMError):
            tpm.ecdh_zgen(b"\x01" * 32, b"\x02" * 32)
    tpm.flush_stale_transients()  # nothing left to flush; must not fail


def test_closed_tpm_refuses(host_tpm_standin: HostTPMStandIn) -> None:  # noqa: F811
    t = HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH)
    t.close()
    t.close()
    with pytest.raises(HostTPMError, match="closed"):
        t.quote(b"n", [0])


def test_unreachable_tpm(tmp_path: Path) -> None:
    with pytest.raises(HostTPMError):
        HostTPM(f"swtpm:path=/tmp/does-not-exist-{os.getpid()}").quote(b"", [0])


@pytest.fixture(scope="module")
def certified_tpms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[HostTPMStandIn]]:
    """Two manufactured stand-ins: EKs with certificates from swtpm-localca."""
    base = tmp_path_factory.mktemp("ektpm")
    standins = [HostTPMStandIn(base, name, with_ek_cert=True) for name in ("ek1", "ek2")]
    try:
        for standin in standins:
            standin.start()
        yield standins
    finally:
        for standin in standins:
            standin.cleanup()


def test_identity_reports_the_ek_its_certificate_certifies(certified_tpms):
    from tpm2_pytss.types import TPMT_PUBLIC
    with HostTPM(certified_tpms[0].tcti, TEST_KEY_AUTH) as t:
        ident = t.identity(os.urandom(32))
    assert ident.ek_certificate is not None and ident.ek_public is not None
    ek, _ = TPMT_PUBLIC.unmarshal(ident.ek_public)
    cert_key = x509.load_der_x509_certificate(ident.ek_certificate).public_key()
    assert int.from_bytes(bytes(ek.unique.rsa), "big") == cert_key.public_numbers().n


def test_credential_activates_only_for_an_ak_of_the_ek_s_tpm(certified_tpms):
    from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPMT_PUBLIC
    from tpm2_pytss.utils import make_credential
    with HostTPM(certified_tpms[0].tcti, TEST_KEY_AUTH) as one, \
            HostTPM(certified_tpms[1].tcti, TEST_KEY_AUTH) as two:
        ident_one, ident_two = one.identity(os.urandom(32)), two.identity(os.urandom(32))
        ek_one = TPM2B_PUBLIC(publicArea=TPMT_PUBLIC.unmarshal(ident_one.ek_public)[0])
        secret = os.urandom(32)
        blob, enc = make_credential(ek_one, secret, TPM2B_NAME(ident_one.ak_name))
        assert one.activate_credential(bytes(blob.marshal()), bytes(enc.marshal())) == secret
        # the other TPM's AK named against this EK: the TPM refuses
        blob, enc = make_credential(ek_one, secret, TPM2B_NAME(ident_two.ak_name))
        with pytest.raises(HostTPMError, match="activate credential failed"):
            one.activate_credential(bytes(blob.marshal()), bytes(enc.marshal()))
        # encrypted to this EK, asked of the other TPM: it cannot open it
        blob, enc = make_credential(ek_one, secret, TPM2B_NAME(ident_one.ak_name))
        with pytest.raises(HostTPMError):
            two.activate_credential(bytes(blob.marshal()), bytes(enc.marshal()))


def test_credential_activates_with_a_high_range_ek(certified_tpms, monkeypatch):
    """swtpm's second EK certificate (ECC P-384, high range 0x01c00016):
    its template allows the empty auth value instead of the low range's
    PolicySecret, and the agent must use it."""
    from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPMT_PUBLIC
    from tpm2_pytss.utils import make_credential

    from vtpcm_agent import hostek
    monkeypatch.setattr(hostek, "EK_TYPES", ("EK-HIGH-ECC384",))
    with HostTPM(certified_tpms[0].tcti, TEST_KEY_AUTH) as t:
        ident = t.identity(os.urandom(32))
        ek, _ = TPMT_PUBLIC.unmarshal(ident.ek_public)
        cert_key = x509.load_der_x509_certificate(ident.ek_certificate).public_key()
        assert isinstance(cert_key, ec.EllipticCurvePublicKey) and cert_key.curve.name == \
            "secp384r1"
        secret = os.urandom(32)
        blob, enc = make_credential(TPM2B_PUBLIC(publicArea=ek), secret,
                                    TPM2B_NAME(ident.ak_name))
        assert t.activate_credential(bytes(blob.marshal()), bytes(enc.marshal())) == secret
        with pytest.raises(HostTPMError, match="trailing bytes"):
            t.activate_credential(bytes(blob.marshal()) + b"\x00", bytes(enc.marshal()))
