"""The key store with its host key sealed in a real swtpm host TPM stand-in."""

import stat
from pathlib import Path

import pytest

from tests.functional.hosttpm_fixture import (  # noqa: F401
    HostTPMStandIn,
    host_tpm_standin,
    second_host_tpm_standin,
)
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.keystore import InstanceKeys, KeyStore, TPMSealedHostKey
from vtpcm_common.exception import KeyStoreError

pytestmark = pytest.mark.functional

VID = "9b2f6c1a-5d4e-4f3a-8b7c-6d5e4f3a2b1c"


def test_sealed_host_key_survives_reconstruction(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "hostkey.sealed"
    keys = InstanceKeys.generate()
    with HostTPM(host_tpm_standin.tcti) as tpm:
        provider = TPMSealedHostKey(tpm, path)
        first = provider.host_key()
        KeyStore(tmp_path / "keys", provider).put(VID, keys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first not in path.read_bytes()
    assert first.hex() not in repr(provider)

    host_tpm_standin.stop()
    host_tpm_standin.start()  # host reboot: a new TPM connection, same seeds
    with HostTPM(host_tpm_standin.tcti) as tpm:
        provider = TPMSealedHostKey(tpm, path)
        assert provider.host_key() == first
        assert KeyStore(tmp_path / "keys", provider).get(VID) == keys


def test_other_tpm_cannot_unseal(host_tpm_standin: HostTPMStandIn,  # noqa: F811
                                 second_host_tpm_standin: HostTPMStandIn,  # noqa: F811
                                 tmp_path: Path) -> None:
    path = tmp_path / "hostkey.sealed"
    with HostTPM(host_tpm_standin.tcti) as tpm:
        TPMSealedHostKey(tpm, path).host_key()
    blob = path.read_bytes()
    with HostTPM(second_host_tpm_standin.tcti) as other:
        with pytest.raises(KeyStoreError, match="not unsealed: the owner storage primary .* "
                           "or this is another TPM"):
            TPMSealedHostKey(other, path).host_key()
    assert path.read_bytes() == blob  # never replaced by a fresh key


def test_damaged_sealed_file(host_tpm_standin: HostTPMStandIn,  # noqa: F811
                             tmp_path: Path) -> None:
    path = tmp_path / "hostkey.sealed"
    with HostTPM(host_tpm_standin.tcti) as tpm:
        TPMSealedHostKey(tpm, path).host_key()
        good = path.read_bytes()
        for bad in (good[:-1], good[:-1] + bytes([good[-1] ^ 1]), b"junk"):
            path.write_bytes(bad)
            with pytest.raises(KeyStoreError):
                TPMSealedHostKey(tpm, path).host_key()
