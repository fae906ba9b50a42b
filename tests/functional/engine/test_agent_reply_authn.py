"""The engine acts only on agent replies signed with the answering host's
enrolled command key (agent API 1.6). A broker client (here: compute node C
with its own, enrolled key) consumes the source agent's queue, takes the
engine's signed commit_outgoing and answers "done": the engine must not
record the migration COMMITTED nor audit the source as shredded; the source
keeps its vTPCM; once the real agent answers again, reconcile finishes the
commit. Real agent and engine daemons, RabbitMQ, swtpm host TPMs; the state
goes from source to destination through the agents' export/import (no
QEMU)."""

import base64
import dataclasses
import os
import uuid
from typing import Any

import oslo_messaging as messaging
import pytest

from tests.functional.deploy import Deployment, Spec, Trust, build
from tests.functional.harness import serve_agent_in_process, wait_for
from vtpcm_common import authn, exception
from vtpcm_common.api.agent import rpcapi as agent_rpcapi
from vtpcm_common.api.agent.rpcapi import AgentAPI

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def deployment():
    # [engine] post_import_check off: with the thief on the source's queue
    # the check's state_digest is refused as well (an unsigned "no such
    # method"), and the commit stops BEFORE its commit point; what is tested
    # here is the stolen commit_outgoing past it (the check's own refusal of
    # unauthenticated answers: tests/unit/engine/test_post_import_check.py)
    spec = Spec("rep", labels=("a", "b", "c"), engine={
        "attestation": {"auto_approve": "true", "verdict_ttl": 600},
        "migration": {"reconcile_interval": 2},
        "engine": {"post_import_check": "false"}}, trust=Trust(labels=("a", "b")))
    with build(spec) as d:
        yield d


class Thief:
    """A broker client on the source's queue: takes commit_outgoing and
    answers success, signed with its own host's (C's) enrolled key."""

    target = messaging.Target(version=agent_rpcapi.RPC_API_VERSION)

    def __init__(self, host: str, own_key: authn.CommandSigner) -> None:
        self.host = host
        self.key = own_key
        self.stolen = 0

    def commit_outgoing(self, ctxt: Any, payload: Any, auth: Any = None,
                        reply_nonce: Any = None) -> Any:
        self.stolen += 1
        if reply_nonce is None:  # an engine before 1.6: the bare answer
            return {}
        return self.key.sign_reply("1.6", "commit_outgoing", self.host, reply_nonce,
                                   authn.request_digest(payload, auth), {"ok": {}})


def _reply_refusals(d: Deployment, host: str) -> list[str]:
    return [e.detail for e in d.operator.list_audit(limit=500, host=host).entries
            if e.event == "agent-reply" and e.outcome == "refused"]


def _prepared_migration(d: Deployment) -> tuple[str, str, str]:
    """A vTPCM on A, begun towards B by A's driver, its state moved to B."""
    a, b = d.hosts["a"], d.hosts["b"]
    instance = str(uuid.uuid4())
    rec = d.at["a"].create_vtpcm(instance, a.name)
    d.at["a"].start_vtpcm(instance)
    mid = str(uuid.uuid4())
    assert d.at["a"].begin(mid, instance, a.name, b.name).state == "PREPARED"
    d.agents.import_state(b.name, d.agents.export_state(a.name, instance))
    return instance, mid, rec.vtpcm_id


def test_a_stolen_commit_answered_by_a_broker_client_is_not_a_commit(deployment):
    d = deployment
    a = d.hosts["a"]
    instance, mid, vtpcm_id = _prepared_migration(d)
    held = d.agents.get(a.name, instance)
    keys_file = a.state_root / "keys" / (vtpcm_id + ".keys")
    assert keys_file.exists() and held.running
    refused = len(_reply_refusals(d, a.name))
    a.agent.stop()  # only the thief consumes A's queue now
    thief = Thief(a.name, authn.load_host_key(d.hosts["c"].agent.command_key))
    stop_thief = serve_agent_in_process(d.conf, thief)
    try:
        with pytest.raises(exception.ServiceUnreachable,
                           match="Reply of %s to commit_outgoing not authenticated: "
                                 "signature does not verify" % a.name):
            d.at["a"].commit(mid)  # post_live_migration on A
        assert thief.stolen >= 1
        assert d.operator.get_migration(mid).state == "SHREDDING"
        audit = [(e.event, e.outcome) for e in d.operator.list_audit(limit=200).entries
                 if e.migration_id == mid]
        assert not any("shred" in o or o == "committed" for _, o in audit), audit
        assert len(_reply_refusals(d, a.name)) > refused
        assert "commit_outgoing" in _reply_refusals(d, a.name)[0]
        # the source still holds its vTPCM: keys, state and swtpm
        assert keys_file.exists() and held.pid is not None
        os.kill(held.pid, 0)
        with pytest.raises(exception.ServiceUnreachable):  # the driver's retry
            d.at["a"].commit(mid)
        assert d.operator.get_migration(mid).state == "SHREDDING"
    finally:
        stop_thief()
        a.agent.start()
        a.agent.wait_ready(d.agents)
    # the real agent answers: reconcile (every 2 s here) finishes the commit
    wait_for("reconciled commit", lambda: d.operator.get_migration(mid).state == "COMMITTED",
             timeout=60)
    assert not keys_file.exists()
    assert d.agents.get(a.name, instance).state == "DESTROYED"
    assert d.operator.get_vtpcm(instance).host == d.hosts["b"].name
    d.at["b"].destroy_vtpcm(instance)


def test_honest_replies_complete_a_migration(deployment):
    """Positive control on the same deployment: nothing refused."""
    d = deployment
    instance, mid, _ = _prepared_migration(d)
    refused = {h.name: len(_reply_refusals(d, h.name)) for h in d.hosts.values()}
    assert d.at["a"].commit(mid).state == "COMMITTED"
    # what the Nova driver checks the destination's replies with
    reported = d.operator.host_command_key(d.hosts["b"].name)
    assert (reported.status, reported.command_public) == ("APPROVED", authn.public_raw(
        authn.load_host_key(d.hosts["b"].agent.command_key).public_key))
    assert {h.name: len(_reply_refusals(d, h.name)) for h in d.hosts.values()} == refused
    d.at["b"].destroy_vtpcm(instance)


class IdentityRelay:
    """A broker client answering for a new host name with what a real
    host's agent answers to the same enrollment nonce."""

    target = messaging.Target(version=agent_rpcapi.RPC_API_VERSION)

    def __init__(self, host: str, victim: str, agents: AgentAPI) -> None:
        self.host, self.victim, self.agents = host, victim, agents

    def get_identity(self, ctxt: Any, payload: Any, **kwargs: Any) -> Any:
        nonce = base64.b64decode(payload["nonce"])
        honest = self.agents.get_identity(self.victim, nonce)
        return dataclasses.replace(honest, host=self.host).to_wire()


def test_a_relayed_identity_does_not_squat_the_real_hosts_keys(deployment):
    """The certify binds the host name: the engine refuses the relayed
    identity for what it is (before, only a victim already enrolled was
    safe: the keys of one not yet enrolled went to the squatter's name for
    good), and the real host (C) keeps its record."""
    d = deployment
    c = d.hosts["c"].name
    squatter = "sq-" + uuid.uuid4().hex[:6]
    stop = serve_agent_in_process(d.conf, IdentityRelay(squatter, c, d.agents))
    try:
        with pytest.raises(exception.CertificationError,
                           match="does not bind this enrollment's nonce and host name"):
            d.operator.enroll(squatter)
    finally:
        stop()
    with pytest.raises(exception.NotFound):
        d.operator.show_host(squatter)
    assert d.operator.show_host(c).status == "APPROVED"
