"""A revocation or a policy change is never undone by an attestation in flight.

A compromised host can hold its quote reply for as long as the RPC timeout
(it may even start the attestation itself: ``attest`` is unsigned). Each
test here holds one reply in the agent, changes the host's standing
meanwhile, lets the reply land, then asks what the scheduler (the engine's
``verdicts`` call), the migration gate (``check_fresh``) and ``begin`` see.
Real Attestor, EngineManager and Coordinator on SQLite; the PostgreSQL
variants are in tests/functional/engine/test_verdict_races_db.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.engine.fakes import HOST, INSTANCE, SOURCE, RaceStack
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as m
from vtpcm_nova.engine.verifier import TrustStatus


@pytest.fixture
def env(tmp_path: Path) -> Iterator[RaceStack]:
    stack = RaceStack(f"sqlite:///{tmp_path}/engine.sqlite")
    try:
        yield stack
    finally:
        stack.db.dispose()


def test_a_held_quote_lands_trusted_when_nothing_changed(env: RaceStack) -> None:
    """Positive control: the same flow without a change ends TRUSTED."""
    land = env.hold_attestation()
    verdict = land()
    assert verdict.status is TrustStatus.TRUSTED, verdict.reason
    assert env.scheduler_view() == {HOST: "TRUSTED"}
    assert env.att.check_fresh(HOST).trusted
    assert env.begin().state == "PREPARED"
    assert env.agents.kem == env.tpm.kem_public
    assert env.discarded() == []


def test_a_revocation_is_not_undone_by_a_held_quote(env: RaceStack) -> None:
    land = env.hold_attestation()
    env.admin("revoke_host", m.HostRef(HOST))
    verdict = land()
    assert (verdict.status, verdict.reason) == (TrustStatus.UNTRUSTED, "host revoked")
    stored = env.db.get_verdict(HOST)
    assert stored is not None and (stored.status, stored.reason) == \
        (TrustStatus.UNTRUSTED, "host revoked")
    assert env.discarded() == ["TRUSTED verdict not recorded: host is REVOKED"]
    assert env.scheduler_view() == {HOST: "UNTRUSTED"}
    gate = env.att.check_fresh(HOST)
    assert (gate.status, gate.reason) == (TrustStatus.UNTRUSTED, "host is REVOKED")
    with pytest.raises(exception.HostNotTrusted, match="is not trusted: host is REVOKED"):
        env.begin()
    assert env.agents.calls == []


def test_a_policy_change_is_not_undone_by_a_held_quote(env: RaceStack) -> None:
    land = env.hold_attestation()
    stricter = {0: env.tpm.pcrs[0], 7: env.tpm.pcrs[7], 16: b"\x16" * 32}
    env.admin("put_policy", m.PolicyInfo("golden", "sha256", stricter))
    verdict = land()
    assert (verdict.status, verdict.reason) == \
        (TrustStatus.UNKNOWN, "policy golden changed; attest again")
    assert env.discarded() == [
        "TRUSTED verdict not recorded: policy golden changed since the challenge"]
    assert HOST not in env.scheduler_view()  # expired at once
    # the gate attests again, now against the policy as it is
    with pytest.raises(exception.HostNotTrusted,
                       match="PCR 16 differs from policy 'golden'"):
        env.begin()
    assert env.agents.calls == []


def test_a_policy_reassignment_is_not_undone_by_a_held_quote(env: RaceStack) -> None:
    env.admin("put_policy", m.PolicyInfo("other", "sha256", {16: b"\x17" * 32}))
    land = env.hold_attestation()
    env.admin("assign_policy", m.AssignPolicy(HOST, "other"))
    verdict = land()
    assert (verdict.status, verdict.reason) == \
        (TrustStatus.UNKNOWN, "policy assignment changed; attest again")
    assert env.discarded() == [
        "TRUSTED verdict not recorded: policy assignment changed since the challenge"]
    assert HOST not in env.scheduler_view()
    with pytest.raises(exception.HostNotTrusted, match="PCR 16 differs from policy 'other'"):
        env.begin()


NEWER = "UNTRUSTED verdict not recorded: a newer attestation of the host was recorded"
# a held reply is judged against the clock baseline its challenge read (the
# engine reads it once, with the nonce): golden, then dropped as older
NEWER_GOLDEN = NEWER.replace("UNTRUSTED", "TRUSTED", 1)


def test_an_older_golden_quote_cannot_replace_a_newer_untrusted_verdict(env: RaceStack) -> None:
    """Quote while golden, hold it, get compromised (the next periodic
    attestation says UNTRUSTED), then let the golden reply land."""
    land = env.hold_attestation()
    env.tpm.extend(16, b"rootkit")
    newer = env.att.attest(HOST)
    assert newer.reason == "PCR 16 differs from policy 'golden'"
    verdict = land()
    assert (verdict.status, verdict.reason) == \
        (TrustStatus.UNTRUSTED, "PCR 16 differs from policy 'golden'")
    # golden against the clock baseline of its own challenge, but older than
    # the verdict on record: dropped (before, it was judged against the
    # newer quote's clock, failed, and was dropped as older all the same)
    assert env.discarded() == [NEWER_GOLDEN]
    assert env.scheduler_view() == {HOST: "UNTRUSTED"}
    assert not env.att.check_fresh(HOST).trusted


GARBAGE = {"attest": b"\x00garbage", "signature": b"\x00", "pcr_values": {}}


@pytest.mark.parametrize(("failure", "status"), [
    ("garbage", TrustStatus.UNTRUSTED), ("timeout", TrustStatus.UNKNOWN)])
def test_a_held_golden_quote_cannot_replace_a_newer_verdict_without_a_clock(
        env: RaceStack, failure: str, status: TrustStatus) -> None:
    """A failing verdict decided without a quote (garbage, no answer) does
    not move the TPM clock baseline, so the clock cannot order the held
    golden reply behind it: the challenge times do."""
    land = env.hold_attestation()
    if failure == "garbage":
        env.agent.replay = GARBAGE
    else:
        env.agent.fail = TimeoutError("no answer")
    newer = env.att.attest(HOST)
    assert newer.status is status
    verdict = land()
    assert (verdict.status, verdict.reason) == (status, newer.reason)
    assert env.discarded() == [
        "TRUSTED verdict not recorded: a newer attestation of the host was recorded"]
    assert env.scheduler_view() == {HOST: status.value}
    with pytest.raises(exception.HostNotTrusted, match="is not trusted: "):
        env.begin()  # the gate attests again, and the host still fails
    assert env.agents.calls == []


def test_an_older_honest_quote_landing_late_leaves_a_newer_trusted_verdict(
        env: RaceStack) -> None:
    """The held reply is honest but older than the TRUSTED verdict judged
    meanwhile: judged against the newer clock it would read as a replay
    (UNTRUSTED); it is dropped instead."""
    land = env.hold_attestation()
    assert env.att.attest(HOST).trusted
    verdict = land()
    assert (verdict.status, verdict.reason) == \
        (TrustStatus.TRUSTED, "quote verified; PCRs match policy 'golden'")
    assert env.discarded() == [NEWER_GOLDEN]
    assert env.scheduler_view() == {HOST: "TRUSTED"}
    assert env.begin().state == "PREPARED"


def test_an_approval_does_not_let_an_older_golden_quote_through(env: RaceStack) -> None:
    """Approving forgets the clock baseline that orders quotes: a golden
    reply held from before must not land TRUSTED after it."""
    land = env.hold_attestation()
    env.tpm.extend(16, b"rootkit")
    assert env.att.attest(HOST).reason == "PCR 16 differs from policy 'golden'"
    env.admin("approve_host", m.HostRef(HOST))
    verdict = land()
    assert (verdict.status, verdict.reason) == \
        (TrustStatus.UNKNOWN, "host approved; attest again")
    assert env.discarded() == [
        "TRUSTED verdict not recorded: host record changed since the challenge"]
    with pytest.raises(exception.HostNotTrusted,
                       match="PCR 16 differs from policy 'golden'"):
        env.begin()


def test_a_revocation_during_begin_stops_the_key_before_the_destination(env: RaceStack) -> None:
    """``begin`` saw TRUSTED; the host is revoked while the source seals:
    the envelope never reaches it and the vTPCM stays at the source."""
    env.agents.on_seal = lambda: env.admin("revoke_host", m.HostRef(HOST))
    with pytest.raises(exception.MigrationError, match="host is REVOKED"):
        env.begin()
    assert ("prepare_incoming", HOST) not in env.agents.calls
    rec = env.db.get_vtpcm(INSTANCE)
    assert (rec.host, rec.state, rec.migration_id) == (SOURCE, "ACTIVE", None)
