"""The auth values of the host TPM's AK and KEM key (the agent's own).

Why: the AK and the KEM key are TPM2_Create children (``hostkeys``) whose
use the TPM grants only with their auth value. The values are derived with
HKDF from the agent's host key, which is 32 random bytes sealed in this TPM
(a root-only file holds the sealed blob; only this TPM unseals it, and the
unseal response comes back through an encrypted session): they are as secret
as the host key, need no sealed file of their own, and a new host key (or a
new TPM) means new keys and a new enrollment.

They reach the TPM only inside parameter-encrypted TPM2_Create and as
session HMACs, never in clear (a TPM-stream observer does not learn them),
and never appear in logs, exceptions or reprs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vtpcm_common.exception import InvalidInput

_INFO = b"vtpcm host tpm key authorization v2 "
_SIZE = 32  # SHA-256 nameAlg: the largest auth value the TPM accepts


@dataclass(frozen=True, repr=False, eq=False)
class PrimarySecret:
    """The 32-byte auth value of one key (name kept from the primaries)."""

    auth: bytes

    def __repr__(self) -> str:
        return "PrimarySecret(<hidden>)"


@dataclass(frozen=True, repr=False, eq=False)
class KeyAuth:
    """The auth values of the agent's AK and KEM key."""

    ak: PrimarySecret
    kem: PrimarySecret

    def __repr__(self) -> str:
        return "KeyAuth(<hidden>)"


def _hkdf(secret: bytes, label: bytes, size: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=size, salt=None,
                info=_INFO + label).derive(secret)


def derive(host_key: bytes) -> KeyAuth:
    """Per-key auth values from the agent's host key (at least 32 bytes).

    Deterministic: the same host key gives the same values after a restart,
    so the stored key blobs stay usable.
    """
    if not isinstance(host_key, bytes) or len(host_key) < _SIZE:
        raise InvalidInput(reason=f"host key must be at least {_SIZE} bytes")

    def one(name: bytes) -> PrimarySecret:
        return PrimarySecret(auth=_hkdf(host_key, name + b" auth", _SIZE))
    return KeyAuth(ak=one(b"ak"), kem=one(b"kem"))
