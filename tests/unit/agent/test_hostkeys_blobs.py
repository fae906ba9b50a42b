"""The agent's key blob file format and the templates others depend on
(``vtpcm_agent.hostkeys``). No TPM."""

import struct

import pytest
from tpm2_pytss.constants import TPMA_OBJECT

from tests.refusal import refused
from vtpcm_agent import hostkeys
from vtpcm_common.exception import HostTPMError

BLOBS = hostkeys.KeyBlobs(ak_public=b"AKPUB", ak_private=b"AKPRIV-wrapped",
                          kem_public=b"KEMPUB", kem_private=b"KEMPRIV-wrapped")


def test_round_trip_and_repr_shows_sizes_only() -> None:
    data = BLOBS.to_bytes()
    assert hostkeys.KeyBlobs.from_bytes(data) == BLOBS
    assert repr(BLOBS) == ("KeyBlobs(ak_public=<5 bytes>, ak_private=<14 bytes>, "
                           "kem_public=<6 bytes>, kem_private=<15 bytes>)")


@pytest.mark.parametrize("data,reason", [
    (b"VTHK\x02" + BLOBS.to_bytes()[5:], "host key blobs: bad magic or version"),
    (BLOBS.to_bytes()[:5], "host key blobs: truncated before ak_public"),
    (BLOBS.to_bytes()[:-1], "host key blobs: bad kem_private length"),
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
    for attrs in (hostkeys.AK_ATTRS, hostkeys.KEM_ATTRS):
        assert attrs & TPMA_OBJECT.NODA and attrs & TPMA_OBJECT.FIXEDTPM
