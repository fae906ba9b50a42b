"""The cached AK/KEM contexts and sessions (``vtpcm_agent.keycache``)
against a swtpm stand-in: reused (no parent, load or salted session per
call), holding no TPM slot between calls, the PCR policy re-checked on
every ZGen, rebuilt after a TPM reset, flushed at close."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

from tests.functional.hosttpm_fixture import (  # noqa: F401
    TEST_KEY_AUTH,
    HostTPMStandIn,
    host_tpm_standin,
)
from tests.functional.tpmwire import (
    TPM_CC_CREATE_PRIMARY,
    TPM_CC_LOAD,
    TPM_CC_START_AUTH_SESSION,
    TPMWireTap,
    wiretap,
)
from vtpcm_agent import hostkeys, keycache
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_common import tpmpublic
from vtpcm_common.exception import HostTPMError
from vtpcm_nova.engine import verifier

TPM_RH_NULL = 0x40000007


def _expensive(tap: TPMWireTap) -> int:
    """CreatePrimary, Load and *salted* StartAuthSession commands (identity's
    trial session for the KEM policy check is unsalted and cheap)."""
    n = 0
    for code, cmd in tap.commands():
        if code in (TPM_CC_CREATE_PRIMARY, TPM_CC_LOAD):
            n += 1
        elif code == TPM_CC_START_AUTH_SESSION:
            n += struct.unpack_from(">I", cmd, 10)[0] != TPM_RH_NULL
    return n


def _handles(tcti: str, kind: TPM2_HT) -> list[int]:
    with ESAPI(tcti) as e:
        _more, data = e.get_capability(TPM2_CAP.HANDLES, int(kind) << 24, 64)
        return [int(h) for h in data.data.handles]


def _peer(kem_public: bytes) -> tuple[tuple[bytes, bytes], bytes]:
    eph = ec.generate_private_key(ec.SECP256R1())
    n = eph.public_key().public_numbers()
    return ((n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big")),
            eph.exchange(ec.ECDH(), tpmpublic.kem_public_key(kem_public).key))


def _uncached(self: keycache.KeyCache, e: ESAPI, hierarchy: Any, public: bytes,
              private: bytes, auth: bytes, what: str, pinned: bytes,
              policy: Any = None) -> Any:
    """Planted: the path before the cache (parent, load, salted session per call)."""
    return hostkeys.loaded(e, hierarchy, public, private, auth, what, policy, pinned)


@pytest.mark.parametrize("planted", [False, True], ids=["real", "planted-uncached"])
def test_later_calls_reuse_the_contexts_and_hold_no_slot(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, planted: bool) -> None:
    """Planted control: the uncached path, which the wire count catches."""
    if planted:
        monkeypatch.setattr(keycache.KeyCache, "use", _uncached)
    with wiretap(host_tpm_standin.tcti) as tap, HostTPM(
            tap.tcti, TEST_KEY_AUTH, key_file=tmp_path / "hostkeys.tpm",
            kem_pcrs=[8, 9]) as agent:
        ident = agent.identity(b"")
        ak = verifier.load_ak(ident.ak_public)
        (x, y), z = _peer(ident.kem_public)
        agent.quote(b"warm", [0])
        assert agent.ecdh_zgen(x, y) == z
        before = _expensive(tap)
        for _ in range(5):
            nonce = os.urandom(16)
            q = agent.quote(nonce, [0, 1])
            verifier.verify_quote(ak, q.attest, q.signature, nonce, q.pcr_values)
            assert agent.ecdh_zgen(x, y) == z
        again = agent.identity(b"n")
        verifier.verify_certification(ak, again.kem_public, again.kem_certify_attest,
                                      again.kem_certify_signature, b"n")
        after = _expensive(tap)
        if planted:
            assert after > before
            return
        assert after == before, "a cached call re-created a parent, loaded or salted again"
        # between calls nothing is loaded: the slots stay free for others
        assert _handles(host_tpm_standin.tcti, TPM2_HT.TRANSIENT) == []
        assert _handles(host_tpm_standin.tcti, TPM2_HT.LOADED_SESSION) == []
        assert len(_handles(host_tpm_standin.tcti, TPM2_HT.SAVED_SESSION)) == 3
        # the PCR policy is still checked at every ZGen
        agent.extend_pcr(9, hashlib.sha256(b"changed").digest())
        with pytest.raises(HostTPMError, match="TPM_RC_POLICY_FAIL"):
            agent.ecdh_zgen(x, y)
    # close flushed the saved sessions
    assert _handles(host_tpm_standin.tcti, TPM2_HT.SAVED_SESSION) == []


def test_a_tpm_reset_rebuilds_the_cache(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH,
                 key_file=tmp_path / "hostkeys.tpm") as agent:
        ident = agent.identity(b"")
        ak = verifier.load_ak(ident.ak_public)
        (x, y), z = _peer(ident.kem_public)
        assert agent.ecdh_zgen(x, y) == z
        agent.quote(b"n", [0])
        host_tpm_standin.stop()                    # TPM Reset: saved contexts die
        host_tpm_standin.start()
        q = agent.quote(b"after", [0])
        verifier.verify_quote(ak, q.attest, q.signature, b"after", q.pcr_values)
        assert agent.ecdh_zgen(x, y) == z
