"""Attestor tests with fake agents on a temporary SQLite database.

The fake "TPM" (``fakes.FakeTPM``) can answer any fresh nonce; two tests
also drive the real swtpm bytes end to end.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPMT_PUBLIC

from tests.unit.engine.fakes import (
    KEM_ATTRS,
    POLICY_PCRS,
    VECTORS,
    Clock,
    FakeAgent,
    FakeTPM,
    H,
    enrolled,
    events,
)
from vtpcm_common import authn, exception
from vtpcm_nova.engine import attestation, verifier
from vtpcm_nova.engine.db import api, migration
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.verifier import TrustStatus


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[attestation.Attestor, FakeAgent, Clock]]:
    migration.db_sync(f"sqlite:///{tmp_path}/engine.sqlite")
    db = api.Database(f"sqlite:///{tmp_path}/engine.sqlite")
    agent, clock = FakeAgent(), Clock()
    att = attestation.Attestor(db, lambda: agent, verdict_ttl=60, nonce_ttl=30, clock=clock)
    try:
        yield att, agent, clock
    finally:
        db.dispose()


# ---- enrollment -------------------------------------------------------------------

def test_enroll_pending_then_approve(env: Any) -> None:
    att, agent, _ = env
    agent.tpms["cmp1"] = FakeTPM()
    rec = att.enroll_from_agent("cmp1")
    assert rec.status is HostStatus.PENDING
    assert rec.ak_name == verifier.tpm_name(agent.tpms["cmp1"].ak_public)
    assert att.approve("cmp1").status is HostStatus.APPROVED
    assert events(att, "cmp1") == [("enroll", "PENDING"), ("approve", "APPROVED")]


def test_enroll_auto_approve(env: Any) -> None:
    att, agent, _ = env
    agent.tpms["cmp1"] = FakeTPM()
    assert att.enroll_from_agent("cmp1", auto_approve=True).status is HostStatus.APPROVED


def test_enroll_nonce_single_use(env: Any) -> None:
    att, agent, _ = env
    tpm = agent.tpms["cmp1"] = FakeTPM()
    nonce = att.enrollment_nonce("cmp1")
    identity = tpm.identity(nonce)
    att.enroll("cmp1", identity, nonce)
    att.revoke("cmp1")
    with pytest.raises(exception.CertificationError, match="already used"):
        att.enroll("cmp1", identity, nonce)  # replayed enrollment
    assert att.db.get_host("cmp1").status is HostStatus.REVOKED
    assert events(att, "cmp1")[-1] == ("enroll", "refused")


def test_enroll_nonce_expires(env: Any) -> None:
    att, agent, clock = env
    tpm = agent.tpms["cmp1"] = FakeTPM()
    nonce = att.enrollment_nonce("cmp1")
    clock.t += 31
    with pytest.raises(exception.CertificationError, match="expired"):
        att.enroll("cmp1", tpm.identity(nonce), nonce)


def test_enroll_nonce_of_other_host_refused(env: Any) -> None:
    att, agent, _ = env
    tpm = agent.tpms["cmp1"] = FakeTPM()
    nonce = att.enrollment_nonce("cmp2")
    with pytest.raises(exception.CertificationError, match="nonce"):
        att.enroll("cmp1", tpm.identity(nonce), nonce)


def test_enroll_certified_by_other_ak_refused(env: Any) -> None:
    att, agent, _ = env
    tpm, other = FakeTPM(), FakeTPM()
    nonce = att.enrollment_nonce("cmp1")
    identity = dict(tpm.identity(nonce), ak_public=other.ak_public)
    with pytest.raises(exception.CertificationError, match="signature does not verify"):
        att.enroll("cmp1", identity, nonce)
    with pytest.raises(exception.NotFound):
        att.db.get_host("cmp1")
    # the failed attempt consumed the nonce
    with pytest.raises(exception.CertificationError, match="already used"):
        att.enroll("cmp1", tpm.identity(nonce), nonce)


def test_enroll_duplicate_ak_refused(env: Any) -> None:
    att, agent, _ = env
    agent.tpms["cmp1"] = FakeTPM()
    att.enroll_from_agent("cmp1")
    agent.tpms["cmp2"] = agent.tpms["cmp1"]  # same TPM claims a second name
    with pytest.raises(exception.CertificationError, match="already enrolled for host cmp1"):
        att.enroll_from_agent("cmp2")


@pytest.mark.parametrize("field", ["ak_public", "kem_certify_attest", "kem_public"])
def test_enroll_malformed_identity(env: Any, field: str) -> None:
    att, agent, _ = env
    tpm = agent.tpms["cmp1"] = FakeTPM()
    nonce = att.enrollment_nonce("cmp1")
    with pytest.raises(exception.CertificationError, match=field):
        att.enroll("cmp1", dict(tpm.identity(nonce), **{field: "not-bytes"}), nonce)


def test_enroll_wrong_claimed_name(env: Any) -> None:
    att, agent, _ = env
    tpm = agent.tpms["cmp1"] = FakeTPM()
    nonce = att.enrollment_nonce("cmp1")
    with pytest.raises(exception.CertificationError, match="AK name"):
        att.enroll("cmp1", dict(tpm.identity(nonce), ak_name=b"\x00\x0b" + b"\x01" * 32),
                   nonce)


def test_enroll_refuses_a_kem_key_sealing_would_refuse(env: Any) -> None:
    # a TPM-certified KEM key without fixedParent: the source agents refuse
    # to seal to it, so it must not enroll (else every migration to the host fails)
    att, agent, _ = env
    tpm = agent.tpms["cmp1"] = FakeTPM()
    pub, _ = TPMT_PUBLIC.unmarshal(tpm.kem_public)
    pub.objectAttributes = KEM_ATTRS & ~TPMA_OBJECT.FIXEDPARENT
    tpm.kem_public = bytes(pub.marshal())
    with pytest.raises(exception.CertificationError) as err:
        att.enroll_from_agent("cmp1")
    assert err.value.kwargs["reason"] == "KEM key lacks the attribute fixedParent"
    with pytest.raises(exception.NotFound):
        att.db.get_host("cmp1")
    assert events(att, "cmp1") == [("enroll", "refused")]
    assert "fixedParent" in att.db.list_audit(host="cmp1")[0].detail


def test_enroll_needs_a_command_key_bound_by_the_certify(env: Any) -> None:
    att, agent, _ = env
    tpm = agent.tpms["cmp1"] = FakeTPM()
    nonce = att.enrollment_nonce("cmp1")
    identity = dict(tpm.identity(nonce))
    del identity["command_public"]
    with pytest.raises(exception.CertificationError, match="no host command key"):
        att.enroll("cmp1", identity, nonce)
    nonce = att.enrollment_nonce("cmp1")
    other = authn.public_raw(ed25519.Ed25519PrivateKey.generate().public_key())
    with pytest.raises(exception.CertificationError, match="does not bind"):
        att.enroll("cmp1", dict(tpm.identity(nonce), command_public=other), nonce)
    nonce = att.enrollment_nonce("cmp1")
    with pytest.raises(exception.CertificationError, match="not a raw Ed25519"):
        att.enroll("cmp1", dict(tpm.identity(nonce), command_public=b"\x01" * 5), nonce)
    nonce = att.enrollment_nonce("cmp1")
    rec = att.enroll("cmp1", tpm.identity(nonce), nonce)
    assert rec.command_public == tpm.command_public


def test_a_command_key_enrolled_for_another_host_is_refused(env: Any) -> None:
    att, agent, _ = env
    first = agent.tpms["cmp1"] = FakeTPM()
    nonce = att.enrollment_nonce("cmp1")
    att.enroll("cmp1", first.identity(nonce), nonce, auto_approve=True)  # binds its key
    second = agent.tpms["cmp2"] = FakeTPM()
    second.command_public = first.command_public  # its TPM vouches, but the key is taken
    nonce = att.enrollment_nonce("cmp2")
    with pytest.raises(exception.CertificationError,
                       match="host command key already enrolled for host cmp1"):
        att.enroll("cmp2", second.identity(nonce, "cmp2"), nonce)


def test_a_pending_name_does_not_squat_a_command_key(env: Any) -> None:
    """A name enrolled with another host's public command key (a software
    AK passes without an EK CA) binds nothing while PENDING: the owner
    enrolls with its key, and only the first host approved keeps it."""
    att, agent, _ = env
    squatter = agent.tpms["cmp9"] = FakeTPM()
    owner = agent.tpms["cmp1"] = FakeTPM()
    squatter.command_public = owner.command_public
    assert att.enroll_from_agent("cmp9").status is HostStatus.PENDING
    assert att.db.key_owner("command", owner.command_public) is None
    assert att.enroll_from_agent("cmp1").status is HostStatus.PENDING
    assert att.approve("cmp1").status is HostStatus.APPROVED
    assert att.db.key_owner("command", owner.command_public) == "cmp1"
    with pytest.raises(exception.CertificationError,
                       match="host command key already enrolled for host cmp1"):
        att.approve("cmp9")
    assert att.db.get_host("cmp9").status is HostStatus.PENDING


def test_a_relayed_identity_cannot_squat_another_hosts_keys(env: Any) -> None:
    """A broker client answers the engine's get_identity for a new name
    with what a real host's agent answered to the same nonce (its TPM's
    certify, its command key): refused, and nothing is bound to the new
    name, so the real host still enrolls under its own."""
    att, agent, _ = env
    victim = agent.tpms["cmp1"] = FakeTPM()
    nonce = att.enrollment_nonce("squatter")
    with pytest.raises(exception.CertificationError,
                       match="does not bind this enrollment's nonce and host name"):
        att.enroll("squatter", victim.identity(nonce, "cmp1"), nonce)
    assert att.db.key_owner("command", victim.command_public) is None
    with pytest.raises(exception.NotFound):
        att.db.get_host("squatter")
    assert att.enroll_from_agent("cmp1").command_public == victim.command_public


def test_enroll_real_swtpm_vectors(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    att, _, _ = env
    a = VECTORS["tpm_a"]
    monkeypatch.setattr(api.secrets, "token_bytes", lambda n: H(a["certify"]["nonce"]))
    # The recorded certify qualifies the bare nonce: these bytes test parsing
    # and signatures of real swtpm output; the command-key binding is tested
    # above and against live swtpm in the functional tests.
    monkeypatch.setattr(attestation.authn, "host_key_binding", lambda nonce, key, host: nonce)
    nonce = att.enrollment_nonce("real-a")
    identity = {"ak_public": H(a["ak_public"]), "kem_public": H(a["kem_public"]),
                "kem_certify_attest": H(a["certify"]["attest"]),
                "kem_certify_signature": H(a["certify"]["signature"]),
                "ak_name": H(a["ak_name"]), "kem_name": H(a["kem_name"]),
                "command_public": b"\x07" * 32}
    rec = att.enroll("real-a", identity, nonce)
    assert rec.kem_name.hex() == a["kem_name"]


# ---- attestation ------------------------------------------------------------------

def test_attest_trusted_and_fresh(env: Any) -> None:
    att, agent, clock = env
    enrolled(att, agent)
    v = att.attest("cmp1")
    assert v.status is TrustStatus.TRUSTED and "golden" in v.reason
    assert (v.expires_at - v.attested_at).total_seconds() == 60
    calls = agent.calls
    assert att.check_fresh("cmp1") == v and agent.calls == calls  # cached
    clock.t += 61
    assert att.check_fresh("cmp1").trusted and agent.calls == calls + 1
    assert att.db.get_clock_state("cmp1") is not None


def test_attest_pcr_change_untrusted(env: Any) -> None:
    att, agent, _ = env
    tpm = enrolled(att, agent)
    att.attest("cmp1")
    tpm.extend(16, b"rootkit")
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED
    assert v.reason == "PCR 16 differs from policy 'golden'"
    assert events(att, "cmp1")[-1] == ("verdict", "UNTRUSTED")


def test_attest_agent_lying_about_pcrs(env: Any) -> None:
    att, agent, _ = env
    tpm = enrolled(att, agent)
    golden = dict(tpm.pcrs)
    tpm.extend(16, b"rootkit")
    agent.lie_pcrs = {16: golden[16]}
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED and "PCR digest" in v.reason


def test_attest_replayed_quote(env: Any) -> None:
    att, agent, _ = env
    tpm = enrolled(att, agent)
    old_nonce = att.db.create_nonce("cmp1", "quote", att._now())
    agent.replay = tpm.quote(old_nonce, POLICY_PCRS)
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED and "nonce mismatch" in v.reason


def test_attest_quote_from_other_tpm(env: Any) -> None:
    att, agent, _ = env
    enrolled(att, agent)
    agent.tpms["cmp1"] = FakeTPM()  # the TPM was swapped
    agent.tpms["cmp1"].extend(16, b"good-boot")
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED and "enrolled AK" in v.reason


def test_attest_slow_agent_nonce_expired(env: Any) -> None:
    att, agent, clock = env
    tpm = enrolled(att, agent)

    def slow(host: str, nonce: bytes, pcrs: Sequence[int], bank: str) -> Mapping[str, Any]:
        clock.t += 31
        return tpm.quote(nonce, pcrs)
    agent.quote = slow  # type: ignore[method-assign]
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED and "nonce expired" in v.reason


def test_attest_clock_rollback(env: Any) -> None:
    att, agent, _ = env
    tpm = enrolled(att, agent)
    assert att.attest("cmp1").trusted
    tpm.clock -= 500  # state rolled back to an older snapshot
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED and "clock went backwards" in v.reason
    # the baseline did not move back
    assert att.db.get_clock_state("cmp1").clock > tpm.clock


def test_attest_reboot_requires_reapproval(env: Any) -> None:
    att, agent, _ = env
    tpm = enrolled(att, agent)
    assert att.attest("cmp1").trusted
    tpm.reboot()
    tpm.extend(16, b"good-boot")
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED
    assert v.reason == "host rebooted (resetCount 1 -> 2); re-approval required"
    assert att.db.get_host("cmp1").status is HostStatus.PENDING
    assert "approval required" in att.attest("cmp1").reason
    att.approve("cmp1")
    assert att.attest("cmp1").trusted
    assert ("reboot", "PENDING") in events(att, "cmp1")


def test_attest_tpm_restart_requires_reapproval(env: Any) -> None:
    """A TPM Restart resets the PCRs but not resetCount: replaying the golden
    measurements afterwards must not keep the host TRUSTED."""
    att, agent, _ = env
    tpm = enrolled(att, agent)
    assert att.attest("cmp1").trusted
    tpm.extend(16, b"something else")  # runs what it likes ...
    tpm.restart()                      # ... then wipes the PCRs
    tpm.extend(16, b"good-boot")       # and replays the golden measurement
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED
    assert v.reason == ("TPM restarted (restartCount 0 -> 1): PCRs were reset without a "
                        "reboot; re-approval required")
    assert att.db.get_host("cmp1").status is HostStatus.PENDING
    assert ("reboot", "PENDING") in events(att, "cmp1")
    att.approve("cmp1")
    assert att.attest("cmp1").trusted
    assert att.db.get_clock_state("cmp1").restart_count == 1


def test_attest_tpm_restart_accepted_by_policy(env: Any) -> None:
    att, agent, _ = env
    tpm = enrolled(att, agent)
    att.reboot_policy = "accept"
    assert att.attest("cmp1").trusted
    tpm.restart()
    tpm.extend(16, b"good-boot")
    assert att.attest("cmp1").trusted
    assert att.db.get_clock_state("cmp1").restart_count == 1


def test_attest_reboot_accepted_by_policy(env: Any) -> None:
    att, agent, clock = env
    tpm = enrolled(att, agent)
    att.reboot_policy = "accept"
    assert att.attest("cmp1").trusted
    tpm.reboot()
    tpm.extend(16, b"good-boot")
    assert att.attest("cmp1").trusted
    assert att.db.get_clock_state("cmp1").reset_count == 2


@pytest.mark.parametrize("error", [TimeoutError("no reply in 30s"),
                                   ConnectionError("broker down"),
                                   exception.HostTPMError(reason="TPM busy")])
def test_attest_agent_failure_is_unknown(env: Any, error: Exception) -> None:
    att, agent, _ = env
    enrolled(att, agent)
    agent.fail = error
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNKNOWN
    assert type(error).__name__ in v.reason and "cmp1" in v.reason
    assert events(att, "cmp1")[-1] == ("verdict", "UNKNOWN")


@pytest.mark.parametrize("reply", [None, {}, {"attest": b"x", "signature": b"y"},
                                   {"attest": b"x", "signature": b"y", "pcr_values": {}},
                                   {"attest": "x", "signature": b"y", "pcr_values": {0: b""}}])
def test_attest_malformed_reply_untrusted(env: Any, reply: Any) -> None:
    att, agent, _ = env
    enrolled(att, agent)
    agent.replay = reply
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED


def test_attest_json_string_pcr_keys_accepted(env: Any) -> None:
    att, agent, _ = env
    tpm = enrolled(att, agent)
    orig = tpm.quote

    def stringly(nonce: bytes, pcrs: Sequence[int]) -> dict[str, Any]:
        r = orig(nonce, pcrs)
        r["pcr_values"] = {str(k): v for k, v in r["pcr_values"].items()}
        return r
    tpm.quote = stringly  # type: ignore[method-assign]
    assert att.attest("cmp1").trusted


def test_attest_refusals(env: Any) -> None:
    att, agent, _ = env
    enrolled(att, agent, approve=False)
    assert "PENDING" in att.attest("cmp1").reason
    agent.tpms["cmp2"] = FakeTPM()
    att.enroll_from_agent("cmp2", auto_approve=True)
    assert att.attest("cmp2").reason == "no PCR policy assigned"
    att.revoke("cmp2")
    v = att.check_fresh("cmp2")
    assert v.status is TrustStatus.UNTRUSTED and "REVOKED" in v.reason
    with pytest.raises(exception.NotFound):
        att.attest("ghost")
    assert agent.calls == 1  # only the policy recording quoted


def test_attest_all_and_audit_only_changes(env: Any) -> None:
    att, agent, _ = env
    enrolled(att, agent, "cmp1")
    enrolled(att, agent, "cmp2")
    agent.tpms["cmp3"] = FakeTPM()
    att.enroll_from_agent("cmp3")  # pending: not attested periodically
    for _ in range(3):
        verdicts = att.attest_all()
    assert sorted(verdicts) == ["cmp1", "cmp2"]
    assert all(v.trusted for v in verdicts.values())
    assert events(att, "cmp1").count(("verdict", "TRUSTED")) == 1
    assert sorted(att.db.fresh_verdicts(att._now())) == ["cmp1", "cmp2"]


def test_record_policy_refuses_bad_quote(env: Any) -> None:
    att, agent, _ = env
    agent.tpms["cmp1"] = FakeTPM()
    att.enroll_from_agent("cmp1")
    agent.lie_pcrs = {0: b"\x01" * 32}
    with pytest.raises(exception.QuoteVerificationError, match="PCR digest"):
        att.record_policy_from_host("golden", "cmp1", [0, 16])
    with pytest.raises(exception.NotFound):
        att.db.get_policy("golden")
    agent.lie_pcrs, agent.fail = None, TimeoutError("gone")
    with pytest.raises(exception.AttestationError, match="did not answer"):
        att.record_policy_from_host("golden", "cmp1", [0, 16])


def test_attest_real_swtpm_quote(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    att, _, _ = env
    a = VECTORS["tpm_a"]
    q1, q2 = a["boot1"]["quote1"], a["boot1"]["quote2"]
    att.db.enroll_host("real-a", ak_public=H(a["ak_public"]), ak_name=H(a["ak_name"]),
                       kem_public=H(a["kem_public"]), kem_name=H(a["kem_name"]),
                       approved=True)
    pcrs = {int(k): H(v) for k, v in q1["pcr_values"].items()}
    att.db.put_policy("real", "sha256", pcrs)
    att.db.assign_policy("real-a", "real")
    replies = iter([q1, q2])
    current: dict[str, Any] = {}

    def next_nonce(n: int) -> bytes:
        current.update(next(replies))
        return H(current["nonce"])

    class RealAgent:
        def quote(self, host: str, nonce: bytes, pcrs: Sequence[int],
                  bank: str) -> Mapping[str, Any]:
            assert list(pcrs) == [0, 1, 2, 3, 7, 16]
            return {"attest": H(current["attest"]), "signature": H(current["signature"]),
                    "pcr_values": {int(k): H(v) for k, v in current["pcr_values"].items()}}
    att._agents = RealAgent
    with monkeypatch.context() as m:
        m.setattr(api.secrets, "token_bytes", next_nonce)
        assert att.attest("real-a").trusted
        assert att.attest("real-a").trusted
    # the older TPM quote served again for a fresh nonce: refused
    current.update(q1)
    assert "nonce mismatch" in att.attest("real-a").reason


def test_attestor_rejects_bad_config(tmp_path: Path) -> None:
    migration.db_sync(f"sqlite:///{tmp_path}/e.sqlite")
    db = api.Database(f"sqlite:///{tmp_path}/e.sqlite")
    try:
        with pytest.raises(exception.InvalidInput):
            attestation.Attestor(db, FakeAgent, verdict_ttl=0, nonce_ttl=1)
        with pytest.raises(exception.InvalidInput):
            attestation.Attestor(db, FakeAgent, verdict_ttl=1, nonce_ttl=1,
                                 reboot_policy="never")  # type: ignore[arg-type]
    finally:
        db.dispose()


# ---- EK certificates and credential activation --------------------------------------

def _ek_setup(att: attestation.Attestor, clock: Any,
              reissued: list[bytes] | None = None) -> tuple[bytes, bytes]:
    """A CA the attestor trusts and (EK certificate, EK public) it issued;
    ``reissued`` gets a second certificate of the same EK."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = dt.datetime.fromtimestamp(clock(), dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ek_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    base = (x509.CertificateBuilder().serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)))
    ca = (base.subject_name(name("EK CA")).issuer_name(name("EK CA"))
          .public_key(ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (base.subject_name(name("ek")).issuer_name(name("EK CA"))
            .public_key(ek_key.public_key()).sign(ca_key, hashes.SHA256()))
    att.ek_cas = (ca,)
    if reissued is not None:
        again = (x509.CertificateBuilder().serial_number(x509.random_serial_number())
                 .not_valid_before(now - dt.timedelta(days=1))
                 .not_valid_after(now + dt.timedelta(days=1))
                 .subject_name(name("ek 2")).issuer_name(name("EK CA"))
                 .public_key(ek_key.public_key()).sign(ca_key, hashes.SHA256()))
        reissued.append(again.public_bytes(serialization.Encoding.DER))
    pem = ek_key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    from tpm2_pytss.types import TPMT_PUBLIC, TPMT_SYM_DEF_OBJECT, TPMU_SYM_KEY_BITS, TPMU_SYM_MODE
    ek = TPMT_PUBLIC.from_pem(pem, symmetric=TPMT_SYM_DEF_OBJECT(  # as the TCG EK template
        algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128),
        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)))
    return cert.public_bytes(serialization.Encoding.DER), bytes(ek.marshal())


def _enroll_refused(att: attestation.Attestor, tpm: FakeTPM, host: str,
                    reason: str, **extra: Any) -> None:
    nonce = att.enrollment_nonce(host)
    with pytest.raises(exception.CertificationError, match=reason):
        att.enroll(host, dict(tpm.identity(nonce, host), **extra), nonce)
    audit = [e for e in att.db.list_audit(limit=5, host=host) if e.event == "enroll"]
    assert audit and audit[0].outcome == "refused"


def test_ek_checks_refuse_and_audit_before_any_secret_is_trusted(env: Any) -> None:
    att, agent, clock = env
    cert, ek_public = _ek_setup(att, clock)
    tpm = agent.tpms["cmp1"] = FakeTPM()
    _enroll_refused(att, tpm, "cmp1", "no EK certificate")
    # parameters make_credential cannot use (nameAlg NULL): refused, not a crash
    from tpm2_pytss.types import TPMT_PUBLIC
    bent, _ = TPMT_PUBLIC.unmarshal(ek_public)
    bent.nameAlg = TPM2_ALG.NULL
    _enroll_refused(att, tpm, "cmp1", "cannot make a credential for the reported EK",
                    ek_certificate=cert, ek_public=bytes(bent.marshal()))
    # the agent's answer is checked (this fake TPM cannot really activate)
    agent.activation = lambda host, blob, secret: b"\x00" * 32
    _enroll_refused(att, tpm, "cmp1", "returned a wrong secret",
                    ek_certificate=cert, ek_public=ek_public)
    agent.activation = None
    _enroll_refused(att, tpm, "cmp1", "credential activation failed",
                    ek_certificate=cert, ek_public=ek_public)


def test_an_ek_certificate_enrolled_for_another_host_is_refused(env: Any) -> None:
    att, agent, clock = env
    cert, ek_public = _ek_setup(att, clock)
    att.db.enroll_host("cmp1", ak_public=b"ak", ak_name=b"n1", kem_public=b"k",
                       kem_name=b"kn1", ek_certificate=cert, ek_public=ek_public)
    tpm = agent.tpms["cmp2"] = FakeTPM()
    agent.activation = lambda host, blob, secret: pytest.fail("no secret may be asked for")
    _enroll_refused(att, tpm, "cmp2", "EK certificate already enrolled for host cmp1",
                    ek_certificate=cert, ek_public=ek_public)


# ---- every key is bound to the first host name it was enrolled under ---------------

def _same_tpm(tpm: FakeTPM) -> FakeTPM:
    """The same TPM (AK, KEM key) with a host command key of its own."""
    twin = copy.copy(tpm)
    twin.command_public = authn.public_raw(ed25519.Ed25519PrivateKey.generate().public_key())
    return twin


def test_a_revoked_hosts_ak_is_refused_under_another_name(env: Any) -> None:
    att, agent, _ = env
    tpm = agent.tpms["cmp1"] = FakeTPM()
    att.enroll_from_agent("cmp1")
    att.revoke("cmp1")
    agent.tpms["cmp2"] = _same_tpm(tpm)
    with pytest.raises(exception.CertificationError,
                       match="AK already enrolled for host cmp1"):
        att.enroll_from_agent("cmp2")
    assert events(att, "cmp2") == [("enroll", "refused")]
    with pytest.raises(exception.NotFound):
        att.db.get_host("cmp2")
    # the same name enrolls again with the same TPM, as before
    assert att.enroll_from_agent("cmp1").status is HostStatus.PENDING


def test_keys_replaced_at_re_enrollment_stay_bound_to_their_host(env: Any) -> None:
    """cmp1 comes back with a new TPM and command key after a revocation:
    its old AK and command key still belong to cmp1 only."""
    att, agent, _ = env
    old = agent.tpms["cmp1"] = FakeTPM()
    att.enroll_from_agent("cmp1", auto_approve=True)
    att.revoke("cmp1")
    agent.tpms["cmp1"] = FakeTPM()
    assert att.enroll_from_agent("cmp1", auto_approve=True).status is HostStatus.APPROVED
    agent.tpms["cmp2"] = _same_tpm(old)
    with pytest.raises(exception.CertificationError,
                       match="AK already enrolled for host cmp1"):
        att.enroll_from_agent("cmp2")
    agent.tpms["cmp2"] = FakeTPM()
    agent.tpms["cmp2"].command_public = old.command_public
    with pytest.raises(exception.CertificationError,
                       match="host command key already enrolled for host cmp1"):
        att.enroll_from_agent("cmp2")
    agent.tpms["cmp2"] = FakeTPM()
    assert att.enroll_from_agent("cmp2").status is HostStatus.PENDING


def test_an_ek_of_another_host_is_refused_under_any_certificate(env: Any) -> None:
    att, agent, clock = env
    reissued: list[bytes] = []
    cert, ek_public = _ek_setup(att, clock, reissued)
    att.db.enroll_host("cmp1", ak_public=b"ak", ak_name=b"n1", kem_public=b"k",
                       kem_name=b"kn1", ek_certificate=cert, ek_public=ek_public)
    att.db.revoke_host("cmp1")
    tpm = agent.tpms["cmp2"] = FakeTPM()
    agent.activation = lambda host, blob, secret: pytest.fail("no secret may be asked for")
    _enroll_refused(att, tpm, "cmp2", "EK certificate already enrolled for host cmp1",
                    ek_certificate=cert, ek_public=ek_public)
    _enroll_refused(att, tpm, "cmp2", "EK already enrolled for host cmp1",
                    ek_certificate=reissued[0], ek_public=ek_public)
    # an EK only claimed (enrolled without ek_ca_file) binds nothing: it is
    # public data, anyone could squat it
    att.db.enroll_host("cmp3", ak_public=b"ak", ak_name=b"n3", kem_public=b"k",
                       kem_name=b"kn3", ek_certificate=b"claimed")
    assert att.db.key_owner("ek-cert", b"claimed") is None


# ---- the round trip's transactions (issue 11 point 3) ------------------------------
def _commits(att: attestation.Attestor) -> list[int]:
    """A list that counts the database transactions committed from now on."""
    from sqlalchemy import event
    seen: list[int] = []
    event.listen(att.db.engine, "commit", lambda _conn: seen.append(1))
    return seen


def _transactions(att: attestation.Attestor) -> list[int]:
    """A list that counts the database transactions begun from now on
    (committed or, for a read in Core, rolled back)."""
    from sqlalchemy import event
    seen: list[int] = []
    event.listen(att.db.engine, "begin", lambda _conn: seen.append(1))
    return seen


def test_attest_is_two_transactions_and_one_write(env: Any) -> None:
    """One read for the challenge, one write for the verdict (nonce on
    record as used, verdict, clock, audit): each write is an fsync on the
    way, each transaction a round of its own."""
    from vtpcm_nova.engine.db import models
    att, agent, _ = env
    enrolled(att, agent)
    quote = agent.quote

    def nothing_written_yet(host: str, nonce: bytes, pcrs: Sequence[int],
                            bank: str) -> Mapping[str, Any]:
        with att.db.session() as s:  # the challenge wrote nothing
            assert s.query(models.Nonce).filter_by(nonce=nonce.hex()).count() == 0
        return quote(host, nonce, pcrs, bank)
    for _ in range(2):  # a first verdict (audited) and an unchanged one
        commits, begun = _commits(att), _transactions(att)
        agent.quote = quote  # type: ignore[method-assign]
        assert att.attest("cmp1").trusted
        assert (len(begun), len(commits)) == (2, 1)
        agent.quote = nothing_written_yet  # type: ignore[method-assign]
        assert att.attest("cmp1").trusted
    agent.quote = quote  # type: ignore[method-assign]
    agent.tpms["cmp1"].extend(16, b"rootkit")
    commits, begun = _commits(att), _transactions(att)
    assert att.attest("cmp1").status is TrustStatus.UNTRUSTED
    assert (len(begun), len(commits)) == (2, 1)


def test_a_verdict_stands_only_with_its_audit_entry_and_its_nonce_used(env: Any) -> None:
    """A failure while the audit entry is written (here: the database
    refuses it) leaves no verdict of that attestation and its nonce unused,
    never a verdict the audit does not show."""
    from sqlalchemy import event

    from vtpcm_nova.engine.db import models
    att, agent, _ = env
    enrolled(att, agent)

    def refuse_audit(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO AUDIT"):
            raise RuntimeError("disk full")
    event.listen(att.db.engine, "before_cursor_execute", refuse_audit)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            att.attest("cmp1")
    finally:
        event.remove(att.db.engine, "before_cursor_execute", refuse_audit)
    assert att.db.get_verdict("cmp1") is None
    assert att.db.get_clock_state("cmp1") is None
    with att.db.session() as s:  # the nonce is not on record as used either
        assert [n.used for n in s.query(models.Nonce).filter_by(
            host="cmp1", purpose="quote")] in ([], [False])


def test_the_quote_nonce_is_on_record_as_used_with_the_verdict(env: Any) -> None:
    """A guard, not a regression test: it passes on the eight-transaction
    attestation too (which wrote the nonce before the quote and marked it
    used after). It keeps the two-transaction one recording the very nonce
    it sent, used, once."""
    att, agent, _ = env
    enrolled(att, agent)
    from vtpcm_nova.engine.db import models
    sent: list[bytes] = []
    quote = agent.quote

    def keep(host: str, nonce: bytes, pcrs: Sequence[int], bank: str) -> Mapping[str, Any]:
        sent.append(nonce)
        return quote(host, nonce, pcrs, bank)
    agent.quote = keep  # type: ignore[method-assign]
    assert att.attest("cmp1").trusted
    with att.db.session() as s:
        nonces = s.query(models.Nonce).filter_by(host="cmp1", purpose="quote").all()
        assert [(n.nonce, n.used) for n in nonces] == [(sent[0].hex(), True)]


def test_a_quote_nonce_on_record_already_is_refused(env: Any, monkeypatch: Any) -> None:
    """Single use, enforced by the database too: a nonce value on record
    (here forced by a repeating random source) cannot back a verdict."""
    att, agent, _ = env
    enrolled(att, agent)
    monkeypatch.setattr(attestation.secrets, "token_bytes", lambda n: b"\x07" * n)
    assert att.attest("cmp1").trusted
    v = att.attest("cmp1")
    assert v.status is TrustStatus.UNTRUSTED and "nonce expired or already used" in v.reason
