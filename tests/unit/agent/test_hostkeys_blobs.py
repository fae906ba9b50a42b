"""The agent's key blob file format and the templates others depend on
(``vtpcm_agent.hostkeys``). No TPM."""

import dataclasses
import struct

import pytest
from tpm2_pytss.constants import TPMA_OBJECT

from tests.refusal import refused
from vtpcm_agent import hostkeys, hosttpm
from vtpcm_common.exception import HostTPMError

V1 = hostkeys.KeyBlobs(ak_public=b"AKPUB", ak_private=b"AKPRIV-wrapped",
                       kem_public=b"KEMPUB", kem_private=b"KEMPRIV-wrapped")
BLOBS = dataclasses.replace(V1, ak_parent_name=b"N" * 34, kem_parent_name=b"M" * 34)


def test_round_trip_and_repr_shows_sizes_only() -> None:
    data = BLOBS.to_bytes()
    assert data.startswith(b"VTHK\x02") and BLOBS.pinned
    assert hostkeys.KeyBlobs.from_bytes(data) == BLOBS
    assert repr(BLOBS) == ("KeyBlobs(ak_public=<5 bytes>, ak_private=<14 bytes>, "
                           "kem_public=<6 bytes>, kem_private=<15 bytes>, "
                           "ak_parent_name=<34 bytes>, kem_parent_name=<34 bytes>)")


def test_a_version_1_file_still_loads_without_pinned_parents() -> None:
    """Files written before the parents were pinned (format 1) load; the
    agent pins the names and rewrites them as format 2 (HostTPM)."""
    data = V1.to_bytes()
    assert data.startswith(b"VTHK\x01")
    loaded = hostkeys.KeyBlobs.from_bytes(data)
    assert loaded == V1 and not loaded.pinned


@pytest.mark.parametrize("data,reason", [
    (b"VTHK\x03" + BLOBS.to_bytes()[5:], "host key blobs: bad magic or version"),
    (b"VTHK\x02" + V1.to_bytes()[5:], "host key blobs: truncated before ak_parent_name"),
    (b"VTHK\x01" + BLOBS.to_bytes()[5:], "host key blobs: trailing bytes"),
    (BLOBS.to_bytes()[:5], "host key blobs: truncated before ak_public"),
    (BLOBS.to_bytes()[:-1], "host key blobs: bad kem_parent_name length"),
    (BLOBS.to_bytes() + b"x", "host key blobs: trailing bytes"),
    (b"VTHK\x01" + struct.pack(">I", 0), "host key blobs: bad ak_public length"),
])
def test_malformed_files_are_refused_naming_the_flaw(data: bytes, reason: str) -> None:
    with refused(HostTPMError, "Host TPM error: " + reason):
        hostkeys.KeyBlobs.from_bytes(data)


def test_the_host_keys_storage_primary_never_changes() -> None:
    """Drift guard: every hostkey.sealed ever written was sealed under this
    owner primary; another template (noDA, say) would orphan them all."""
    assert hostkeys.PARENT_TEMPLATE == "ecc256:aes128cfb"
    assert int(hostkeys.SRK_ATTRS) == 0x00030072
    assert hostkeys.PARENT_ATTRS == hostkeys.SRK_ATTRS | TPMA_OBJECT.NODA
    # format-1 sealed objects stay DA-protected; format 2 is noDA (M3)
    assert int(hosttpm.SEALED_ATTRS) == 0x00000052
    assert hosttpm.SEALED_ATTRS_V2 == hosttpm.SEALED_ATTRS | TPMA_OBJECT.NODA
    for attrs in (hostkeys.AK_ATTRS, hostkeys.KEM_ATTRS):
        assert attrs & TPMA_OBJECT.NODA and attrs & TPMA_OBJECT.FIXEDTPM


def test_a_sealed_object_with_an_auth_value_but_no_parent_is_not_written() -> None:
    """Review eksalt round 2, finding 4: such an object was written as
    format 1, silently without its auth value (it would never unseal
    again). Refused instead; each real format still round-trips."""
    bad = hosttpm.SealedObject(public=b"PUB", private=b"PRIV", auth=b"A" * 32)
    with refused(HostTPMError, "Host TPM error: sealed object: an auth value needs a parent "
                               "name (format 3); format 1 cannot hold it"):
        bad.to_bytes()
    for obj, magic in ((dataclasses.replace(bad, auth=b""), b"VTSO\x01"),
                       (dataclasses.replace(bad, auth=b"", parent_name=b"N" * 34), b"VTSO\x02"),
                       (dataclasses.replace(bad, parent_name=b"N" * 34), b"VTSO\x03")):
        data = obj.to_bytes()
        assert data.startswith(magic)
        assert hosttpm.SealedObject.from_bytes(data) == obj
