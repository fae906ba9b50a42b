"""The host TPM's endorsement key: certificate, public key, credential activation.

Why apart from ``hosttpm``: the EK is the manufacturer's key, not one the
agent derives for itself. Finding it walks the TCG EK Credential Profile
(certificate NV indices, the template that belongs to each certificate,
the two ways low and high range EKs authorize), none of which the AK, KEM
key or sealing need.

Every function takes an open ESAPI context: ``HostTPM`` calls them under its
lock and turns TSS errors into HostTPMError. Like the agent's own primaries
the EK is re-created from its template for one operation and flushed after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from oslo_log import log as logging
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_SE,
    TPMA_OBJECT,
)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from vtpcm_agent.hostkeys import ENCRYPT, Loaded, use
from vtpcm_common.exception import HostTPMError

LOG = logging.getLogger(__name__)

_Loaded = AbstractContextManager[Loaded]

# TCG EK Credential Profile EK certificate NV indices, in preference order:
# RSA 2048, ECC P-256 (low range), then the high range (RSA 2048, P-256,
# P-384 -- what swtpm_setup writes for its ECC EK --, P-521, RSA 3072/4096).
EK_CERT_INDICES = (0x01C00002, 0x01C0000A, 0x01C00012, 0x01C00014, 0x01C00016,
                   0x01C00018, 0x01C0001C, 0x01C0001E)
# The same preference as tpm2-pytss EK types: the EK re-created from the
# template that belongs to the certificate (TCG EK Credential Profile).
EK_TYPES = ("EK-RSA2048", "EK-ECC256", "EK-HIGH-RSA2048", "EK-HIGH-ECC256",
            "EK-HIGH-ECC384", "EK-HIGH-ECC521", "EK-HIGH-RSA3072", "EK-HIGH-RSA4096")
_NV_CHUNK = 512


@dataclass(frozen=True)
class EkInfo:
    """What ``get_identity`` reports about the EK: its certificate (None if
    none is provisioned), its public key (None for a certificate of an
    unknown type) and the template that public key came from."""

    certificate: bytes | None
    public: bytes | None = None
    template: bytes | None = None


def certificate_and_public(
        e: ESAPI, cached: Callable[[bytes], bytes | None] = lambda template: None) -> EkInfo:
    """EK certificate and the marshaled TPMT_PUBLIC of the EK it certifies.

    The certificate is read from NV every time (cheap, and it may be
    provisioned or renewed while the agent runs); the EK public key is
    re-created from its template (the most expensive TPM operation here)
    only when ``cached(template)`` has none. A certificate of a type
    without a known template still comes out, as evidence, but without a
    public key.
    """
    found = ek_template(e)
    if found is None:
        return EkInfo(_read_ek_certificate(e))  # none, or one of an unknown type
    ek_cert, template = found
    template_bytes = bytes(template.marshal())
    ek_public = cached(template_bytes)
    if ek_public is None:
        with loaded_ek(e, template) as (_ek_handle, ek_pub):
            ek_public = bytes(ek_pub.publicArea.marshal())
    return EkInfo(ek_cert, ek_public, template_bytes)


def parse_challenge(credential_blob: bytes,
                    encrypted_secret: bytes) -> tuple[TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET]:
    """Unmarshal a credential challenge before the TPM sees it (no trailing bytes)."""
    try:
        blob, used_blob = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, used_secret = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
    except Exception:  # tpm2-pytss raises several types on malformed bytes
        raise HostTPMError(reason="credential challenge does not parse") from None
    if (used_blob, used_secret) != (len(credential_blob), len(encrypted_secret)):
        raise HostTPMError(reason="credential challenge has trailing bytes")
    return blob, secret


def activate_credential(e: ESAPI, load_ak: Callable[[], _Loaded], blob: TPM2B_ID_OBJECT,
                        secret: TPM2B_ENCRYPTED_SECRET) -> bytes:
    """TPM2_ActivateCredential with the AK ``load_ak`` creates and the EK.

    The AK is injected because it is the caller's key, not the EK's concern.
    """
    found = ek_template(e)
    if found is None:
        raise HostTPMError(reason="no EK certificate provisioned in the host TPM")
    template = found[1]
    with load_ak() as ak, loaded_ek(e, template) as (ek, _ek_pub):
        return activate_with(e, ak, ek, template, blob, secret)


def activate_with(e: ESAPI, ak: Loaded, ek: ESYS_TR, template: TPM2B_PUBLIC,
                  blob: TPM2B_ID_OBJECT, secret: TPM2B_ENCRYPTED_SECRET) -> bytes:
    """TPM2_ActivateCredential with a loaded AK and EK (``template``: the
    EK's, which says how it authorizes)."""
    # the AK's ADMIN auth through its salted session, which also
    # encrypts the released credential
    ak_session = use(e, ak.session, ENCRYPT)
    if template.publicArea.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
        # high-range EK templates: empty auth value, no policy
        return bytes(e.activate_credential(ak.handle, ek, blob, secret,
                                           session1=ak_session,
                                           session2=ESYS_TR.PASSWORD))
    session = e.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
        TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
    try:
        # low-range EK policy: PolicySecret(TPM_RH_ENDORSEMENT)
        e.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
        return bytes(e.activate_credential(ak.handle, ek, blob, secret,
                                           session1=ak_session,
                                           session2=session))
    finally:
        e.flush_context(session)


def _nv_read(e: ESAPI, index: int) -> bytes:
    """A whole NV index; NoSuchIndex if it is not defined (what
    tpm2-pytss' EK template builder expects)."""
    _more, data = e.get_capability(TPM2_CAP.HANDLES, TPM2_HC.NV_INDEX_FIRST, 256)
    if int(index) not in {int(h) for h in data.data.handles}:
        raise NoSuchIndex(int(index))
    tr = e.tr_from_tpmpublic(int(index))
    nv_public, _name = e.nv_read_public(tr)
    size = int(nv_public.nvPublic.dataSize)
    return b"".join(bytes(e.nv_read(tr, min(_NV_CHUNK, size - off), off))
                    for off in range(0, size, _NV_CHUNK))


def ek_template(e: ESAPI) -> tuple[bytes, TPM2B_PUBLIC] | None:
    """(EK certificate, EK template) of the first EK type whose
    certificate is provisioned; None on a TPM without one."""
    for ek_type in EK_TYPES:
        try:
            cert, template = create_ek_template(ek_type, lambda i: _nv_read(e, i))
        except ValueError:  # tpm2-pytss: no certificate of this (high range) type
            continue
        except TSS2_Exception as exc:
            LOG.warning("Cannot read the %(t)s certificate or template: %(err)s",
                        {"t": ek_type, "err": exc})
            continue
        if cert:
            return bytes(cert), template
    return None


@contextmanager
def loaded_ek(e: ESAPI, template: TPM2B_PUBLIC) -> Iterator[tuple[ESYS_TR, TPM2B_PUBLIC]]:
    handle, public, _cdata, _cdigest, _ticket = e.create_primary(
        None, template, ESYS_TR.ENDORSEMENT)
    try:
        yield handle, public
    finally:
        e.flush_context(handle)


def _read_ek_certificate(e: ESAPI) -> bytes | None:
    for index in EK_CERT_INDICES:
        try:
            return _nv_read(e, index)
        except NoSuchIndex:
            continue
        except TSS2_Exception as exc:
            # The certificate is optional evidence: report, try the next.
            LOG.warning("Cannot read the EK certificate at NV index %(i)#x: %(err)s",
                        {"i": index, "err": exc})
    return None
