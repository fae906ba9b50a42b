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

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from vtpcm_common import exception
from vtpcm_common import parentcert as common
from vtpcm_common.parentcert import HIERARCHIES as HIERARCHIES
from vtpcm_common.parentcert import HIERARCHY_HANDLES as HIERARCHY_HANDLES
from vtpcm_common.parentcert import REQUIRED_ATTRS as REQUIRED_ATTRS
from vtpcm_nova.engine import verifier


class CertifiedParent(NamedTuple):
    hierarchy: str
    name: bytes


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
    """One parent's certification (``vtpcm_common.parentcert.check`` with
    the enrolled AK's signature check)."""
    hierarchy = str(cert.get("hierarchy"))
    pinned = cert.get("pinned_name")

    def signed(attest: bytes, signature: bytes) -> None:
        try:
            verifier._verify_signature(ak, attest, signature,
                                       exception.CertificationError, host)
        except exception.CertificationError as err:
            raise common.Refused(err.kwargs["reason"]) from None
    try:
        name = common.check(cert, hierarchy, qualifying, signed)
    except common.Refused as err:
        shown = pinned.hex() if isinstance(pinned, bytes | bytearray) else "?"
        raise exception.CertificationError(host=host, reason=(
            f"storage parent {shown} ({hierarchy}) not certified by the AK: {err.reason}")
        ) from None
    return CertifiedParent(hierarchy, name)
