"""pytest fixtures around the host-TPM stand-in (the class lives in vtpcm_lab)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpcm_agent import keyauth
from vtpcm_lab.hosttpm import HostTPMStandIn

__all__ = ["HostTPMStandIn", "host_tpm_standin", "second_host_tpm_standin"]


@pytest.fixture
def host_tpm_standin(tmp_path: Path) -> Iterator[HostTPMStandIn]:
    """A started host TPM stand-in, stopped by pid even if the test fails."""
    standin = HostTPMStandIn(tmp_path, "host")
    try:
        standin.start()
        yield standin
    finally:
        standin.cleanup()


@pytest.fixture
def second_host_tpm_standin(tmp_path: Path) -> Iterator[HostTPMStandIn]:
    """Another, independent stand-in (a different TPM with different seeds)."""
    standin = HostTPMStandIn(tmp_path, "other")
    try:
        standin.start()
        yield standin
    finally:
        standin.cleanup()


# The AK/KEM secrets of a test "agent" (a HostTPM without them refuses
# identity, quote, activate_credential and ecdh_zgen).
TEST_KEY_AUTH = keyauth.derive(b"vtpcm functional tests: host key.")
