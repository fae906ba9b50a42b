"""The agent verifies its own TPM before its first seal (``[host_tpm]
ek_ca_file``; issue 9, review round 3 of the certified parents).

Why: at the first start nothing is pinned yet. An active interposer on the
TPM interface that swaps the owner storage primary while the host key is
sealed reads the host key, hence the AK's and KEM key's auth values
(``keyauth``); with a broker client rewriting the unsigned identity reply
it then has the real AK certify the real primaries and the host enrolls.
Pins and the engine's checks come too late for that. So before any secret
goes to the TPM the agent itself:

1. reads the EK certificate and the EK (re-created from its template) and
   verifies the certificate against the EK CA bundle with the engine's own
   code (``vtpcm_common.ekcert``): issued by a listed CA, valid now, and
   certifying exactly the EK public area the TPM answered (an interposer
   answering with its own EK is refused here);
2. starts an HMAC session salted to that EK: only the TPM holding the
   certified EK's private key can compute its session key. The AK is
   created in it (its auth value, the inSensitive, parameter-encrypted),
   and the session also authorizes the AK's parent, so the parent's name
   as the agent saw it is in the command HMAC: a swapped handle fails it;
3. proves the AK is in the same TPM as the EK: a software MakeCredential
   to the verified EK over the AK's name, then ActivateCredential in the
   TPM; anything but the same secret back is refused;
4. has the AK TPM2_CertifyCreation both storage primaries (their creation
   tickets exist only for objects this TPM created) and checks locally the
   AK's signature, that the certified name is the name the agent will pin,
   the creation hash and that the parent is the hierarchy; then creates
   the KEM key under the certified owner primary in the same session.

The caller (``keystore.TPMSealedHostKey``) then seals the host key under
the certified owner primary (pinned: its session is salted to that name
and a CreatePrimary answer with another name is refused), and writes the
key blobs and the sealed host key only once everything passed. Every
refusal is ``FirstStartRefused`` naming the step; no secret is in it.
"""

from __future__ import annotations

import datetime
import hmac
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_NAME,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMT_SIGNATURE,
)
from tpm2_pytss.utils import make_credential

from vtpcm_agent import hostek, hostkeys
from vtpcm_common import ekcert, parentcert
from vtpcm_common.exception import CertificationError, HostTPMError


class FirstStartRefused(HostTPMError):
    """The first start's verification of the host TPM failed: nothing was
    written, no secret was sent under an unverified key."""


def _refuse(step: str, why: str) -> FirstStartRefused:
    return FirstStartRefused(reason=(
        f"first start refused at step '{step}' of the host TPM's verification "
        f"([host_tpm] ek_ca_file): {why}. Nothing was written to the state directory; "
        "check the TPM device path and what is attached to it, and the EK CA bundle"))


@contextmanager
def _step(name: str) -> Iterator[None]:
    """TPM errors of one step as ``FirstStartRefused`` naming it."""
    try:
        yield
    except FirstStartRefused:
        raise
    except hostkeys.ParentMismatch as exc:
        raise _refuse(name, exc.kwargs["reason"]) from None
    except (TSS2_Exception, HostTPMError) as exc:
        raise _refuse(name, f"{exc} (a session HMAC that fails here means something "
                            "between the agent and the TPM answered for a key)") from None


def verified_keys(e: ESAPI, cas: Sequence[x509.Certificate], ak_auth: bytes,
                  kem_auth: bytes, kem_pcrs: TPML_PCR_SELECTION | None,
                  now: datetime.datetime | None = None) -> hostkeys.KeyBlobs:
    """The agent's AK and KEM key, created and verified as the module says;
    their parents' names are the certified ones (``kem_parent_name``: the
    owner primary to seal the host key under)."""
    now = now or datetime.datetime.now(datetime.UTC)
    with _step("EK certificate"):
        found = hostek.ek_template(e)
    if found is None:
        raise _refuse("EK certificate", "the host TPM has no EK certificate in NV")
    cert_der, template = found
    with _step("EK certificate"), hostek.loaded_ek(e, template) as (ek, ek_pub):
        try:
            ekcert.verify(cert_der, bytes(ek_pub.publicArea.marshal()), cas,
                          host="this host", now=now)
        except CertificationError as exc:
            raise _refuse("EK certificate", exc.kwargs["reason"]) from None
        session = e.start_auth_session(ek, ESYS_TR.NONE, TPM2_SE.HMAC,
                                       hostkeys.SESSION_CIPHER, TPM2_ALG.SHA256)
        try:
            return _in_session(e, ek, ek_pub, template, session, ak_auth, kem_auth,
                               kem_pcrs)
        finally:
            e.flush_context(session)


def _in_session(e: ESAPI, ek: ESYS_TR, ek_pub: TPM2B_PUBLIC, template: TPM2B_PUBLIC,
                session: ESYS_TR, ak_auth: bytes, kem_auth: bytes,
                kem_pcrs: TPML_PCR_SELECTION | None) -> hostkeys.KeyBlobs:
    with _step("AK creation in a session salted to the EK"):
        ak_public, ak_private, ak_parent = hostkeys.create_ak(e, ak_auth, session)
    ak_pub, _used = TPM2B_PUBLIC.unmarshal(ak_public)
    with _step("credential activation"), _loaded_ak(e, ak_public, ak_private, ak_parent,
                                                    ak_auth, session) as ak:
        challenge = secrets.token_bytes(32)
        blob, secret = make_credential(ek_pub, challenge,
                                       TPM2B_NAME(hostkeys.object_name(ak_pub)))
        got = hostek.activate_with(e, ak, ek, template, blob, secret)
        if not hmac.compare_digest(got, challenge):
            raise _refuse("credential activation", "ActivateCredential released another "
                          "secret than the one made for this AK and the certified EK: the "
                          "AK is not proven to be in the EK's TPM")
    names: dict[str, bytes] = {}
    for hierarchy, pinned in ((hostkeys.AK_HIERARCHY, ak_parent),
                              (hostkeys.KEM_HIERARCHY, b"")):
        which = "endorsement" if hierarchy == hostkeys.AK_HIERARCHY else "owner"
        step = f"certification of the {which} storage primary"
        with _step(step), _loaded_ak(e, ak_public, ak_private, ak_parent, ak_auth,
                                     session) as ak:
            qualifying = secrets.token_bytes(32)
            cert = hostkeys.certify_parent(e, hierarchy, pinned, ak.handle,
                                           hostkeys.use(e, session, hostkeys.AUTH_ONLY),
                                           qualifying)
        names[which] = check_parent_certification(cert, ak_public, qualifying, step)
    with _step("KEM key creation under the certified owner primary"):
        kem_public, kem_private, kem_parent = hostkeys.create_kem(
            e, kem_auth, kem_pcrs, names["owner"], session)
    return hostkeys.KeyBlobs(ak_public=ak_public, ak_private=ak_private,
                             kem_public=kem_public, kem_private=kem_private,
                             ak_parent_name=names["endorsement"],
                             kem_parent_name=kem_parent)


@contextmanager
def _loaded_ak(e: ESAPI, public: bytes, private: bytes, parent: bytes, auth: bytes,
               session: ESYS_TR) -> Iterator[hostkeys.Loaded]:
    """The AK loaded under its pinned parent, the EK-salted session
    authorizing the parent (its name in the HMAC) and then the AK."""
    pub, _used = TPM2B_PUBLIC.unmarshal(public)
    priv, _used = TPM2B_PRIVATE.unmarshal(private)
    with hostkeys.pinned_parent(e, hostkeys.AK_HIERARCHY, parent) as (p, _name):
        handle = e.load(p, priv, pub, session1=hostkeys.use(e, session, hostkeys.AUTH_ONLY))
    try:
        e.tr_set_auth(handle, auth)
        yield hostkeys.Loaded(handle, pub, session)
    finally:
        e.flush_context(handle)


def check_parent_certification(cert: hostkeys.ParentCertification, ak_public: bytes,
                               qualifying: bytes, step: str = "parent certification",
                               ) -> bytes:
    """The certified name of ``cert``'s storage primary, after the engine's
    checks (``vtpcm_common.parentcert``: a creation attestation of this TPM
    signed by the AK, ``ak_public`` a marshaled TPM2B_PUBLIC, binding
    ``qualifying`` to the hierarchy and the name the agent pins, of an
    object with that name created as a primary of that hierarchy)."""
    try:
        ak, _n = TPM2B_PUBLIC.unmarshal(ak_public)
        point = ak.publicArea.unique.ecc
        key = ec.EllipticCurvePublicNumbers(int.from_bytes(bytes(point.x), "big"),
                                            int.from_bytes(bytes(point.y), "big"),
                                            ec.SECP256R1()).public_key()
    except Exception:  # tpm2-pytss raises several types on malformed bytes
        raise _refuse(step, "the AK's public area does not parse") from None

    def signed(attest: bytes, signature: bytes) -> None:
        try:
            sig, _n = TPMT_SIGNATURE.unmarshal(signature)
            ecdsa = sig.signature.ecdsa
            key.verify(encode_dss_signature(int.from_bytes(bytes(ecdsa.signatureR), "big"),
                                            int.from_bytes(bytes(ecdsa.signatureS), "big")),
                       attest, ec.ECDSA(hashes.SHA256()))
        except Exception:  # a malformed signature, or InvalidSignature
            raise parentcert.Refused("the AK's signature over the creation attestation "
                                     "does not verify") from None
    try:
        return parentcert.check(cert._asdict(), cert.hierarchy, qualifying, signed)
    except parentcert.Refused as err:
        raise _refuse(step, f"storage primary {cert.pinned_name.hex()} ({cert.hierarchy}) "
                            f"not certified by the AK: {err.reason}") from None
