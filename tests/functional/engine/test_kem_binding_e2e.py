"""The engine refuses a host whose KEM key is stale after an approved PCR
update until it is re-enrolled (issue 9 point 8, engine side): real agent
daemon with ``[host_tpm] kem_policy_pcrs``, engine daemon, RabbitMQ, swtpm
host TPM. Before the engine checked the binding, the verdict after the
update was TRUSTED and sources sealed migration keys to a KEM key the host
could no longer use."""

import hashlib

import pytest

from tests.functional.deploy import Spec, Trust, build
from vtpcm_agent.hosttpm import HostTPM

pytestmark = pytest.mark.functional

PCRS = (0, 1, 2)


def test_a_stale_kem_key_is_untrusted_until_re_enrollment():
    spec = Spec("kem", labels=("a",),
                engine={"attestation": {"auto_approve": "true",
                                        "require_kem_pcr_binding": "true"}},
                agent={"host_tpm": {"kem_policy_pcrs": "1,2"}},
                trust=Trust(pcrs=PCRS))  # TRUSTED: bound to the golden values
    with build(spec) as d:
        operator, agents, policy = d.operator, d.agents, d.policy
        host, tpm = d.hosts["a"].name, d.hosts["a"].tpm
        assert policy is not None
        quote = agents.quote(host, b"n" * 32, PCRS)
        assert (quote.kem_pcrs, quote.kem_current) == ((1, 2), True)
        old_kem = agents.get_identity(host, b"i" * 32).kem_public  # current: kept
        # an approved update moves PCR 2; the operator records the new values
        with HostTPM(tpm.tcti) as raw:
            raw.extend_pcr(2, hashlib.sha256(b"approved kernel update").digest())
        operator.record_policy(policy, host, PCRS, "after the update")
        verdict = operator.attest(host)
        assert verdict.status == "UNTRUSTED"
        assert verdict.reason == (
            "KEM key stale: the host reports its enrolled KEM key bound to PCR values it "
            "no longer has or to another [host_tpm] kem_policy_pcrs; re-enroll the host "
            "(its signed enrollment gives it a new KEM key)")
        audit = [(e.event, e.outcome, e.detail) for e in
                 operator.list_audit(limit=50, host=host).entries]
        assert ("verdict", "UNTRUSTED", verdict.reason) in audit
        assert agents.quote(host, b"m" * 32, PCRS).kem_current is False
        # the operator guide's re-enrollment: a new KEM key for the new values
        operator.revoke_host(host)
        assert operator.enroll(host).status == "APPROVED"
        assert agents.get_identity(host, b"j" * 32).kem_public != old_kem
        assert operator.attest(host).status == "TRUSTED"


def test_an_unbound_kem_key_accepted_is_audited_once_not_per_quote():
    """With ``require_kem_pcr_binding`` off (the default) a host without
    ``kem_policy_pcrs`` is TRUSTED; the engine audits that its trust rests
    on an unbound KEM key once for the trust period, not at every quote.
    On the old engine: a log warning only, no audit entry."""
    spec = Spec("kemfree", labels=("a",),
                engine={"attestation": {"auto_approve": "true"}},
                trust=Trust(pcrs=PCRS))
    with build(spec) as d:
        operator, agents = d.operator, d.agents
        host = d.hosts["a"].name
        quote = agents.quote(host, b"n" * 32, PCRS)
        assert (quote.kem_pcrs, quote.kem_current) == ((), True)
        for _ in range(3):
            assert operator.attest(host).status == "TRUSTED"
        kem = [(e.outcome, e.detail) for e in operator.list_audit(limit=200, host=host).entries
               if e.event == "kem binding"]
        assert len(kem) == 1, kem
        outcome, detail = kem[0]
        assert outcome == "unbound accepted"
        assert detail.startswith("KEM key 000b") and detail.endswith(
            "is not bound to PCRs ([host_tpm] kem_policy_pcrs empty on the host): accepted "
            "because [attestation] require_kem_pcr_binding is off")
