"""Checks of a host TPM's endorsement key certificate (pure, no I/O but
reading the CA file once).

Why: the AK that signs quotes and certifies the KEM key is only as
trustworthy as the proof that it lives in a real TPM. The EK certificate,
issued by the TPM's manufacturer (swtpm-localca in the lab), vouches that
its EK is a TPM key; credential activation (``attestation``) then proves the
AK sits in the same TPM as that EK. Here: the certificate is issued by one
of the configured EK CAs, is valid now, and certifies exactly the EK public
area the agent reported.

EK certificates carry TPM-specific critical extensions (a directoryName
subjectAltName with the TPM vendor and model) that generic X.509 path
validators refuse, so the check is done here: the EK certificate must be
signed by a certificate of the CA file (every certificate there is a trust
anchor, so list the issuing intermediates, not only the roots).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC
from tpm2_pytss.types import TPMT_PUBLIC

from vtpcm_common import exception

TCG_KP_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")
_CURVES: dict[int, type[ec.EllipticCurve]] = {
    int(TPM2_ECC.NIST_P256): ec.SECP256R1, int(TPM2_ECC.NIST_P384): ec.SECP384R1,
    int(TPM2_ECC.NIST_P521): ec.SECP521R1}


def load_ca_file(path: Path | str) -> list[x509.Certificate]:
    """The trusted EK CA certificates (PEM, one or more)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise exception.InvalidInput(reason="EK CA file %s: %s" % (path, err.strerror)) \
            from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise exception.InvalidInput(reason="EK CA file %s holds no PEM certificate" % path) \
            from None
    return list(certs)


def _err(host: str, reason: str) -> exception.CertificationError:
    return exception.CertificationError(host=host, reason="EK certificate: " + reason)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Name chaining and the signature (PKCS#1 v1.5, PSS or ECDSA)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def printable(text: str, limit: int = 120) -> str:
    """Certificate names are attacker text: no control characters, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def _check_ek_profile(cert: x509.Certificate, host: str) -> None:
    """TCG EK credential profile, as far as it protects us: an end-entity
    certificate whose extended key usage, if present, is the EK one."""
    if _is_ca(cert):
        raise _err(host, "it is a CA certificate, not an EK certificate")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if TCG_KP_EK_CERTIFICATE not in list(usages):
        raise _err(host, "its extended key usage is not tcg-kp-EKCertificate")


def _valid_at(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _matches(cert: x509.Certificate, ek: TPMT_PUBLIC) -> bool:
    key = cert.public_key()
    if ek.type == TPM2_ALG.RSA and isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        exponent = int(ek.parameters.rsaDetail.exponent) or 65537
        return (numbers.n == int.from_bytes(bytes(ek.unique.rsa), "big")
                and numbers.e == exponent)
    if ek.type == TPM2_ALG.ECC and isinstance(key, ec.EllipticCurvePublicKey):
        curve = _CURVES.get(int(ek.parameters.eccDetail.curveID))
        point = key.public_numbers()
        return (curve is not None and isinstance(key.curve, curve)
                and point.x == int.from_bytes(bytes(ek.unique.ecc.x), "big")
                and point.y == int.from_bytes(bytes(ek.unique.ecc.y), "big"))
    return False


def verify(cert_der: bytes, ek_public: bytes, cas: Sequence[x509.Certificate], *,
           host: str, now: datetime.datetime) -> x509.Certificate:
    """Return the parsed EK certificate if it certifies ``ek_public`` (a
    marshaled TPMT_PUBLIC), is valid at ``now`` and is issued by one of ``cas``;
    raise CertificationError naming what failed."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise _err(host, "not a DER X.509 certificate") from None
    try:
        ek, used = TPMT_PUBLIC.unmarshal(ek_public)
    except Exception:  # tpm2-pytss raises several types on malformed bytes
        raise _err(host, "the reported EK public area does not parse") from None
    if used != len(ek_public):
        raise _err(host, "the reported EK public area has trailing bytes")
    if not _matches(cert, ek):
        raise _err(host, "it does not certify the reported EK")
    _check_ek_profile(cert, host)
    # the signature first: names of an untrusted certificate are not repeated
    issuers = [ca for ca in cas if _is_ca(ca) and _issued_by(cert, ca)]
    if not issuers:
        raise _err(host, "not signed by a trusted EK CA")
    if not _valid_at(cert, now):
        raise _err(host, "%s is not valid now" % printable(cert.subject.rfc4514_string()))
    if not any(_valid_at(ca, now) for ca in issuers):
        raise _err(host, "the issuing CA %s is not valid now"
                   % printable(issuers[0].subject.rfc4514_string()))
    return cert


def fingerprint(cert: x509.Certificate) -> str:
    """Short SHA-256 fingerprint of an EK certificate, for the audit."""
    return cert.fingerprint(hashes.SHA256()).hex()[:16]
