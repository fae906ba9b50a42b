"""The engine's KEM-binding check against a real TPM (swtpm stand-in,
tpm2-pytss): its pure-Python policy digest is the digest of a TPM trial
session, and the KEM key the agent creates passes against the PCR values
it was bound to and fails once they are not the golden ones."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.types import TPML_PCR_SELECTION

from tests.functional.hosttpm_fixture import (  # noqa: F401
    TEST_KEY_AUTH,
    HostTPMStandIn,
    host_tpm_standin,
)
from vtpcm_agent import hostkeys
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_nova.engine import kembinding, verifier

pytestmark = pytest.mark.functional


def _refused(part: str) -> Any:
    return pytest.raises(kembinding.KemBindingError, match=re.escape(part))


@pytest.mark.parametrize("pcrs", [[0], [8, 9], [0, 1, 2, 3, 4, 5, 6, 7], [7, 16, 23]])
def test_the_engines_digest_is_the_tpm_trial_sessions(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path,  # noqa: F811
        pcrs: list[int]) -> None:
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=tmp_path / "k.tpm") as agent:
        for i in pcrs:  # non-trivial values: not all zero, not all equal
            agent.extend_pcr(i, hashlib.sha256(b"component %d" % i).digest())
        values = agent.read_pcrs(pcrs)
    spec = "sha256:" + ",".join(str(i) for i in pcrs)
    with ESAPI(host_tpm_standin.tcti) as e:
        tpm_digest = hostkeys.kem_policy(e, TPML_PCR_SELECTION.parse(spec))
    assert kembinding.expected_policy(pcrs, values) == tpm_digest
    # and another value of one PCR gives another digest
    changed = {i: (b"\x01" * 32 if i == pcrs[0] else v) for i, v in values.items()}
    assert kembinding.expected_policy(pcrs, changed) != tpm_digest


def test_the_agents_bound_kem_key_checks_out_until_the_golden_values_move(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    """End to end on real bytes: the certified public area of a KEM key bound
    to PCRs 8, 9 passes against those PCRs' values as golden (policy 0-9, a
    superset), fails after the golden values change (an approved update
    without re-enrollment), and the re-enrolled key passes again."""
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=tmp_path / "k.tpm",
                 kem_pcrs=[8, 9]) as agent:
        nonce = os.urandom(32)
        ident = agent.identity(nonce)
        verifier.verify_certification(verifier.load_ak(ident.ak_public), ident.kem_public,
                                      ident.kem_certify_attest,
                                      ident.kem_certify_signature, nonce)
        golden = agent.read_pcrs(list(range(10)))
        assert kembinding.check(ident.kem_public, "sha256", golden, [8, 9],
                                require_binding=True) == kembinding.Binding(True, (8, 9))
        # an agent older than 1.9 reports no selection: the whole policy is
        # assumed and does not match a subset binding (clear refusal)
        with _refused("the agent, older than API 1.9"):
            kembinding.check(ident.kem_public, "sha256", golden, None, require_binding=True)
        # a selection the host lies about gives another digest
        with _refused("KEM key's authPolicy is not "
                     "PolicyPCR(sha256:[8]) over the golden values"):
            kembinding.check(ident.kem_public, "sha256", golden, [8], require_binding=True)
        agent.extend_pcr(9, hashlib.sha256(b"approved update").digest())
        new_golden = agent.read_pcrs(list(range(10)))
        with _refused("after an approved PCR update the host "
                     "must be re-enrolled"):
            kembinding.check(ident.kem_public, "sha256", new_golden, [8, 9],
                             require_binding=True)
        again = agent.identity(nonce, rotate_kem=True)  # the signed re-enrollment
        assert kembinding.check(again.kem_public, "sha256", new_golden, [8, 9],
                                require_binding=True).bound
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=tmp_path / "k.tpm") as plain:
        unbound = plain.identity(nonce, rotate_kem=True)
    assert kembinding.check(unbound.kem_public, "sha256", new_golden, None,
                            require_binding=False) == kembinding.Binding(False, ())
    with _refused("KEM key is not bound to PCRs"):
        kembinding.check(unbound.kem_public, "sha256", new_golden, None, require_binding=True)
