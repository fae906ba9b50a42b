import pytest

from vtpcm_common import exception
from vtpcm_nova import extra_specs as es


def test_plain_flavor_is_not_ours() -> None:
    assert es.parse({}) == es.DISABLED
    assert es.parse({"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}) == es.DISABLED
    assert es.parse({"vtpcm:enabled": "false"}) == es.DISABLED
    assert not es.requested({"hw:cpu_policy": "dedicated"})


@pytest.mark.parametrize("value", ["true", "True", "1", "yes"])
def test_enabled_defaults_to_crb(value: str) -> None:
    assert es.parse({"vtpcm:enabled": value}) == es.VtpcmSpec(True, "tpm-crb")


def test_model_tis() -> None:
    assert es.parse({"vtpcm:enabled": "true", "vtpcm:model": "tpm-tis"}).model == "tpm-tis"


def test_bad_model_names_the_key() -> None:
    with pytest.raises(exception.InvalidInput, match="vtpcm:model='tpm-spapr'"):
        es.parse({"vtpcm:enabled": "true", "vtpcm:model": "tpm-spapr"})


def test_bad_boolean_names_the_key_and_is_still_a_request() -> None:
    with pytest.raises(exception.InvalidInput, match="vtpcm:enabled='maybe' is not a boolean"):
        es.parse({"vtpcm:enabled": "maybe"})
    assert es.requested({"vtpcm:enabled": "maybe"})


def test_upstream_vtpm_and_vtpcm_together_refused() -> None:
    with pytest.raises(exception.InvalidInput, match="hw:tpm_model, hw:tpm_version"):
        es.parse({"vtpcm:enabled": "true", "hw:tpm_version": "2.0",
                  "hw:tpm_model": "tpm-crb"})
    # the same keys without vtpcm stay upstream's business
    assert es.parse({"vtpcm:enabled": "false", "hw:tpm_version": "2.0"}) == es.DISABLED
