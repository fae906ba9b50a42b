"""Attestation fakes shared by the engine tests: a software "TPM" and its agent.

The fake TPM re-signs the real swtpm attestation structures (from
vectors/tpm_vectors.json) with a software P-256 key, so it can answer any
fresh nonce with bytes the verifier parses exactly like a real quote.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
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
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.engine import messages as m
from vtpcm_nova.engine import attestation, verifier
from vtpcm_nova.engine.coordinator import Coordinator
from vtpcm_nova.engine.db import migration
from vtpcm_nova.engine.db.api import Database, VerdictRecord
from vtpcm_nova.engine.manager import EngineManager

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

    def identity(self, nonce: bytes, host: str = "cmp1") -> dict[str, Any]:
        """The identity the agent of ``host`` reports (its name is bound)."""
        obj, _ = TPMS_ATTEST.unmarshal(CERTIFY_TEMPLATE)
        obj.extraData = authn.host_key_binding(nonce, self.command_public, host)
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
        return self.tpms[host].identity(nonce, host)

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


# ---- a whole engine for the verdict race tests -------------------------------------

HOST = "cmp1"
SOURCE = "src-host"
INSTANCE = str(uuid.uuid4())
WAIT = 10.0


class HeldAgent(FakeAgent):
    """A host that quotes at once but answers when the test lets it."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.arrived = threading.Event()
        self.release = threading.Event()

    def quote(self, host: str, nonce: bytes, pcrs: Sequence[int],
              bank: str) -> Mapping[str, Any]:
        reply = super().quote(host, nonce, pcrs, bank)
        if self.holding:
            self.holding = False
            self.arrived.set()
            if not self.release.wait(WAIT):
                raise TimeoutError("the test never released the quote")
        return reply


class MigrationAgents:
    """The agents' side of ``begin``; ``on_seal`` runs while the source seals."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.kem: bytes | None = None
        self.on_seal: Callable[[], None] = lambda: None

    def get(self, host: str, instance_uuid: str) -> am.VTPCMInfo:
        return am.VTPCMInfo(instance_uuid, str(uuid.uuid4()), "ACTIVE", 0, None,
                            "/run/x.ctrl", True, 42)

    def seal_migration_key(self, host: str, context: am.MigrationContext,
                           dest_kem_public: bytes) -> am.SealedKey:
        self.calls.append(("seal", host))
        self.kem = dest_kem_public
        self.on_seal()
        return am.SealedKey(b"envelope")

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(host: str, *args: Any, **kwargs: Any) -> None:
            self.calls.append((name, host))
        return record


class AnyOperator:
    """Accepts every admin call: operator signatures are tested elsewhere."""

    def verify(self, method: str, payload: Any, auth: Any) -> str:
        return "test-operator"


class RaceStack:
    """Real Attestor, Coordinator and EngineManager on one database, with a
    host (``HOST``, TRUSTED) whose agent can hold a quote reply, and a vTPCM
    at ``SOURCE`` to migrate to it."""

    def __init__(self, url: str) -> None:
        migration.db_sync(url)
        self.db = Database(url)
        self.agent = HeldAgent()
        self.att = attestation.Attestor(self.db, lambda: self.agent, verdict_ttl=300, nonce_ttl=60,
                            clock=time.time)
        self.agents = MigrationAgents()
        self.coord = Coordinator(self.db, self.agents, self.att)  # type: ignore[arg-type]
        self.manager = EngineManager(self.db, self.att, self.coord,
                                     admin_verifier=AnyOperator())
        self.tpm = enrolled(self.att, self.agent, HOST)
        self.db.create_vtpcm(INSTANCE, "vt-1", SOURCE)
        assert self.att.attest(HOST).trusted  # the verdict in force

    def admin(self, method: str, request: Any) -> Any:
        return getattr(self.manager, method)({}, payload=request.to_wire(), auth=None)

    def scheduler_view(self) -> dict[str, str]:
        """What VTPCMFilter gets: the engine's ``verdicts`` call."""
        reply = m.VerdictList.from_wire(self.manager.verdicts({}, payload={}))
        return {v.host: v.status for v in reply.verdicts}

    def hold_attestation(self) -> Callable[[], VerdictRecord]:
        """Start ``attest`` in a thread and return once the host holds its
        quote; the returned function lets the reply land and gives the
        verdict ``attest`` returned."""
        result: list[VerdictRecord | BaseException] = []

        def run() -> None:
            try:
                result.append(self.att.attest(HOST))
            except BaseException as err:  # noqa: BLE001 - handed to the test
                result.append(err)
        self.agent.holding = True
        thread = threading.Thread(target=run)
        thread.start()
        assert self.agent.arrived.wait(WAIT), "the quote never reached the agent"

        def land() -> VerdictRecord:
            self.agent.release.set()
            thread.join(WAIT)
            assert not thread.is_alive()
            if isinstance(result[0], BaseException):
                raise result[0]
            return result[0]
        return land

    def begin(self) -> Any:
        return self.coord.begin(str(uuid.uuid4()), INSTANCE, SOURCE, HOST)

    def discarded(self) -> list[str]:
        return [a.detail for a in self.db.list_audit(host=HOST)
                if (a.event, a.outcome) == ("verdict", "discarded")]


def clone_trusted(db: Database, source: str, names: Sequence[str]) -> None:
    """Give each of ``names`` a copy of ``source``'s host row and verdict, in
    SQL: thousands of TRUSTED hosts in the real schema without thousands of
    enrollments (for paging tests and the engine arm of the filter benchmark)."""
    from sqlalchemy import insert, select

    from vtpcm_nova.engine.db import models

    with db.session() as s:
        host = s.execute(select(models.Host.__table__).where(
            models.Host.name == source)).mappings().one()
        verdict = s.execute(select(models.VerdictRow.__table__).where(
            models.VerdictRow.host == source)).mappings().one()
        hosts = [{**{k: v for k, v in host.items() if k != "id"}, "name": n} for n in names]
        rows = [{**verdict, "host": n} for n in names]
        for start in range(0, len(hosts), 5000):
            s.execute(insert(models.Host.__table__), hosts[start:start + 5000])
            s.execute(insert(models.VerdictRow.__table__), rows[start:start + 5000])
