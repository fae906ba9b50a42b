"""The guest's TPM device on libvirt's external backend, and its rewrite for
a live-migration destination. Pure XML: no Nova, no libvirt.

libvirt (9.0+) only connects QEMU to the vTPCM's control socket; the agent
runs swtpm, so libvirt never touches TPM state and QEMU carries only blobs
swtpm encrypted under the migration key.
"""

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from vtpcm_common import exception
from vtpcm_nova import extra_specs

SOCKET_SUFFIX = ".ctrl"
MAX_SOCKET_PATH = 107  # sun_path


def checked_socket_path(path: str, instance_uuid: str,
                        socket_dirs: Sequence[str]) -> str:
    """Where QEMU must connect, as an agent reported it (an unsigned answer).
    Accepted only as exactly ``<one of socket_dirs>/<instance uuid>.ctrl``:
    a forged or confused answer can neither point a guest at another VM's
    vTPCM nor at a socket in a directory someone else controls."""
    text = str(path)
    allowed = {os.path.normpath(d) for d in socket_dirs if d}
    if (not text.startswith("/") or os.path.normpath(text) != text
            or len(text.encode()) > MAX_SOCKET_PATH
            or os.path.basename(text) != instance_uuid + SOCKET_SUFFIX
            or os.path.dirname(text) not in allowed):
        raise exception.InvalidInput(
            reason="vTPCM socket path %r is not <dir>/%s%s of at most %d bytes with <dir> "
                   "one of [vtpcm] socket_dirs %s" % (text[:200], instance_uuid,
                                                     SOCKET_SUFFIX, MAX_SOCKET_PATH,
                                                     sorted(allowed)))
    return text


def tpm_element(socket_path: str, model: str = extra_specs.DEFAULT_MODEL) -> ET.Element:
    """``<tpm model=..><backend type='external'><source type='unix' mode='connect'
    path=../></backend></tpm>``."""
    if model not in extra_specs.MODELS:
        raise exception.InvalidInput(reason="TPM model %r: use one of %s"
                                     % (model, ", ".join(extra_specs.MODELS)))
    tpm = ET.Element("tpm", model=model)
    backend = ET.SubElement(tpm, "backend", type="external")
    ET.SubElement(backend, "source", type="unix", mode="connect", path=socket_path)
    return tpm


def external_tpm_sources(domain: ET.Element) -> list[ET.Element]:
    return domain.findall("devices/tpm/backend[@type='external']/source")


def rewrite_tpm_socket(domain_xml: str, socket_path: str) -> str:
    """The migration XML with the TPM pointed at the destination's socket.

    Exactly one external TPM must be present: zero means the guest would
    arrive without its vTPCM, two is a domain this project did not make."""
    try:
        # Our own libvirt's dumpxml or Nova's rewrite of it, not user input.
        dom = ET.fromstring(domain_xml)  # noqa: S314
    except ET.ParseError as err:
        raise exception.InvalidInput(reason="domain XML does not parse: %s" % err) from None
    sources = external_tpm_sources(dom)
    if len(sources) != 1:
        raise exception.InvalidInput(
            reason="domain XML has %d external TPM backends, expected exactly one"
                   % len(sources))
    sources[0].set("path", socket_path)
    return ET.tostring(dom, encoding="unicode")
