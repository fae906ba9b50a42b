"""The lab guest's XML with upstream's TPM (libvirt-managed swtpm), the
baseline arm of benchmarks/lab_lm.py, next to the vTPCM's external backend."""

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vtpcm_lab import domain
from vtpcm_lab.exception import LabError
from vtpcm_lab.guest import CMDLINE, GuestImage

IMAGE = GuestImage(kernel=Path("/lab/guest/vmlinuz"), initrd=Path("/lab/guest/initrd.gz"),
                   cmdline=CMDLINE)


def _xml(**kw: object) -> ET.Element:
    args: dict = {"name": "g", "image": IMAGE, "tpm_ctrl_socket": None,
                  "serial_socket": "/lab/a/serial/g.sock"}
    args.update(kw)
    return ET.fromstring(domain.render_domain_xml(**args))


def test_emulator_backend_is_libvirts_own_swtpm_and_the_guest_waits_for_its_tpm() -> None:
    dom = _xml(tpm_backend="emulator", memory_mib=1024)
    backends = dom.findall("devices/tpm/backend")
    assert [(b.get("type"), b.get("version")) for b in backends] == [("emulator", "2.0")]
    assert backends[0].find("source") is None  # libvirt picks the socket itself
    # with a TPM the guest waits for /dev/tpm0 (vtpcm_notpm only without one)
    assert "vtpcm_notpm" not in (dom.findtext("os/cmdline") or "")
    assert dom.findtext("memory") == "1024"


def test_external_backend_and_no_tpm_are_unchanged() -> None:
    ext = _xml(tpm_ctrl_socket="/lab/a/tpm/i.ctrl")
    assert [b.get("type") for b in ext.findall("devices/tpm/backend")] == ["external"]
    assert ext.find("devices/tpm/backend/source").get("path") == "/lab/a/tpm/i.ctrl"
    plain = _xml()
    assert plain.find("devices/tpm") is None
    assert "vtpcm_notpm" in (plain.findtext("os/cmdline") or "")


def test_emulator_destination_xml_needs_no_socket() -> None:
    src = domain.render_domain_xml("g", IMAGE, None, "/lab/a/serial/g.sock",
                                   tpm_backend="emulator")
    dest = ET.fromstring(domain.render_destination_xml(src, None, "/lab/b/serial/g.sock"))
    assert [b.get("type") for b in dest.findall("devices/tpm/backend")] == ["emulator"]
    assert dest.find("devices/serial/source").get("path") == "/lab/b/serial/g.sock"


@pytest.mark.parametrize(("kw", "reason"), [
    ({"tpm_backend": "emulator", "tpm_ctrl_socket": "/lab/a/tpm/i.ctrl"},
     "the emulator TPM backend takes no control socket"),
    ({"tpm_backend": "passthrough"}, "tpm backend must be one of ('external', 'emulator')"),
    ({"memory_mib": 32}, "guest memory must be 64-65536 MiB, got 32"),
])
def test_bad_tpm_settings_are_refused_by_name(kw: dict, reason: str) -> None:
    with pytest.raises(LabError) as err:
        _xml(**kw)
    assert reason in str(err.value)
