"""The message layer refuses what a careless parser would let through."""

import pytest

from vtpcm_common import exception
from vtpcm_common.api.agent import messages as m


@pytest.mark.parametrize("host", ["hostB\n", "host b", "", "-x", "a" * 254, "h/../x", 7])
def test_bad_host_names(host):
    with pytest.raises(exception.InvalidPayload) as err:
        m.Health.from_wire({"host": host, "api_version": "1", "vtpcms": 0, "running": 0,
                            "crashed": []})
    assert err.value.kwargs["field"] == "host"


@pytest.mark.parametrize("key", ["\u0663", "\u00b2", "9" * 5000, "-1", "24", " 1", "1.0"])
def test_bad_pcr_keys(key):
    with pytest.raises(exception.InvalidPayload) as err:
        m.Quote.from_wire({"host": "h", "attest": "AA==", "signature": "AA==",
                           "pcr_values": {key: "A" * 44}})
    assert err.value.kwargs["field"] == "pcr_values"


def test_good_values_still_pass():
    q = m.Quote.from_wire({"host": "host-b.example", "attest": "AA==", "signature": "AA==",
                           "pcr_values": {"16": "A" * 44, 3: "A" * 44}})
    assert sorted(q.pcr_values) == [3, 16]


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None])
def test_integers_are_integers(value):
    with pytest.raises(exception.InvalidPayload):
        m.VTPCMInfo.from_wire({"instance_uuid": "6f1e0c4e-2b5c-4f5e-9a57-1d1b1f0a0b0c",
                               "vtpcm_id": "6f1e0c4e-2b5c-4f5e-9a57-1d1b1f0a0b0c",
                               "state": "ACTIVE", "generation": value, "migration_id": None,
                               "ctrl_socket": "/x", "running": True, "pid": None})
