"""The vtpcm-engine daemon over RabbitMQ attesting real host TPMs (swtpm
stand-ins): one honest agent daemon, and one in-process agent whose answers
the test can make dishonest (replayed, foreign-signed, tampered). The same
module runs against SQLite and the local PostgreSQL."""

import dataclasses
import hashlib
import shutil
import uuid

import pytest
import sqlalchemy
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.functional.harness import (
    AgentDaemon,
    EngineDaemon,
    client_conf,
    random_command_public,
    serve_agent_in_process,
    short_dir,
    wait_for,
)
from tests.functional.hosttpm_fixture import TEST_KEY_AUTH, HostTPMStandIn
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.manager import AgentManager, endpoint
from vtpcm_common import authn, exception
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.agent import rpcapi as agent_rpcapi
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab.hosttpm import measured_boot
from vtpcm_nova.scheduler.verdicts import fetch_trusted

pytestmark = pytest.mark.functional
POLICY_PCRS = (0, 1, 2, 3, 4, 5, 6, 7)


boot = measured_boot


class DishonestAgent(AgentManager):
    """A real agent's identity and quotes, bent on request by the test."""

    mode = "honest"
    recorded: am.Quote | None = None
    foreign: HostTPM | None = None

    @endpoint(am.QuoteRequest)
    def quote(self, req: am.QuoteRequest) -> am.Quote:
        tpm = self.foreign if self.mode == "foreign" else self.host_tpm
        result = tpm.quote(req.nonce, req.pcrs, req.bank)
        honest = am.Quote(host=self.host, attest=result.attest, signature=result.signature,
                          pcr_values=dict(result.pcr_values))
        if self.mode == "replay" and self.recorded is not None:
            return self.recorded
        self.recorded = honest
        if self.mode == "tamper":
            attest = bytearray(honest.attest)
            attest[-5] ^= 0x01
            return dataclasses.replace(honest, attest=bytes(attest))
        if self.mode == "lie":  # claims golden values it does not have
            values = {i: hashlib.sha256(b"x").digest() for i in honest.pcr_values}
            return dataclasses.replace(honest, pcr_values=values)
        return honest

    @endpoint(am.IdentityRequest)
    def get_identity(self, req: am.IdentityRequest) -> am.HostIdentity:
        honest = AgentManager.get_identity.__wrapped__(self, req, vouched=True)
        if self.mode == "other-command-key":  # a key the TPM did not vouch for
            return dataclasses.replace(honest, command_public=authn.public_raw(
                ed25519.Ed25519PrivateKey.generate().public_key()))
        if self.mode != "unknown-ak":
            return honest
        # our KEM key, certified (with the right binding) by a foreign AK
        other = self.foreign.identity(authn.host_key_binding(req.nonce, self.command_public,
                                                                self.host))
        return dataclasses.replace(honest, kem_certify_attest=other.kem_certify_attest,
                                   kem_certify_signature=other.kem_certify_signature)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def setup(request):
    work = short_dir("vteng")
    exchange = "vtpcm-test-" + uuid.uuid4().hex[:8]
    conf = client_conf(exchange)
    started, cleanups = [], []
    try:
        if request.param == "sqlite":
            url = "sqlite:///%s/engine.sqlite" % work
        else:
            base = request.getfixturevalue("pg_url")
            schema = "e_" + uuid.uuid4().hex[:10]
            eng = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
            with eng.connect() as conn:
                conn.execute(sqlalchemy.text('CREATE SCHEMA "%s"' % schema))
            eng.dispose()
            url = "%s?options=-csearch_path%%3D%s" % (base, schema)
        tpms = {}
        for label in ("a", "b", "x"):
            tpms[label] = HostTPMStandIn(work / ("tpm-" + label), name=label)
            tpms[label].start()
            started.append(tpms[label])
            boot(tpms[label].tcti)
        host_a, host_b = "ea-" + uuid.uuid4().hex[:6], "eb-" + uuid.uuid4().hex[:6]
        agents = agent_rpcapi.AgentAPI(conf, timeout=30)
        agent_a = AgentDaemon(work, host_a, exchange, tpms["a"].tcti, run_dir=work / "run-a",
                              extra={"agent": {"register_with_engine": "false"}})
        agent_a.start()
        started.append(agent_a)
        agent_a.wait_ready(agents)
        # host B: an in-process agent the test can make dishonest
        tpm_b = HostTPM(tpms["b"].tcti, TEST_KEY_AUTH)
        tpm_x = HostTPM(tpms["x"].tcti, TEST_KEY_AUTH)
        cleanups += [tpm_b.close, tpm_x.close]
        dishonest = DishonestAgent(host_b, instances=None, host_tpm=tpm_b,
                                   command_public=random_command_public())
        dishonest.foreign = tpm_x
        cleanups.append(serve_agent_in_process(conf, dishonest))
        engine = EngineDaemon(work, exchange, url, extra={
            "attestation": {"verdict_ttl": 600}})
        engine.start()
        started.append(engine)
        api = EngineAPI(conf, timeout=60)
        engine.wait_ready(api)
        yield api, engine, host_a, host_b, dishonest, tpms
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        for proc in reversed(started):
            proc.cleanup() if isinstance(proc, HostTPMStandIn) else proc.stop()
        shutil.rmtree(work, ignore_errors=True)


def _audit(api, host, outcome=None):
    return [e for e in api.list_audit(limit=200, host=host).entries
            if outcome is None or e.outcome == outcome]


def test_enroll_policy_and_honest_hosts_become_trusted(setup):
    api, _, host_a, host_b, _, _ = setup
    for host in (host_a, host_b):
        info = api.enroll(host)
        assert info.status == "APPROVED"  # auto_approve in this lab config
    policy = api.record_policy("golden", host_a, POLICY_PCRS, "lab boot chain")
    assert sorted(policy.pcrs) == list(POLICY_PCRS)
    for host in (host_a, host_b):
        api.assign_policy(host, "golden")
        verdict = api.attest(host)
        assert verdict.status == "TRUSTED", verdict.reason
    fresh = {v.host: v.status for v in api.verdicts().verdicts}
    assert fresh[host_a] == fresh[host_b] == "TRUSTED"
    # the scheduler's paged query over the real broker: one host a page
    first = api.trusted_hosts(limit=1)
    assert len(first.expires) == 1 and first.next_after is not None
    assert set(fetch_trusted(api, timeout=10)) >= {host_a, host_b}


@pytest.mark.parametrize(("mode", "words"), [
    ("replay", "nonce"),
    ("foreign", "signature"),
    ("tamper", "signature does not verify under the enrolled AK"),
    ("lie", "PCR"),
])
def test_dishonest_quotes_are_refused_and_audited(setup, mode, words):
    api, _, _, host_b, dishonest, _ = setup
    dishonest.mode = "honest"
    assert api.attest(host_b).status == "TRUSTED"  # records a quote for the replay
    refused_before = len(_audit(api, host_b))
    dishonest.mode = mode
    try:
        verdict = api.attest(host_b)
    finally:
        dishonest.mode = "honest"
    assert verdict.status == "UNTRUSTED", (mode, verdict)
    assert words.lower() in verdict.reason.lower(), verdict.reason
    assert len(_audit(api, host_b)) > refused_before
    fresh = {v.host: v.status for v in api.verdicts().verdicts}
    assert fresh[host_b] == "UNTRUSTED"


def _dishonest_enroll(api, host, dishonest, mode) -> tuple[str, list]:
    """Enroll ``host`` while its agent answers in ``mode``; the refusal text
    and the enroll refusals audited for it, newest first."""
    dishonest.mode = mode
    try:
        with pytest.raises(exception.CertificationError) as err:
            api.enroll(host)
    finally:
        dishonest.mode = "honest"
    return str(err.value), [e for e in _audit(api, host)
                            if e.event == "enroll" and e.outcome == "refused"]


def test_kem_key_certified_by_unknown_ak_is_refused(setup):
    api, _, _, host_b, dishonest, _ = setup
    reason, refused = _dishonest_enroll(api, host_b, dishonest, "unknown-ak")
    assert "signature" in reason.lower(), reason
    assert refused


def test_a_command_key_the_tpm_did_not_vouch_for_is_refused(setup):
    api, _, _, host_b, dishonest, _ = setup
    reason, refused = _dishonest_enroll(api, host_b, dishonest, "other-command-key")
    assert ("does not bind this enrollment's nonce and host name to the reported host "
            "command key") in reason
    assert refused and "host command key" in refused[0].detail


def test_changed_pcr_names_the_pcr(setup):
    api, _, _, host_b, _, tpms = setup
    api.attest(host_b)
    with HostTPM(tpms["b"].tcti, TEST_KEY_AUTH) as tpm:
        tpm.extend_pcr(4, hashlib.sha256(b"evil bootloader").digest())
    verdict = api.attest(host_b)
    assert verdict.status == "UNTRUSTED"
    assert "PCR 4" in verdict.reason


def test_reboot_needs_reapproval_and_engine_restart_keeps_state(setup):
    api, engine, host_a, _, _, tpms = setup
    assert api.attest(host_a).status == "TRUSTED"
    # Engine restart: registry, policies and verdicts survive.
    engine.stop()
    engine.start()
    engine.wait_ready(api)
    assert host_a in {h.name for h in api.list_hosts().hosts}
    assert "golden" in {p.name for p in api.list_policies().policies}
    assert {v.host: v.status for v in api.verdicts().verdicts}[host_a] == "TRUSTED"
    # Reboot of host A's TPM (resetCount grows); PCRs re-measured identically.
    tpms["a"].stop()
    tpms["a"].start()
    boot(tpms["a"].tcti)
    verdict = api.attest(host_a)
    assert verdict.status == "UNTRUSTED"
    assert "reboot" in verdict.reason.lower()
    assert api.show_host(host_a).status == "PENDING"
    api.approve_host(host_a)
    assert api.attest(host_a).status == "TRUSTED"


def test_unknown_host_and_bad_input(setup):
    api, _, _, _, _, _ = setup
    with pytest.raises(exception.NotFound):
        api.attest("no-such-host")
    cctxt = api.client.prepare(version="1.0")
    # a bare call gets the refusal rebuilt too (the transport's allowed_remote_exmods)
    with pytest.raises(exception.InvalidPayload) as err:
        cctxt.call({}, "attest", payload={"host": "bad host/../"})
    assert err.value.kwargs["field"] == "host"
    with pytest.raises(exception.InvalidPayload) as err:
        cctxt.call({}, "begin", payload={"migration_id": "x", "instance_uuid": str(uuid.uuid4()),
                                         "source": "a", "dest": "b"})
    assert err.value.kwargs["field"] == "migration_id"


def test_two_engine_workers_share_the_topic_and_attest_periodically(setup):
    """A second worker on the same database and topic serves calls when the
    first is gone, and its periodic task re-attests without anyone asking."""
    api, engine, host_a, _, _, _ = setup
    first = {v.host: v.attested_at for v in api.verdicts().verdicts}[host_a]
    second = EngineDaemon(engine.workdir, engine.config["DEFAULT"]["control_exchange"],
                          engine.config["engine"]["connection"], name="engine-second",
                          extra={"engine": {"host": "engine-second"},
                                 "attestation": {"verdict_ttl": 600, "interval": 1,
                                                 "jitter": 1}})
    second.start()
    try:
        second.wait_ready(api)
        engine.stop()
        assert api.show_host(host_a).name == host_a  # only the second one is left
        wait_for("periodic attestation", lambda: {
            v.host: v.attested_at for v in api.verdicts().verdicts}[host_a] != first, 20)
    finally:
        second.stop()
        engine.start()
        engine.wait_ready(api)
