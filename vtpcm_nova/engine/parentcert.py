"""Check the AK's certification of the agent's storage parents (issue 9).

Why: the agent salts its HMAC sessions to the storage primaries whose names
it pinned at first start (``vtpcm_agent/hostkeys.py``). The pin binds later
starts to the first but does not authenticate the first: an interposer on
the TPM interface present then is pinned itself and reads every session.
At enrollment the AK (proven against the EK by credential activation)
therefore certifies each parent with TPM2_CertifyCreation. Its creation
ticket is an HMAC under the TPM's proof value over the object's name and
creation hash that only TPM2_Create/CreatePrimary issue: a key the
interposer loaded with TPM2_LoadExternal (or imported) has none, and the TPM
refuses a fabricated one (TPM_RC_TICKET, seen with libtpms). So the AK signs
the name of an object this TPM created; the creation data (hashed into the
ticket) says it is a primary of the hierarchy, the public area says it is a
fixedTPM restricted decryption key whose private part never left the TPM,
and the name is the one the agent pinned. The agent binds its pin into the
certification's qualifying data (``authn.parent_binding``): the reply that
carries ``pinned_name`` is not signed, so without it a broker client could
rewrite the name to the real primary's (public) and hide an interposer the
agent pinned. Pure: bytes in, names out.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPMT_PUBLIC

from vtpcm_common import authn, exception
from vtpcm_nova.engine import tpmstruct, verifier

# the hierarchy handles a primary's creation data names as its parent
HIERARCHY_HANDLES = {"endorsement": 0x4000000B, "owner": 0x40000001}
# endorsement: the AK's parent; owner: the KEM key's and the host key's
HIERARCHIES = ("endorsement", "owner")
# a storage key whose private part was generated in this TPM and never leaves it
REQUIRED_ATTRS = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                  | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.RESTRICTED
                  | TPMA_OBJECT.DECRYPT)


class CertifiedParent(NamedTuple):
    hierarchy: str
    name: bytes


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def verify(ak: verifier.AttestationKey, certs: Sequence[Mapping[str, Any]],
           qualifying: bytes, *, host: str) -> tuple[CertifiedParent, ...]:
    """Both parents' certifications (one per ``HIERARCHIES``), checked;
    CertificationError "storage parent ... not certified by the AK: ..."."""
    got = [c.get("hierarchy") if isinstance(c, Mapping) else None for c in certs]
    if sorted(map(str, got)) != sorted(HIERARCHIES):
        raise exception.CertificationError(host=host, reason=(
            "storage parents not certified by the AK: expected one certification each "
            f"for {', '.join(HIERARCHIES)}, got {got}"))
    return tuple(verify_one(ak, cert, qualifying, host=host) for cert in certs)


def verify_one(ak: verifier.AttestationKey, cert: Mapping[str, Any], qualifying: bytes,
               *, host: str) -> CertifiedParent:
    """One parent's certification (see the module for what it proves)."""
    hierarchy = str(cert.get("hierarchy"))
    pinned = cert.get("pinned_name")
    try:
        if hierarchy not in HIERARCHY_HANDLES:
            raise _Refused("unknown hierarchy")
        _check(ak, cert, hierarchy, qualifying, host)
    except _Refused as err:
        shown = pinned.hex() if isinstance(pinned, bytes | bytearray) else "?"
        raise exception.CertificationError(host=host, reason=(
            f"storage parent {shown} ({hierarchy}) not certified by the AK: {err.reason}")
        ) from None
    return CertifiedParent(hierarchy, _blob(cert, "pinned_name"))


def _blob(cert: Mapping[str, Any], key: str) -> bytes:
    value = cert.get(key)
    if not isinstance(value, bytes | bytearray) or not value:
        raise _Refused(f"{key} missing or not bytes")
    return bytes(value)


def _check(ak: verifier.AttestationKey, cert: Mapping[str, Any], hierarchy: str,
           qualifying: bytes, host: str) -> None:
    public, pinned = _blob(cert, "public"), _blob(cert, "pinned_name")
    attest, signature = _blob(cert, "attest"), _blob(cert, "signature")
    creation = _blob(cert, "creation_data")
    name = _storage_key_name(public)
    if not hmac.compare_digest(name, pinned):
        raise _Refused("the pinned name is not the name of the reported public area")
    try:
        verifier._verify_signature(ak, attest, signature, exception.CertificationError,
                                   host)
    except exception.CertificationError as err:
        raise _Refused(err.kwargs["reason"]) from None
    try:
        info = tpmstruct.creation_attest(attest)
        data = tpmstruct.creation_data(creation)
    except tpmstruct.Malformed as err:
        raise _Refused(err.reason) from None
    if info.magic != TPM2_GENERATED.VALUE:
        raise _Refused("attestation was not generated by a TPM (bad magic)")
    # the agent bound its own pin into extraData: a rewritten pinned_name
    # (the reply is unsigned) is refused here, whatever the TPM certified
    if not qualifying or not hmac.compare_digest(
            info.extra_data, authn.parent_binding(qualifying, hierarchy, pinned)):
        raise _Refused("it does not bind this enrollment's nonce, this hierarchy and the "
                       "reported pinned name (stale or replayed, or the pinned name was "
                       "rewritten between agent and engine)")
    if not hmac.compare_digest(info.object_name, pinned):
        raise _Refused(
            f"the TPM certified the creation of {info.object_name.hex()}, not of the "
            "pinned name: the agent salts its sessions to a key that is not this TPM's "
            "storage primary (an interposer on the TPM interface when the agent pinned "
            "it, or another TPM)")
    if not hmac.compare_digest(hashlib.sha256(creation).digest(), info.creation_hash):
        raise _Refused("the creation data is not the one the TPM certified")
    handle = HIERARCHY_HANDLES[hierarchy].to_bytes(4, "big")
    if data.parent_name != handle or data.parent_qualified_name != handle:
        raise _Refused(f"it was created under {data.parent_name.hex()}, not as a primary "
                       f"of the {hierarchy} hierarchy")


def _storage_key_name(public: bytes) -> bytes:
    """The name of ``public`` if it is a storage key of the kind the agent
    salts to (ECC, SHA-256 name, ``REQUIRED_ATTRS``, not a signing key)."""
    try:
        pub, used = TPMT_PUBLIC.unmarshal(public)
    except (TSS2_Exception, ValueError, TypeError, OverflowError):
        raise _Refused("its public area is malformed or truncated") from None
    if used != len(public):
        raise _Refused(f"its public area has {len(public) - used} trailing bytes")
    if pub.type != TPM2_ALG.ECC or pub.nameAlg != TPM2_ALG.SHA256:
        raise _Refused("its public area is not an ECC key with a SHA-256 name")
    attrs = int(pub.objectAttributes)
    if attrs & REQUIRED_ATTRS != REQUIRED_ATTRS or attrs & TPMA_OBJECT.SIGN_ENCRYPT:
        # as a number: tpm2-pytss cannot print reserved bits (ValueError, fuzzing)
        raise _Refused(f"its attributes (0x{attrs:08x}) are not those of a storage key "
                       "generated in the TPM (fixedTPM, fixedParent, "
                       "sensitiveDataOrigin, restricted, decrypt, not sign)")
    return verifier.sha256_name(public)
