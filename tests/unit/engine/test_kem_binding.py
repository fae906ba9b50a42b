"""The engine checks the host's KEM key binding (issue 9 point 8, engine
side): a KEM key bound to PCR values other than the policy's golden ones,
to PCRs the policy does not verify, usable without its policy, or reported
stale by its host makes the verdict UNTRUSTED, so no source seals a
migration key to it. (The digest itself is compared with a real TPM's
trial session in tests/functional/engine/test_kembinding_tpm.py.)"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.types import TPM2B_DIGEST, TPM2B_PUBLIC

from tests.refusal import refused
from tests.unit.engine.fakes import HOST as STACK_HOST  # RaceStack's destination
from tests.unit.engine.fakes import (
    KEM_ATTRS,
    POLICY_PCRS,
    Clock,
    FakeAgent,
    FakeTPM,
    RaceStack,
    events,
)
from vtpcm_common import exception
from vtpcm_nova.engine import attestation, kembinding
from vtpcm_nova.engine.db import api, migration
from vtpcm_nova.engine.verifier import TrustStatus

HOST = "cmp1"
BOUND_ATTRS = KEM_ATTRS & ~TPMA_OBJECT.USERWITHAUTH


def _kem_public(policy: bytes = b"", attrs: int = KEM_ATTRS) -> bytes:
    pub = TPM2B_PUBLIC.parse("ecc256:ecdh-sha256:null", objectAttributes=attrs).publicArea
    nums = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    pub.unique.ecc.x = nums.x.to_bytes(32, "big")
    pub.unique.ecc.y = nums.y.to_bytes(32, "big")
    pub.authPolicy = TPM2B_DIGEST(policy)
    return bytes(pub.marshal())


class KemAgent(FakeAgent):
    """An agent of API 1.9: its quote reports the KEM key's binding."""

    def __init__(self) -> None:
        super().__init__()
        self.kem_pcrs: tuple[int, ...] | None = None
        self.kem_current: bool | None = None

    def quote(self, host: str, nonce: bytes, pcrs: Sequence[int],
              bank: str) -> Mapping[str, Any]:
        reply = dict(super().quote(host, nonce, pcrs, bank))
        if self.kem_pcrs is not None:
            reply["kem_pcrs"] = self.kem_pcrs
        if self.kem_current is not None:
            reply["kem_current"] = self.kem_current
        return reply


@pytest.fixture
def db(tmp_path: Path) -> Iterator[api.Database]:
    migration.db_sync(f"sqlite:///{tmp_path}/engine.sqlite")
    database = api.Database(f"sqlite:///{tmp_path}/engine.sqlite")
    try:
        yield database
    finally:
        database.dispose()


def _attestor(db: api.Database, agent: FakeAgent, require: bool = False,
              ) -> attestation.Attestor:
    return attestation.Attestor(db, lambda: agent, verdict_ttl=60, nonce_ttl=30,
                                clock=Clock(), require_kem_pcr_binding=require)


def _enroll(att: attestation.Attestor, agent: FakeAgent, tpm: FakeTPM) -> None:
    """Enroll ``tpm`` as HOST with the golden policy of its PCRs now."""
    agent.tpms[HOST] = tpm
    att.enroll_from_agent(HOST)
    att.record_policy_from_host("golden", HOST, POLICY_PCRS)
    att.db.assign_policy(HOST, "golden")
    att.approve(HOST)


def _bound_tpm(pcrs: Sequence[int], values: Mapping[int, bytes] | None = None) -> FakeTPM:
    """A fake TPM whose KEM key is bound to ``pcrs`` at ``values`` (default:
    the TPM's PCR values now, as the agent binds it)."""
    tpm = FakeTPM()
    tpm.extend(16, b"good-boot")
    source = tpm.pcrs if values is None else values
    tpm.kem_public = _kem_public(kembinding.expected_policy(pcrs, source), BOUND_ATTRS)
    return tpm


# ---- the Attestor's verdicts --------------------------------------------------------

def test_a_kem_key_bound_to_the_golden_values_is_trusted(db: api.Database) -> None:
    agent = KemAgent()
    att = _attestor(db, agent, require=True)
    _enroll(att, agent, _bound_tpm([0, 7]))
    agent.kem_pcrs, agent.kem_current = (0, 7), True
    assert att.attest(HOST).status is TrustStatus.TRUSTED


def test_an_agent_before_1_9_is_checked_against_the_whole_policy(db: api.Database) -> None:
    agent = FakeAgent()  # reports nothing of its KEM key
    att = _attestor(db, agent, require=True)
    _enroll(att, agent, _bound_tpm(POLICY_PCRS))
    assert att.attest(HOST).status is TrustStatus.TRUSTED
    att.revoke(HOST)
    agent.tpms[HOST].kem_public = _kem_public(
        kembinding.expected_policy([0, 7], agent.tpms[HOST].pcrs), BOUND_ATTRS)
    att.enroll_from_agent(HOST)
    att.approve(HOST)
    verdict = att.attest(HOST)
    assert verdict.status is TrustStatus.UNTRUSTED
    assert "(the agent, older than API 1.9, does not report its selection: the policy's " \
        "whole selection was assumed)" in verdict.reason


def test_a_kem_key_bound_to_other_values_is_untrusted_and_audited(db: api.Database) -> None:
    """The key was bound before an approved update that moved PCR 7 (or by
    a host that lies): the quote matches the golden values, the KEM key
    does not. On the old engine this verdict was TRUSTED and sources
    sealed to a key the host can no longer use (or one bound to nothing
    the engine approved)."""
    agent = KemAgent()
    att = _attestor(db, agent)
    stale = {i: hashlib.sha256(b"old %d" % i).digest() for i in range(24)}
    _enroll(att, agent, _bound_tpm([0, 7], stale))
    agent.kem_pcrs = (0, 7)
    verdict = att.attest(HOST)
    assert verdict.status is TrustStatus.UNTRUSTED
    assert verdict.reason == (
        "KEM key: KEM key's authPolicy is not PolicyPCR(sha256:[0, 7]) over the golden "
        "values of policy 'golden' then PolicyAuthValue: it is bound to other PCR values "
        "(after an approved PCR update the host must be re-enrolled, which gives it a new "
        "KEM key) or to another selection")
    assert ("verdict", "UNTRUSTED") in events(att, HOST)


def test_the_verdict_follows_an_approved_update_and_the_re_enrollment(
        db: api.Database) -> None:
    agent = KemAgent()
    att = _attestor(db, agent)
    tpm = _bound_tpm([0, 7])
    _enroll(att, agent, tpm)
    agent.kem_pcrs, agent.kem_current = (0, 7), True
    assert att.attest(HOST).status is TrustStatus.TRUSTED
    # an approved firmware update: PCR 7 moves, the operator records the
    # new golden values; the agent reports its KEM key stale
    tpm.extend(7, b"new firmware")
    att.record_policy_from_host("golden", HOST, POLICY_PCRS)
    agent.kem_current = False
    verdict = att.attest(HOST)
    assert verdict.status is TrustStatus.UNTRUSTED
    assert verdict.reason.startswith("KEM key stale: the host reports")
    # the agent not reporting (or lying) changes nothing: the digest differs
    agent.kem_current = True
    assert att.attest(HOST).reason.startswith("KEM key: KEM key's authPolicy is not")
    # the re-enrollment: revoke, enroll (a new KEM key bound to the values
    # now), approve
    att.revoke(HOST)
    tpm.kem_public = _kem_public(kembinding.expected_policy([0, 7], tpm.pcrs), BOUND_ATTRS)
    att.enroll_from_agent(HOST)
    att.approve(HOST)
    assert att.attest(HOST).status is TrustStatus.TRUSTED


def test_a_binding_outside_the_policy_or_without_the_policy_is_untrusted(
        db: api.Database) -> None:
    agent = KemAgent()
    att = _attestor(db, agent)
    tpm = _bound_tpm([0, 8])  # PCR 8 is not in the policy (0, 7, 16)
    _enroll(att, agent, tpm)
    agent.kem_pcrs = (0, 8)
    assert att.attest(HOST).reason == (
        "KEM key: KEM key is bound to PCRs [0, 8] (host's [host_tpm] kem_policy_pcrs) but "
        "policy 'golden' does not verify PCR [8]: bind it to a subset of the policy's PCRs "
        "and re-enroll")
    # a policy digest but userWithAuth set: the auth value alone opens it
    att.revoke(HOST)
    tpm.kem_public = _kem_public(kembinding.expected_policy([0, 7], tpm.pcrs), KEM_ATTRS)
    att.enroll_from_agent(HOST)
    att.approve(HOST)
    agent.kem_pcrs = (0, 7)
    assert att.attest(HOST).reason == (
        "KEM key: KEM key has an authPolicy but also userWithAuth: its auth value alone "
        "bypasses the PCR binding")


def test_an_unbound_kem_key_passes_unless_binding_is_required(
        db: api.Database, caplog: pytest.LogCaptureFixture) -> None:
    agent = KemAgent()
    att = _attestor(db, agent)
    tpm = FakeTPM()
    tpm.extend(16, b"good-boot")
    _enroll(att, agent, tpm)
    agent.kem_pcrs, agent.kem_current = (), True
    assert att.attest(HOST).status is TrustStatus.TRUSTED
    assert att.attest(HOST).status is TrustStatus.TRUSTED
    warnings = [r for r in caplog.records if "not bound to PCRs" in r.getMessage()]
    assert len(warnings) == 1  # with its audit entry, not per attestation
    strict = _attestor(db, agent, require=True)
    verdict = strict.attest(HOST)
    assert verdict.status is TrustStatus.UNTRUSTED
    assert verdict.reason == (
        "KEM key: KEM key is not bound to PCRs ([host_tpm] kem_policy_pcrs is empty on the "
        "host) but [attestation] require_kem_pcr_binding is set: set kem_policy_pcrs on "
        "the host and re-enroll it")


def _kem_audits(att: attestation.Attestor) -> list[tuple[str, str]]:
    return [(e.outcome, e.detail) for e in reversed(att.db.list_audit(limit=500, host=HOST))
            if e.event == "kem binding"]


def test_an_unbound_kem_key_accepted_is_audited_once_per_trust_period_and_key(
        db: api.Database) -> None:
    """The warning alone (once per engine process) left no trace in the
    audit trail that trust rested on a key usable in any platform state. On
    the old engine: no ``kem binding`` entry at all."""
    agent = KemAgent()
    att = _attestor(db, agent)
    tpm = FakeTPM()
    tpm.extend(16, b"good-boot")
    _enroll(att, agent, tpm)
    agent.kem_pcrs, agent.kem_current = (), True
    first = att.db.get_host(HOST).kem_name.hex()
    for _ in range(4):  # periodic attestation: one entry, not one per quote
        assert att.attest(HOST).status is TrustStatus.TRUSTED
    other_worker = _attestor(db, agent)  # another engine process: still one
    assert other_worker.attest(HOST).status is TrustStatus.TRUSTED
    said = (f"KEM key {first} is not bound to PCRs ([host_tpm] kem_policy_pcrs empty on "
            "the host): accepted because [attestation] require_kem_pcr_binding is off")
    assert _kem_audits(att) == [("unbound accepted", said)]
    # a period of distrust (binding required), then trusted again: a new entry
    assert _attestor(db, agent, require=True).attest(HOST).status is TrustStatus.UNTRUSTED
    assert att.attest(HOST).status is TrustStatus.TRUSTED
    assert att.attest(HOST).status is TrustStatus.TRUSTED
    assert _kem_audits(att) == [("unbound accepted", said)] * 2
    # another (unbound) key after a re-enrollment: named in its own entry
    att.revoke(HOST)
    tpm.kem_public = _kem_public()
    att.enroll_from_agent(HOST)
    att.approve(HOST)
    second = att.db.get_host(HOST).kem_name.hex()
    assert second != first
    assert att.attest(HOST).status is TrustStatus.TRUSTED
    assert att.attest(HOST).status is TrustStatus.TRUSTED
    assert _kem_audits(att)[2:] == [("unbound accepted", said.replace(first, second))]


def test_a_bound_kem_key_or_a_distrusted_host_writes_no_unbound_entry(
        db: api.Database) -> None:
    agent = KemAgent()
    att = _attestor(db, agent)
    _enroll(att, agent, _bound_tpm([0, 7]))
    agent.kem_pcrs, agent.kem_current = (0, 7), True
    assert att.attest(HOST).status is TrustStatus.TRUSTED
    unbound = KemAgent()
    tpm = FakeTPM()
    tpm.extend(16, b"good-boot")
    strict = _attestor(db, unbound, require=True)
    att.revoke(HOST)
    unbound.tpms[HOST] = tpm
    strict.enroll_from_agent(HOST)
    strict.approve(HOST)
    assert strict.attest(HOST).status is TrustStatus.UNTRUSTED
    assert _kem_audits(att) == []


def test_a_malformed_kem_report_is_a_refused_quote(db: api.Database) -> None:
    agent = KemAgent()
    att = _attestor(db, agent)
    tpm = FakeTPM()
    tpm.extend(16, b"good-boot")
    _enroll(att, agent, tpm)
    agent.kem_current = "yes"  # type: ignore[assignment]
    verdict = att.attest(HOST)
    assert verdict.status is TrustStatus.UNTRUSTED
    assert verdict.reason.endswith("quote reply field kem_current is not a boolean")
    agent.kem_current = True
    for bad in ((24,), (True,), "0,7"):
        agent.kem_pcrs = bad  # type: ignore[assignment]
        verdict = att.attest(HOST)
        assert verdict.status is TrustStatus.UNTRUSTED
        assert verdict.reason.endswith("quote reply field kem_pcrs is not a list of PCRs")


def test_no_source_seals_to_a_kem_key_its_host_reports_stale(tmp_path: Path) -> None:
    """Real Attestor and Coordinator: after an approved update (new golden
    values recorded) the destination's agent reports its KEM key stale;
    ``begin`` attests it again and refuses before any agent is asked to
    seal. On the old engine the source sealed to the stale key."""
    stack = RaceStack(f"sqlite:///{tmp_path}/engine.sqlite")
    try:
        quote = stack.agent.quote

        def stale(host: str, nonce: bytes, pcrs: Sequence[int],
                  bank: str) -> Mapping[str, Any]:
            return {**quote(host, nonce, pcrs, bank), "kem_pcrs": (), "kem_current": False}
        stack.agent.quote = stale  # type: ignore[method-assign]
        stack.tpm.extend(7, b"approved firmware update")
        stack.att.record_policy_from_host("golden", STACK_HOST, POLICY_PCRS)
        with pytest.raises(exception.HostNotTrusted, match="is not trusted: KEM key stale"):
            stack.begin()
        assert stack.agents.calls == []
    finally:
        stack.db.dispose()


# ---- the pure check ------------------------------------------------------------------

GOLDEN = {i: hashlib.sha256(b"pcr %d" % i).digest() for i in (0, 7, 16)}


def test_the_selection_is_marshaled_as_the_agent_sends_it() -> None:
    assert kembinding.pcr_selection([0, 7, 16]) == bytes.fromhex("00000001000b03810001")
    with refused(kembinding.KemBindingError, "PCR index 24 out of range 0-23"):
        kembinding.pcr_selection([24])


def test_the_digest_depends_on_every_input() -> None:
    base = kembinding.expected_policy([0, 7], GOLDEN)
    assert len(base) == 32
    assert kembinding.expected_policy([7, 0, 7], GOLDEN) == base  # a set, in index order
    assert kembinding.expected_policy([0, 16], GOLDEN) != base
    assert kembinding.expected_policy([0, 7], {**GOLDEN, 7: b"\x00" * 32}) != base
    with refused(kembinding.KemBindingError, "no golden value for PCR 3"):
        kembinding.expected_policy([0, 3], GOLDEN)
    with refused(kembinding.KemBindingError, "golden value of PCR 0 is not a sha256 digest"):
        kembinding.expected_policy([0], {0: b"\x00" * 20})


def test_the_check_refuses_what_cannot_be_verified() -> None:
    bound = _kem_public(kembinding.expected_policy([0, 7], GOLDEN), BOUND_ATTRS)
    assert kembinding.check(bound, "sha256", GOLDEN, [0, 7], require_binding=True) == \
        kembinding.Binding(True, (0, 7))
    with refused(kembinding.KemBindingError,
                 "the host's policy is in the sha1 bank; the KEM key's PCR binding (sha256) "
                 "cannot be checked against it: use a sha256 policy"):
        kembinding.check(bound, "sha1", GOLDEN, [0, 7], require_binding=False)
    with refused(kembinding.KemBindingError,
                 "the host reports a PCR-bound KEM key with no PCRs"):
        kembinding.check(bound, "sha256", GOLDEN, [], require_binding=False)
    with refused(kembinding.KemBindingError, "KEM key's authPolicy is not a sha256 digest"):
        kembinding.check(_kem_public(b"\x01" * 20, BOUND_ATTRS), "sha256", GOLDEN, [0],
                         require_binding=False)
    with refused(kembinding.KemBindingError,
                 "KEM key has neither an authPolicy nor userWithAuth (unusable)"):
        kembinding.check(_kem_public(b"", BOUND_ATTRS), "sha256", GOLDEN, None,
                         require_binding=False)


def test_expected_policy_is_a_real_tpms_digest_known_answer() -> None:
    """Not circular: a digest a real TPM's trial session gave (swtpm 0.7.1,
    ``hostkeys.kem_policy`` over sha256:7,16 after extending each PCR once
    from zero with sha256(b"component <i>")), so the unit suite alone
    catches a wrong command code, selection layout or order (review LOW-2)."""
    values = {i: hashlib.sha256(b"\0" * 32 + hashlib.sha256(b"component %d" % i).digest())
              .digest() for i in (7, 16)}
    assert values[7].hex().startswith("cfa5f32316e89b11")  # what the TPM read back
    assert values[16].hex().startswith("992f38aaa3e65924")
    assert kembinding.expected_policy([7, 16], values).hex() == (
        "6e8caa5be74a349cc1fc276067929cd2487854730f78a2dc6f12f1e6bf46a59f")
