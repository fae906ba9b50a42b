"""Whether a host's KEM key is bound to the engine's golden PCR values.

Why (issue 9 point 8, engine side): with ``[host_tpm] kem_policy_pcrs`` the
agent creates its KEM key with authPolicy = PolicyPCR(those sha256 PCRs,
their values then) || PolicyAuthValue and userWithAuth clear, so the TPM
runs ECDH_ZGen (opens a migration key) only while those PCRs hold the values
the key was bound to. The engine enrolls that key from an AK certify, which
proves the public area (authPolicy and attributes included) but nothing
compared it with the engine's policy: a key bound to other values (stale
after an approved update), to PCRs the engine does not verify, or to none
was accepted silently, and sources sealed migration keys to it.

The engine recomputes the digest a trial session gives (TPM 2.0 Part 3,
PolicyPCR and PolicyAuthValue) from the policy's golden values, in pure
Python, and compares it with the certified authPolicy (``check``). A unit
test checks the computation against the digest of a real TPM's trial
session (``hostkeys.kem_policy``, the agent's own).

Pure: bytes in, a result or ``KemBindingError`` out.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.types import TPMT_PUBLIC

TPM_CC_POLICY_AUTH_VALUE = 0x0000016B
TPM_CC_POLICY_PCR = 0x0000017F
TPM_ALG_SHA256 = 0x000B
KEM_POLICY_BANK = "sha256"  # the bank the agent binds in (hosttpm.KEM_POLICY_BANK)
SIZEOF_SELECT = 3  # what the agent's selections carry (PCRs 0-23)
DIGEST_SIZE = 32


class KemBindingError(Exception):
    """The KEM key's binding does not agree with the engine's policy."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Binding(NamedTuple):
    """What ``check`` found: ``bound`` (PCR-bound), the PCRs it is bound to."""

    bound: bool
    pcrs: tuple[int, ...]


def pcr_selection(pcrs: Sequence[int]) -> bytes:
    """The marshaled TPML_PCR_SELECTION of ``pcrs`` in the sha256 bank, as
    the agent sends it to PolicyPCR (one bank, a 3-byte bitmap)."""
    bitmap = bytearray(SIZEOF_SELECT)
    for i in pcrs:
        if not 0 <= i < 8 * SIZEOF_SELECT:
            raise KemBindingError(f"PCR index {i} out of range 0-23")
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">IHB", 1, TPM_ALG_SHA256, SIZEOF_SELECT) + bytes(bitmap)


def expected_policy(pcrs: Sequence[int], values: Mapping[int, bytes]) -> bytes:
    """The authPolicy of a KEM key bound to ``values`` of ``pcrs`` (sha256):
    PolicyPCR then PolicyAuthValue from a zero digest, session hash SHA-256.

    PolicyPCR extends with the selection and the hash of the selected PCRs'
    values concatenated in index order (Part 3, 23.7); PolicyAuthValue with
    its command code alone (23.18)."""
    indices = sorted(set(pcrs))
    if not indices:
        raise KemBindingError("no PCRs to bind to")
    missing = [i for i in indices if i not in values]
    if missing:
        raise KemBindingError(f"no golden value for PCR {missing[0]}")
    for i in indices:
        if len(values[i]) != DIGEST_SIZE:
            raise KemBindingError(f"golden value of PCR {i} is not a sha256 digest")
    pcr_digest = hashlib.sha256(b"".join(values[i] for i in indices)).digest()
    digest = bytes(DIGEST_SIZE)
    digest = hashlib.sha256(digest + struct.pack(">I", TPM_CC_POLICY_PCR)
                            + pcr_selection(indices) + pcr_digest).digest()
    return hashlib.sha256(digest + struct.pack(">I", TPM_CC_POLICY_AUTH_VALUE)).digest()


def unbound(kem_public: bytes) -> bool:
    """Whether the KEM public area ``kem_public`` has no authPolicy: usable
    with its auth value in any platform state (``check`` accepts it only
    while ``require_binding`` is off)."""
    pub, _used = TPMT_PUBLIC.unmarshal(bytes(kem_public))
    return not bytes(pub.authPolicy)


def check(kem_public: bytes, bank: str, golden: Mapping[int, bytes],
          kem_pcrs: Sequence[int] | None, *, require_binding: bool,
          policy_name: str = "") -> Binding:
    """Check the certified KEM public area ``kem_public`` (marshaled
    TPMT_PUBLIC, already checked by ``tpmpublic.kem_public_key``) against
    the host's policy (``bank``, ``golden`` values); raise KemBindingError.

    ``kem_pcrs``: the selection the agent reports it bound the key to
    (agent API 1.9); None (an older agent): the policy's whole selection.
    A reported selection is not trusted: it only says which digest to
    compute, and a false one gives a digest that does not match.

    Rules: an unbound key (empty authPolicy, userWithAuth set) passes unless
    ``require_binding``. A bound key must have userWithAuth clear (else the
    auth value alone bypasses the policy), be bound in the sha256 bank to a
    non-empty subset of the policy's PCRs, and its authPolicy must be the
    digest of the golden values of that subset.
    """
    pub, _used = TPMT_PUBLIC.unmarshal(bytes(kem_public))
    auth_policy = bytes(pub.authPolicy)
    user_with_auth = bool(int(pub.objectAttributes) & TPMA_OBJECT.USERWITHAUTH)
    what = f"policy '{policy_name}'" if policy_name else "the host's policy"
    if not auth_policy:
        if not user_with_auth:
            raise KemBindingError("KEM key has neither an authPolicy nor userWithAuth "
                                  "(unusable)")
        if require_binding:
            raise KemBindingError(
                "KEM key is not bound to PCRs ([host_tpm] kem_policy_pcrs is empty on the "
                "host) but [attestation] require_kem_pcr_binding is set: set "
                "kem_policy_pcrs on the host and re-enroll it")
        return Binding(False, ())
    if user_with_auth:
        raise KemBindingError("KEM key has an authPolicy but also userWithAuth: its auth "
                              "value alone bypasses the PCR binding")
    if len(auth_policy) != DIGEST_SIZE:
        raise KemBindingError("KEM key's authPolicy is not a sha256 digest")
    if bank != KEM_POLICY_BANK:
        raise KemBindingError(
            f"{what} is in the {bank} bank; the KEM key's PCR binding (sha256) "
            "cannot be checked against it: use a sha256 policy")
    selection = tuple(sorted(set(golden))) if kem_pcrs is None else tuple(sorted(set(kem_pcrs)))
    if not selection:
        raise KemBindingError("the host reports a PCR-bound KEM key with no PCRs")
    outside = [i for i in selection if i not in golden]
    if outside:
        raise KemBindingError(
            f"KEM key is bound to PCRs {list(selection)} (host's [host_tpm] "
            f"kem_policy_pcrs) but {what} does not verify PCR{'s' if len(outside) > 1 else ''}"
            f" {outside}: bind it to a subset of the policy's PCRs and re-enroll")
    if not hmac.compare_digest(auth_policy, expected_policy(selection, golden)):
        reported = "" if kem_pcrs is not None else \
            " (the agent, older than API 1.9, does not report its selection: the policy's " \
            "whole selection was assumed)"
        raise KemBindingError(
            f"KEM key's authPolicy is not PolicyPCR(sha256:{list(selection)}) over the "
            f"golden values of {what} then PolicyAuthValue{reported}: it is bound to other "
            "PCR values (after an approved PCR update the host must be re-enrolled, which "
            "gives it a new KEM key) or to another selection")
    return Binding(True, selection)
