"""A TPM Restart of a real (swtpm) host TPM is a reboot for the engine.

TPM2_Shutdown(STATE), _TPM_Init, TPM2_Startup(CLEAR) resets every PCR while
resetCount stays: a host that ran something else can wipe its PCRs this way
and replay its golden measurements. The engine's real Attestor quotes the
stand-in through an in-process agent client (no broker needed for this).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_SU

from tests.functional.hosttpm_fixture import (  # noqa: F401
    TEST_KEY_AUTH,
    HostTPMStandIn,
    host_tpm_standin,
)
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.swtpm import ctrl
from vtpcm_common import authn
from vtpcm_lab.hosttpm import BOOT_PCRS, measured_boot
from vtpcm_nova.engine.attestation import Attestor
from vtpcm_nova.engine.db import migration
from vtpcm_nova.engine.db.api import Database
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.verifier import TrustStatus

pytestmark = pytest.mark.functional

HOST = "restart-host"


class HostTPMAgent:
    """The Attestor's agent client, answered by a host TPM in this process."""

    def __init__(self, tpm: HostTPM) -> None:
        self.tpm = tpm
        self.command_public = authn.public_raw(
            ed25519.Ed25519PrivateKey.generate().public_key())

    def get_identity(self, host: str, nonce: bytes) -> Mapping[str, Any]:
        ident = self.tpm.identity(authn.host_key_binding(nonce, self.command_public, host))
        return dict(dataclasses.asdict(ident), command_public=self.command_public)

    def quote(self, host: str, nonce: bytes, pcrs: Sequence[int],
              bank: str) -> Mapping[str, Any]:
        return dataclasses.asdict(self.tpm.quote(nonce, pcrs, bank))

    def activate_credential(self, host: str, credential_blob: bytes,
                            encrypted_secret: bytes) -> bytes:
        return self.tpm.activate_credential(credential_blob, encrypted_secret)


def tpm_restart(standin: HostTPMStandIn) -> None:
    """Orderly shutdown keeping the state, power cycle, Startup(CLEAR)."""
    esys = ESAPI(standin.tcti)
    try:
        esys.shutdown(TPM2_SU.STATE)
    finally:
        esys.close()
    with ctrl.CtrlClient(standin.ctrl_path) as client:
        client.init()
    esys = ESAPI(standin.tcti)
    try:
        esys.startup(TPM2_SU.CLEAR)
    finally:
        esys.close()


@pytest.fixture
def trusted(tmp_path: Path,
            host_tpm_standin: HostTPMStandIn,  # noqa: F811
            ) -> Iterator[tuple[Attestor, HostTPMStandIn]]:
    """An approved host, TRUSTED against the golden policy of its own boot."""
    measured_boot(host_tpm_standin.tcti)
    migration.db_sync(f"sqlite:///{tmp_path}/engine.sqlite")
    db = Database(f"sqlite:///{tmp_path}/engine.sqlite")
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH) as tpm:
        att = Attestor(db, lambda: HostTPMAgent(tpm), verdict_ttl=600, nonce_ttl=30)
        try:
            att.enroll_from_agent(HOST, auto_approve=True)
            att.record_policy_from_host("golden", HOST, BOOT_PCRS)
            db.assign_policy(HOST, "golden")
            assert att.attest(HOST).trusted
            yield att, host_tpm_standin
        finally:
            db.dispose()


def test_tpm_restart_then_golden_replay_needs_reapproval(
        trusted: tuple[Attestor, HostTPMStandIn]) -> None:
    att, standin = trusted
    before = att.db.get_clock_state(HOST)
    assert before is not None
    tpm_restart(standin)
    measured_boot(standin.tcti)  # the golden measurements, replayed
    verdict = att.attest(HOST)
    assert verdict.status is TrustStatus.UNTRUSTED
    assert verdict.reason == (
        "TPM restarted (restartCount %d -> %d): PCRs were reset without a reboot; "
        "re-approval required" % (before.restart_count, before.restart_count + 1))
    assert att.db.get_host(HOST).status is HostStatus.PENDING
    after = att.db.get_clock_state(HOST)
    assert after is not None and after.reset_count == before.reset_count
    att.approve(HOST)  # the operator vouches for this boot again
    assert att.attest(HOST).trusted


def test_without_a_restart_the_host_stays_trusted(
        trusted: tuple[Attestor, HostTPMStandIn]) -> None:
    att, _ = trusted
    verdict = att.attest(HOST)
    assert verdict.status is TrustStatus.TRUSTED, verdict.reason
    assert att.db.get_host(HOST).status is HostStatus.APPROVED
