"""EK certificate checks over certificates made here (a CA, an intermediate,
EK certificates for RSA and ECC EKs), as ``ekcert.verify`` sees them."""

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from tpm2_pytss.types import TPMT_PUBLIC

from vtpcm_common import exception
from vtpcm_nova.engine import ekcert

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool,
          start=NOW - DAY, end=NOW + 365 * DAY, eku=None) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(_name(issuer)).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _tpmt(key) -> bytes:
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return bytes(TPMT_PUBLIC.from_pem(pem).marshal())


@pytest.fixture(scope="module")
def pki():
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _cert("TPM Root CA", root_key, "TPM Root CA", root_key, ca=True)
    mid_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    mid = _cert("TPM EK Issuing CA", mid_key, "TPM Root CA", root_key, ca=True)
    ek_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ek_ecc = ec.generate_private_key(ec.SECP256R1())
    return {"root": root, "mid": mid, "mid_key": mid_key, "ek_rsa": ek_rsa,
            "ek_ecc": ek_ecc,
            "cert_rsa": _cert("ek", ek_rsa, "TPM EK Issuing CA", mid_key, ca=False),
            "cert_ecc": _cert("ek", ek_ecc, "TPM EK Issuing CA", mid_key, ca=False)}


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_a_certificate_from_a_trusted_ca_for_the_reported_ek_passes(pki, kind):
    cert = ekcert.verify(_der(pki["cert_" + kind]), _tpmt(pki["ek_" + kind]),
                         [pki["root"], pki["mid"]], host="h", now=NOW)
    assert cert.subject == _name("ek")


def _refused(pki, reason, cert=None, ek=None, cas=None, now=NOW):
    with pytest.raises(exception.CertificationError, match=reason):
        ekcert.verify(cert if cert is not None else _der(pki["cert_rsa"]),
                      ek if ek is not None else _tpmt(pki["ek_rsa"]),
                      cas if cas is not None else [pki["mid"]], host="h", now=now)


def test_another_ek_is_refused(pki):
    _refused(pki, "does not certify the reported EK", ek=_tpmt(pki["ek_ecc"]))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _refused(pki, "does not certify the reported EK", ek=_tpmt(other))


def test_an_unknown_or_impostor_ca_is_refused(pki):
    _refused(pki, "not signed by a trusted EK CA", cas=[pki["root"]])  # intermediate missing
    impostor_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    impostor = _cert("TPM EK Issuing CA", impostor_key, "TPM EK Issuing CA", impostor_key,
                     ca=True)  # same name, other key
    _refused(pki, "not signed by a trusted EK CA", cas=[impostor])
    forged = _cert("ek", pki["ek_rsa"], "TPM EK Issuing CA", impostor_key, ca=False)
    _refused(pki, "not signed by a trusted EK CA", cert=_der(forged), cas=[pki["mid"]])


def test_expired_certificates_are_refused(pki):
    old = _cert("ek", pki["ek_rsa"], "TPM EK Issuing CA", pki["mid_key"], ca=False,
                start=NOW - 10 * DAY, end=NOW - DAY)
    _refused(pki, "CN=ek is not valid now", cert=_der(old))
    # the EK certificate is valid, its issuing CA no longer
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    expired_ca = _cert("Old CA", ca_key, "Old CA", ca_key, ca=True, start=NOW - 10 * DAY,
                       end=NOW - DAY)
    ek = _cert("ek", pki["ek_rsa"], "Old CA", ca_key, ca=False, start=NOW - 10 * DAY)
    _refused(pki, "the issuing CA CN=Old CA is not valid now", cert=_der(ek),
             cas=[expired_ca])


def test_only_an_end_entity_ek_certificate_from_a_ca_counts(pki):
    # the issuing CA's own certificate presented as an EK certificate
    _refused(pki, "it is a CA certificate", cert=_der(pki["mid"]),
             ek=_tpmt(pki["mid_key"]), cas=[pki["root"]])
    # signed by a certificate of the file that is not a CA
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = _cert("Not a CA", leaf_key, "TPM EK Issuing CA", pki["mid_key"], ca=False)
    ek = _cert("ek", pki["ek_rsa"], "Not a CA", leaf_key, ca=False)
    _refused(pki, "not signed by a trusted EK CA", cert=_der(ek), cas=[leaf, pki["mid"]])
    # an extended key usage other than the EK one
    tls = _cert("ek", pki["ek_rsa"], "TPM EK Issuing CA", pki["mid_key"], ca=False,
                eku=[x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
    _refused(pki, "not tcg-kp-EKCertificate", cert=_der(tls))
    ok = _cert("ek", pki["ek_rsa"], "TPM EK Issuing CA", pki["mid_key"], ca=False,
               eku=[ekcert.TCG_KP_EK_CERTIFICATE])
    assert ekcert.verify(_der(ok), _tpmt(pki["ek_rsa"]), [pki["mid"]], host="h", now=NOW)


def test_an_ecc_ek_on_another_curve_is_refused(pki):
    p384 = ec.generate_private_key(ec.SECP384R1())
    cert = _cert("ek", p384, "TPM EK Issuing CA", pki["mid_key"], ca=False)
    _refused(pki, "does not certify the reported EK", cert=_der(cert),
             ek=_tpmt(pki["ek_ecc"]))
    assert ekcert.verify(_der(cert), _tpmt(p384), [pki["mid"]], host="h", now=NOW)


def test_malformed_input_is_named(pki, tmp_path):
    _refused(pki, "not a DER X.509 certificate", cert=b"\x30\x03junk")
    _refused(pki, "does not parse", ek=b"\x00\x01")
    _refused(pki, "trailing bytes", ek=_tpmt(pki["ek_rsa"]) + b"\x00")
    with pytest.raises(exception.InvalidInput, match="no PEM certificate"):
        (tmp_path / "cas.pem").write_text("nothing here")
        ekcert.load_ca_file(tmp_path / "cas.pem")
    with pytest.raises(exception.InvalidInput, match="EK CA file .*missing"):
        ekcert.load_ca_file(tmp_path / "missing.pem")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (pki["root"], pki["mid"]))
    (tmp_path / "good.pem").write_bytes(pem)
    assert len(ekcert.load_ca_file(tmp_path / "good.pem")) == 2
