"""The real-Nova lab, started once per test session (it takes ~45-80 s).

Fails, never skips, when a part is missing: CI runs as root on a machine
where tools/run-tests.sh installed everything these tests need.
"""

import os
from collections.abc import Iterator

import libvirt
import pytest

from vtpcm_lab.nova.cloud import NovaLab


def _quiet_libvirt(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error to stderr, even handled ones."""


libvirt.registerErrorHandler(_quiet_libvirt, None)


# module scope (the real-Nova tests are one module): the services stop after
# them instead of running, and competing for 2 cores, through the rest of the
# suite (a "package" fixture in a directory without __init__.py lives as long
# as the session)
@pytest.fixture(scope="module")
def nova_lab() -> Iterator[NovaLab]:
    if os.geteuid() != 0:
        pytest.fail("the real-Nova lab needs root (users, namespaces, sudoers)")
    lab = NovaLab()
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
