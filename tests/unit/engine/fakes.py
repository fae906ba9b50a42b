"""Attestation fakes shared by the engine tests: a software "TPM" and its agent.

The fake TPM re-signs the real swtpm attestation structures (from
vectors/tpm_vectors.json) with a software P-256 key, so it can answer any
fresh nonce with bytes the verifier parses exactly like a real quote.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_SIGNATURE_ECC,
    TPMT_SIGNATURE,
    TPMU_SIGNATURE,
)

from vtpcm_common import authn, exception
from vtpcm_nova.engine import attestation, verifier

VECTORS = json.loads((Path(__file__).parent / "vectors" / "tpm_vectors.json").read_text())
H = bytes.fromhex
QUOTE_TEMPLATE = H(VECTORS["tpm_a"]["boot1"]["quote1"]["attest"])
CERTIFY_TEMPLATE = H(VECTORS["tpm_a"]["certify"]["attest"])
AK_ATTRS = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH)
KEM_ATTRS = (TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
POLICY_PCRS = [0, 7, 16]


def _public(key: ec.EllipticCurvePrivateKey, template: str, attrs: int) -> bytes:
    pub = TPM2B_PUBLIC.parse(template, objectAttributes=attrs).publicArea
    nums = key.public_key().public_numbers()
    pub.unique.ecc.x = nums.x.to_bytes(32, "big")
    pub.unique.ecc.y = nums.y.to_bytes(32, "big")
    return bytes(pub.marshal())


class FakeTPM:
    """Software stand-in producing TPM-format bytes for any nonce."""

    def __init__(self) -> None:
        self.ak = ec.generate_private_key(ec.SECP256R1())
        self.ak_public = _public(self.ak, "ecc256:ecdsa-sha256:null", AK_ATTRS)
        self.kem_public = _public(ec.generate_private_key(ec.SECP256R1()),
                                  "ecc256:ecdh-sha256:null", KEM_ATTRS)
        self.pcrs = {i: b"\x00" * 32 for i in range(24)}
        self.clock, self.reset_count, self.restart_count = 1000, 1, 0
        self.command_public = authn.public_raw(
            ed25519.Ed25519PrivateKey.generate().public_key())

    def extend(self, index: int, data: bytes) -> None:
        self.pcrs[index] = hashlib.sha256(self.pcrs[index] + hashlib.sha256(data).digest()
                                          ).digest()

    def reboot(self) -> None:
        self.pcrs = {i: b"\x00" * 32 for i in range(24)}
        self.clock, self.reset_count = 10, self.reset_count + 1

    def restart(self) -> None:
        """TPM Restart: Shutdown(STATE) then Startup(CLEAR), no platform reset."""
        self.pcrs = {i: b"\x00" * 32 for i in range(24)}
        self.restart_count += 1

    def _sign(self, obj: TPMS_ATTEST) -> tuple[bytes, bytes]:
        raw = bytes(obj.marshal())
        r, s = decode_dss_signature(self.ak.sign(raw, ec.ECDSA(hashes.SHA256())))
        sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA, signature=TPMU_SIGNATURE(
            ecdsa=TPMS_SIGNATURE_ECC(hash=TPM2_ALG.SHA256, signatureR=r.to_bytes(32, "big"),
                                     signatureS=s.to_bytes(32, "big"))))
        return raw, bytes(sig.marshal())

    def identity(self, nonce: bytes) -> dict[str, Any]:
        obj, _ = TPMS_ATTEST.unmarshal(CERTIFY_TEMPLATE)
        obj.extraData = authn.host_key_binding(nonce, self.command_public)
        obj.attested.certify.name = verifier.tpm_name(self.kem_public)
        attest, sig = self._sign(obj)
        return {"ak_public": self.ak_public, "kem_public": self.kem_public,
                "kem_certify_attest": attest, "kem_certify_signature": sig,
                "ek_certificate": None, "command_public": self.command_public}

    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> dict[str, Any]:
        self.clock += 100
        obj, _ = TPMS_ATTEST.unmarshal(QUOTE_TEMPLATE)
        obj.extraData = nonce
        obj.clockInfo.clock = self.clock
        obj.clockInfo.resetCount = self.reset_count
        obj.clockInfo.restartCount = self.restart_count
        idx = sorted(pcrs)
        obj.attested.quote.pcrSelect = TPML_PCR_SELECTION.parse(
            "sha256:" + ",".join(map(str, idx)))
        obj.attested.quote.pcrDigest = hashlib.sha256(
            b"".join(self.pcrs[i] for i in idx)).digest()
        attest, sig = self._sign(obj)
        return {"attest": attest, "signature": sig,
                "pcr_values": {i: self.pcrs[i] for i in idx}}


UNSET = object()


class FakeAgent:
    def __init__(self) -> None:
        self.tpms: dict[str, FakeTPM] = {}
        self.fail: Exception | None = None
        self.replay: Any = UNSET
        self.lie_pcrs: dict[int, bytes] | None = None
        self.calls = 0

    def get_identity(self, host: str, nonce: bytes) -> Mapping[str, Any]:
        return self.tpms[host].identity(nonce)

    activation: Any = None

    def activate_credential(self, host: str, credential_blob: bytes,
                            encrypted_secret: bytes) -> bytes:
        if self.activation is None:
            raise exception.HostTPMError(reason="activate credential failed: TPM_RC_INTEGRITY")
        return bytes(self.activation(host, credential_blob, encrypted_secret))

    def quote(self, host: str, nonce: bytes, pcrs: Sequence[int],
              bank: str) -> Mapping[str, Any]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if self.replay is not UNSET:
            return self.replay
        reply = self.tpms[host].quote(nonce, pcrs)
        if self.lie_pcrs is not None:
            reply["pcr_values"] = {**reply["pcr_values"], **self.lie_pcrs}
        return reply


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def enrolled(att: attestation.Attestor, agent: FakeAgent, host: str = "cmp1",
             approve: bool = True) -> FakeTPM:
    tpm = agent.tpms.setdefault(host, FakeTPM())
    tpm.extend(16, b"good-boot")
    att.enroll_from_agent(host, auto_approve=False)
    att.record_policy_from_host("golden", host, POLICY_PCRS)
    att.db.assign_policy(host, "golden")
    if approve:
        att.approve(host)
    return tpm


def events(att: attestation.Attestor, host: str) -> list[tuple[str, str]]:
    return [(a.event, a.outcome) for a in reversed(att.db.list_audit(host=host))]
