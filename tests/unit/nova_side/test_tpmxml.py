import uuid
import xml.etree.ElementTree as ET

import pytest

from vtpcm_common import exception
from vtpcm_nova.virt import tpmxml

INSTANCE = str(uuid.UUID(int=7))


def _domain(*tpm_paths: str) -> str:
    tpms = "".join(
        "<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' "
        "path='%s'/></backend></tpm>" % p for p in tpm_paths)
    return ("<domain type='qemu'><name>g</name><devices><serial type='unix'><source "
            "mode='bind' path='/x/serial'/></serial>%s</devices></domain>" % tpms)


def test_element_is_libvirt_external_backend() -> None:
    el = tpmxml.tpm_element("/run/vtpcm/%s.ctrl" % INSTANCE, "tpm-tis")
    assert ET.tostring(el, encoding="unicode") == (
        '<tpm model="tpm-tis"><backend type="external"><source type="unix" mode="connect" '
        'path="/run/vtpcm/%s.ctrl" /></backend></tpm>' % INSTANCE)


def test_rewrite_changes_only_the_tpm_socket() -> None:
    src = "/a/run/%s.ctrl" % INSTANCE
    dst = "/b/run/%s.ctrl" % INSTANCE
    out = ET.fromstring(tpmxml.rewrite_tpm_socket(_domain(src), dst))
    assert [s.get("path") for s in tpmxml.external_tpm_sources(out)] == [dst]
    assert out.find("devices/serial/source").get("path") == "/x/serial"  # type: ignore


@pytest.mark.parametrize("paths", [(), ("/a/1.ctrl", "/a/2.ctrl")])
def test_rewrite_needs_exactly_one_external_tpm(paths: tuple[str, ...]) -> None:
    with pytest.raises(exception.InvalidInput,
                       match="%d external TPM backends, expected exactly one" % len(paths)):
        tpmxml.rewrite_tpm_socket(_domain(*paths), "/b/%s.ctrl" % INSTANCE)


def test_rewrite_refuses_garbage() -> None:
    with pytest.raises(exception.InvalidInput, match="does not parse"):
        tpmxml.rewrite_tpm_socket("<domain", "/b/x.ctrl")


@pytest.mark.parametrize("path", [
    "relative/%s.ctrl" % INSTANCE,
    "/run/vtpcm/%s.ctrl" % str(uuid.UUID(int=8)),   # another VM's socket
    "/run/vtpcm/../vtpcm/%s.ctrl" % INSTANCE,
    "/run/vtpcm/%s" % INSTANCE,
    "/" + "x" * 100 + "/%s.ctrl" % INSTANCE,
])
def test_socket_path_must_be_this_instances(path: str) -> None:
    with pytest.raises(exception.InvalidInput, match="is not <dir>/"):
        tpmxml.checked_socket_path(path, INSTANCE, ["/run/vtpcm", "/" + "x" * 100])


def test_socket_path_accepted() -> None:
    path = "/run/vtpcm/%s.ctrl" % INSTANCE
    assert tpmxml.checked_socket_path(path, INSTANCE, ["/run/vtpcm/"]) == path
    with pytest.raises(exception.InvalidInput, match="socket_dirs"):
        tpmxml.checked_socket_path(path, INSTANCE, ["/elsewhere"])
