"""Secret inputs that make the host TPM's AK and KEM key the agent's own.

Why: the AK and the KEM key are primaries, re-derived from the hierarchy
seed and their template on every use. With a public template and an empty
auth value, any local process that can open the TPM (resource manager)
re-derives the same keys and can quote with the AK or run ECDH_ZGen with the
KEM key, opening the migration envelopes read off the broker. Two values
derived from the agent's host key (sealed in the TPM, root-only file) close
that:

* ``unique``: the template's ``unique`` field is an input of the primary's
  derivation, so without it the same seed yields a different key;
* ``auth``: the key's auth value, so a handle the agent has loaded is of no
  use to another client of a TPM without a resource manager (the swtpm
  stand-in) in the moment it is loaded.

Limits (review finding 3, design.rst open points): ``unique`` is sent to
the TPM in clear in every CreatePrimary and the auth value is no
derivation input, so whoever observes the agent's TPM command stream once
re-creates both keys with an auth value of their own. This keeps out only
local TPM users that cannot see that stream.

The values never appear in logs, exceptions or reprs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vtpcm_common.exception import InvalidInput

_INFO = b"vtpcm host tpm key authorization v1 "
_SIZE = 32  # SHA-256 nameAlg: the largest auth value the TPM accepts


@dataclass(frozen=True, repr=False, eq=False)
class PrimarySecret:
    """``unique`` (64 bytes: x || y of the ECC template) and ``auth`` (32)."""

    unique: bytes
    auth: bytes

    def __repr__(self) -> str:
        return "PrimarySecret(<hidden>)"


@dataclass(frozen=True, repr=False, eq=False)
class KeyAuth:
    """The secrets of the two agent primaries."""

    ak: PrimarySecret
    kem: PrimarySecret

    def __repr__(self) -> str:
        return "KeyAuth(<hidden>)"


def _hkdf(secret: bytes, label: bytes, size: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=size, salt=None,
                info=_INFO + label).derive(secret)


def derive(host_key: bytes) -> KeyAuth:
    """Per-key secrets from the agent's host key (at least 32 bytes).

    Deterministic: the same host key gives the same AK and KEM key after a
    restart, so the enrollment stays valid; a new host key (or a new TPM)
    gives new keys and the host must be enrolled again.
    """
    if not isinstance(host_key, bytes) or len(host_key) < _SIZE:
        raise InvalidInput(reason=f"host key must be at least {_SIZE} bytes")

    def one(name: bytes) -> PrimarySecret:
        return PrimarySecret(unique=_hkdf(host_key, name + b" unique", 2 * _SIZE),
                             auth=_hkdf(host_key, name + b" auth", _SIZE))
    return KeyAuth(ak=one(b"ak"), kem=one(b"kem"))
