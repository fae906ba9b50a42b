"""Enrollment with ``[attestation] ek_ca_file``: the engine accepts a host
only if its EK certificate comes from a trusted CA (here swtpm-localca, the
"manufacturer" of the stand-ins), certifies the EK the agent reports, and the
TPM holding that EK activates a credential naming the host's AK. Real
vtpcm-engine and agent daemons, RabbitMQ and manufactured swtpm host TPMs;
one in-process agent the test can make lie."""

import dataclasses
import os
import re
import shutil
import uuid

import pytest

from tests.functional.harness import (
    AgentDaemon,
    EngineDaemon,
    client_conf,
    random_command_public,
    serve_agent_in_process,
    short_dir,
)
from tests.functional.hosttpm_fixture import TEST_KEY_AUTH
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_agent.manager import AgentManager, endpoint
from vtpcm_common import exception
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.agent import rpcapi as agent_rpcapi
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab import daemons
from vtpcm_lab.hosttpm import HostTPMStandIn, localca_ek_cas, measured_boot

pytestmark = pytest.mark.functional


class LyingAgent(AgentManager):
    """Host Y's real identity, bent on request: it may present host X's
    (genuine, certified) EK as its own and pass X's TPM the credential."""

    mode = "honest"
    other: HostTPM | None = None

    @endpoint(am.IdentityRequest)
    def get_identity(self, req: am.IdentityRequest) -> am.HostIdentity:
        honest = AgentManager.get_identity.__wrapped__(self, req, vouched=True)
        if self.mode in ("foreign-ek", "mismatched-ek"):
            theirs = self.other.identity(os.urandom(32))
            return dataclasses.replace(
                honest, ek_certificate=theirs.ek_certificate,
                ek_public=theirs.ek_public if self.mode == "foreign-ek" else honest.ek_public)
        return honest

    @endpoint(am.CredentialChallenge)
    def activate_credential(self, req: am.CredentialChallenge) -> am.ActivatedCredential:
        if self.mode == "wrong-secret":
            return am.ActivatedCredential(host=self.host, secret=os.urandom(32))
        tpm = self.other if self.mode == "foreign-ek" else self.host_tpm
        secret = tpm.activate_credential(req.credential_blob, req.encrypted_secret)
        return am.ActivatedCredential(host=self.host, secret=secret)


@pytest.fixture(scope="module")
def setup():
    work = short_dir("vtek")
    exchange = "vtpcm-ek-" + uuid.uuid4().hex[:8]
    conf = client_conf(exchange)
    started, cleanups = [], []
    try:
        tpms = {}
        for label in ("good", "bare", "x", "y"):
            tpms[label] = HostTPMStandIn(work / ("tpm-" + label), name=label,
                                         with_ek_cert=label != "bare")
            tpms[label].start()
            started.append(tpms[label])
            measured_boot(tpms[label].tcti)
        agents = agent_rpcapi.AgentAPI(conf, timeout=30)
        cleanups.append(agents.transport.cleanup)
        names = {label: "ek%s-%s" % (label, uuid.uuid4().hex[:6]) for label in tpms}
        for label in ("good", "bare"):
            agent = AgentDaemon(work, names[label], exchange, tpms[label].tcti,
                                run_dir=work / ("run-" + label),
                                extra={"agent": {"register_with_engine": "false"}})
            agent.start()
            started.append(agent)
            agent.wait_ready(agents)
        tpm_y = HostTPM(tpms["y"].tcti, TEST_KEY_AUTH)
        tpm_x = HostTPM(tpms["x"].tcti, TEST_KEY_AUTH)
        cleanups += [tpm_y.close, tpm_x.close]
        liar = LyingAgent(names["y"], instances=None, host_tpm=tpm_y,
                          command_public=random_command_public())
        liar.other = tpm_x
        cleanups.append(serve_agent_in_process(conf, liar))
        engine = EngineDaemon(work, exchange, "sqlite:///%s/engine.sqlite" % work, extra={
            "attestation": {"ek_ca_file": localca_ek_cas(work / "ek-cas.pem"),
                            "auto_approve": "true"}})
        engine.start()
        started.append(engine)
        api = EngineAPI(conf, timeout=60)
        cleanups.append(api.transport.cleanup)
        engine.wait_ready(api)
        yield api, engine, names, liar
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        for proc in reversed(started):
            proc.cleanup() if isinstance(proc, HostTPMStandIn) else proc.stop()
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _refused(api, host, reason):
    with pytest.raises(exception.CertificationError) as err:
        api.enroll(host)
    assert reason in str(err.value), str(err.value)
    assert host not in {h.name for h in api.list_hosts().hosts}
    audit = [e for e in api.list_audit(limit=50, host=host).entries if e.event == "enroll"]
    assert audit and audit[0].outcome == "refused" and reason in audit[0].detail


def test_a_tpm_with_a_trusted_ek_certificate_enrolls(setup):
    api, engine, names, _ = setup
    assert "Enrollment requires EK certificates from 2 CA(s)" in engine.log_text()
    assert api.enroll(names["good"]).status == "APPROVED"
    audit = [e for e in api.list_audit(limit=50, host=names["good"]).entries
             if e.event == "enroll"]
    assert re.search(r"EK certificate [0-9a-f]{16} from CN=swtpm-localca verified, "
                     r"AK activated", audit[0].detail), audit[0].detail


def test_a_tpm_without_ek_certificate_is_refused(setup):
    api, _, names, _ = setup
    _refused(api, names["bare"], "no EK certificate (required by [attestation] ek_ca_file)")


@pytest.mark.parametrize("mode,reason", [
    # X's genuine certificate and EK, Y's AK; X's TPM asked to activate: it
    # does not hold the AK the credential names
    ("foreign-ek", "credential activation failed"),
    ("mismatched-ek", "does not certify the reported EK"),
    ("wrong-secret", "credential activation returned a wrong secret"),
])
def test_an_ak_not_in_the_certified_tpm_is_refused(setup, mode, reason):
    api, _, names, liar = setup
    liar.mode = mode
    try:
        _refused(api, names["y"], reason)
    finally:
        liar.mode = "honest"


def test_the_honest_answer_of_the_same_agent_enrolls(setup):
    """Control for the test above: the refusals were the lies, not the host."""
    api, _, names, _ = setup
    assert api.enroll(names["y"]).status == "APPROVED"
