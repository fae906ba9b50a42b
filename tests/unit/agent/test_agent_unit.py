"""The agent's systemd unit keeps its hardening (issue 9 point 5).

A drift guard: the agent stays root only to start each swtpm as its VM's
uid, hand it its files and signal it; a unit edit that widens that, or that
makes the state dir untraversable for swtpm uids, fails here."""

import configparser
from pathlib import Path

UNIT = Path(__file__).resolve().parents[3] / "etc" / "vtpcm" / "vtpcm-agent.service"
NEEDED = {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE",
          "CAP_KILL"}


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_the_agent_keeps_only_the_capabilities_it_uses():
    assert set(_service()["CapabilityBoundingSet"].split()) == NEEDED


def test_the_agent_unit_is_hardened():
    service = _service()
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes",
                       "RestrictSUIDSGID": "yes", "DevicePolicy": "closed",
                       "KillMode": "process"}.items():
        assert service[key] == value, key
    assert service["DeviceAllow"] == "/dev/tpmrm0 rw"
    assert set(service["ReadWritePaths"].split()) == {"/var/lib/vtpcm", "/run/vtpcm"}


def test_swtpm_uids_can_traverse_the_state_dir():
    assert _service()["StateDirectoryMode"] == "0711"
