"""Domain XML of the lab guest, and its rewrite for a migration destination.

The guest is a TCG domain (nested KVM hangs here) booted directly from the
lab kernel/initramfs, with an external-backend TPM: libvirt only connects
QEMU to a swtpm control socket that someone else (the vTPCM agent, or a test)
runs, so libvirt never touches swtpm state. The serial console is a unix
socket QEMU listens on, per host, so the lab can talk to the guest wherever
it runs.
"""

import re
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from vtpcm_lab.exception import LabError
from vtpcm_lab.guest import GuestImage

EMULATOR = "/usr/bin/qemu-system-x86_64"
# QEMU before 9.0 loses dirty pages when it live-migrates a TCG guest that
# writes memory meanwhile (the fast path of its dirty-bitmap sync leaves the
# TCG TLB's "already dirty" entries in place; upstream 03bfc2188f, "physmem:
# Fix migration dirty bitmap coherency with TCG memory access"): the guest
# arrives with stale pages and may crash or hang (issue 11).
TCG_DIRTY_PAGES_KEPT_SINCE = (9, 0)
TPM_MODELS = ("tpm-crb", "tpm-tis")
# external: QEMU connects to a swtpm someone else runs (the vTPCM agent);
# emulator: libvirt starts swtpm itself and QEMU carries its state in the
# migration stream unencrypted (upstream Nova's hw:tpm_*), the benchmarks' baseline.
TPM_BACKENDS = ("external", "emulator")


def _check_path(what: str, path: str | Path) -> str:
    text = str(path)
    if not text.startswith("/") or len(text.encode()) > 107:
        raise LabError(reason="%s must be an absolute path of at most 107 bytes: %r"
                                 % (what, text))
    return text


def render_domain_xml(name: str, image: GuestImage, tpm_ctrl_socket: str | Path | None,
                      serial_socket: str | Path, domain_uuid: str | None = None,
                      memory_mib: int = 256, tpm_model: str = "tpm-crb",
                      tpm_backend: str = "external") -> str:
    """XML of the lab guest; ``tpm_ctrl_socket=None`` gives the TPM-less control
    guest, unless ``tpm_backend="emulator"`` (a libvirt-managed swtpm, no socket)."""
    if tpm_backend not in TPM_BACKENDS:
        raise LabError(reason="tpm backend must be one of %s" % (TPM_BACKENDS,))
    emulator_tpm = tpm_backend == "emulator"
    if emulator_tpm and tpm_ctrl_socket is not None:
        raise LabError(reason="the emulator TPM backend takes no control socket")
    with_tpm = tpm_ctrl_socket is not None or emulator_tpm
    if tpm_model not in TPM_MODELS:
        raise LabError(reason="tpm model must be one of %s" % (TPM_MODELS,))
    if not 64 <= memory_mib <= 65536:
        raise LabError(reason="guest memory must be 64-65536 MiB, got %r" % (memory_mib,))
    if not name.replace("-", "").replace("_", "").isalnum():
        raise LabError(reason="domain name %r: use letters, digits, - and _" % name)
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = domain_uuid or str(uuid.uuid4())
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "kernel").text = _check_path("kernel", image.kernel)
    ET.SubElement(os_el, "initrd").text = _check_path("initrd", image.initrd)
    # vtpcm_notpm: the guest's init then skips its wait for /dev/tpm0.
    ET.SubElement(os_el, "cmdline").text = (
        image.cmdline if with_tpm else image.cmdline + " vtpcm_notpm")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")  # the CRB/TIS TPM is found through ACPI
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = EMULATOR
    serial = ET.SubElement(devices, "serial", type="unix")
    ET.SubElement(serial, "source", mode="bind",
                  path=_check_path("serial socket", serial_socket))
    ET.SubElement(serial, "target", port="0")
    if emulator_tpm:
        tpm = ET.SubElement(devices, "tpm", model=tpm_model)
        ET.SubElement(tpm, "backend", type="emulator", version="2.0")
    elif tpm_ctrl_socket is not None:
        tpm = ET.SubElement(devices, "tpm", model=tpm_model)
        backend = ET.SubElement(tpm, "backend", type="external")
        ET.SubElement(backend, "source", type="unix", mode="connect",
                      path=_check_path("swtpm control socket", tpm_ctrl_socket))
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def render_destination_xml(migratable_xml: str, tpm_ctrl_socket: str | Path | None,
                           serial_socket: str | Path) -> str:
    """Rewrite ``dumpxml(VIR_DOMAIN_XML_MIGRATABLE)`` for the destination host.

    Name and UUID stay (libvirt requires it); only the host-local paths
    change: the destination's swtpm control socket and serial socket.
    """
    try:
        # Comes from our own libvirt daemon (dumpxml), not from a user.
        dom = ET.fromstring(migratable_xml)  # noqa: S314
    except ET.ParseError as exc:
        raise LabError(reason="migratable XML does not parse: %s" % exc) from exc
    devices = dom.find("devices")
    if devices is None:
        raise LabError(reason="migratable XML has no <devices>")
    tpm_sources = devices.findall("tpm/backend[@type='external']/source")
    if len(tpm_sources) > 1:
        raise LabError(reason="more than one external TPM backend")
    if bool(tpm_sources) != (tpm_ctrl_socket is not None):
        raise LabError(reason="destination TPM socket given for a domain without "
                                 "an external TPM, or missing for one with it")
    if tpm_sources and tpm_ctrl_socket is not None:
        tpm_sources[0].set("path", _check_path("swtpm control socket", tpm_ctrl_socket))
    serial_sources = devices.findall("serial[@type='unix']/source")
    if len(serial_sources) != 1:
        raise LabError(reason="expected one unix serial, found %d"
                                 % len(serial_sources))
    serial_sources[0].set("path", _check_path("serial socket", serial_socket))
    # The <console> mirrors serial 0 and carries the same path.
    for console_source in devices.findall("console[@type='unix']/source"):
        console_source.set("path", str(serial_socket))
    return ET.tostring(dom, encoding="unicode")


def parse_qemu_version(text: str) -> tuple[int, int, int]:
    """(major, minor, micro) of ``qemu-system-x86_64 --version`` output."""
    found = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if found is None:
        raise LabError(reason="no QEMU version in %r" % text[:200])
    return int(found.group(1)), int(found.group(2)), int(found.group(3) or 0)


def qemu_version(emulator: str = EMULATOR) -> tuple[int, int, int]:
    """The version of the lab's QEMU binary."""
    try:
        out = subprocess.run([emulator, "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise LabError(reason="%s --version failed: %s" % (emulator, exc)) from exc
    return parse_qemu_version(out)


def tcg_loses_dirty_pages(version: tuple[int, int, int]) -> bool:
    """Whether a QEMU of ``version`` may lose a writing TCG guest's dirty pages
    in a live migration (see TCG_DIRTY_PAGES_KEPT_SINCE)."""
    return version[:2] < TCG_DIRTY_PAGES_KEPT_SINCE
