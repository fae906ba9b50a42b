"""The post-import check end to end (issue 9, finding 6): real agent and
engine daemons, RabbitMQ, swtpm host TPMs. The real agents' digests
refuse a destination that imported an earlier state of the source (what a
replayed stream brings); stand-ins on both agents' queues (each signing
with its own host's enrolled key, as the agent of API 1.12 does) report
another state or none. The Nova driver's commit over the engine RPC gets
the refusal as its own class and the migration stays PREPARED with the
source's copy intact."""

import os
import uuid
from typing import Any

import oslo_messaging as messaging
import pytest

from tests.functional import tpmtools
from tests.functional.deploy import Deployment, Spec, Trust, build
from tests.functional.harness import serve_agent_in_process
from vtpcm_common import authn, exception, statedigest
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.agent import rpcapi as agent_rpcapi

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def deployment():
    spec = Spec("pic", labels=("a", "b"), engine={
        "attestation": {"auto_approve": "true", "verdict_ttl": 600}},
        trust=Trust(labels=("a", "b")))
    with build(spec) as d:
        yield d


class DigestStandIn:
    """Answers ``state_digest`` on one host's queue, signed with that
    host's key: the digest of ``state`` under the engine's nonce, or None
    with ``state`` as the reason when it is a str."""

    target = messaging.Target(version=agent_rpcapi.RPC_API_VERSION)

    def __init__(self, host: str, key: authn.CommandSigner, state: bytes | str) -> None:
        self.host, self.key, self.state = host, key, state
        self.asked: list[tuple[str, bytes]] = []

    def state_digest(self, ctxt: Any, payload: Any, auth: Any = None,
                     reply_nonce: Any = None) -> Any:
        req = am.StateDigestRequest.from_wire(payload)
        self.asked.append((req.side, req.nonce))
        if isinstance(self.state, str):
            answer = am.StateDigest(req.side, None, self.state)
        else:
            answer = am.StateDigest(
                req.side, statedigest.permanent_state_digest(req.nonce, self.state))
        return self.key.sign_reply(agent_rpcapi.RPC_API_VERSION, "state_digest", self.host,
                                   reply_nonce, authn.request_digest(payload, auth),
                                   {"ok": answer.validated().to_wire()})


def _prepared_migration(d: Deployment) -> tuple[str, str]:
    """A running vTPCM on A, begun towards B by A's driver, its state moved
    to B (QEMU's part, stood in for by the agents' export and import)."""
    a, b = d.hosts["a"], d.hosts["b"]
    instance = str(uuid.uuid4())
    d.at["a"].create_vtpcm(instance, a.name)
    d.at["a"].start_vtpcm(instance)
    mid = str(uuid.uuid4())
    assert d.at["a"].begin(mid, instance, a.name, b.name).state == "PREPARED"
    d.agents.import_state(b.name, d.agents.export_state(a.name, instance))
    return instance, mid


def _commit_with(d: Deployment, mid: str, dest_state: bytes | str,
                 expected: type[exception.MigrationError]) -> list[DigestStandIn]:
    """A's signed commit while both queues are the stand-ins'; the refusal
    it gets must be ``expected`` itself, rebuilt by the RPC client."""
    stand_ins = [DigestStandIn(d.hosts[label].name,
                               authn.load_host_key(d.hosts[label].agent.command_key), state)
                 for label, state in (("a", b"the tenant's state"), ("b", dest_state))]
    for host in d.hosts.values():
        host.agent.stop()
    stops = [serve_agent_in_process(d.conf, s) for s in stand_ins]
    try:
        with pytest.raises(expected) as err:
            d.at["a"].commit(mid)  # post_live_migration on A
        assert type(err.value) is expected
    finally:
        for stop in stops:
            stop()
        for host in d.hosts.values():
            host.agent.start()
            host.agent.wait_ready(d.agents)
    return stand_ins


def test_a_destination_that_imported_another_state_is_refused_over_rpc(deployment):
    d = deployment
    a = d.hosts["a"]
    instance, mid = _prepared_migration(d)
    held = d.agents.get(a.name, instance)
    source, dest = _commit_with(d, mid, b"an earlier generation",
                                exception.ImportedStateMismatch)
    # one check, one nonce for both sides
    assert [side for side, _ in source.asked + dest.asked] == ["source", "destination"]
    assert source.asked[0][1] == dest.asked[0][1]
    assert d.operator.get_migration(mid).state == "PREPARED"
    assert d.operator.get_vtpcm(instance).host == a.name
    refused = [e for e in d.operator.list_audit(limit=200).entries
               if e.migration_id == mid and e.event == "migration.commit"]
    assert [e.outcome for e in refused] == ["refused"]
    assert refused[0].host == d.hosts["b"].name
    assert "imported is not the source's" in refused[0].detail
    # the source still holds its copy: MIGRATING_OUT, keys and swtpm there
    now = d.agents.get(a.name, instance)
    assert (now.state, now.migration_id, now.generation) == ("MIGRATING_OUT", mid, 0)
    assert held.pid is not None
    os.kill(held.pid, 0)
    d.at["a"].abort(mid, "refused by the post-import check", instance_uuid=instance)
    d.at["a"].destroy_vtpcm(instance)


def test_a_destination_that_cannot_tell_is_unverified_over_rpc(deployment):
    d = deployment
    instance, mid = _prepared_migration(d)
    _commit_with(d, mid, "no write seen since the import",
                 exception.ImportedStateUnverified)
    assert d.operator.get_migration(mid).state == "PREPARED"
    assert d.operator.get_vtpcm(instance).host == d.hosts["a"].name
    d.at["a"].abort(mid, "refused by the post-import check", instance_uuid=instance)
    d.at["a"].destroy_vtpcm(instance)


def test_real_agents_refuse_a_rolled_back_import_and_pass_a_faithful_one(deployment):
    """No stand-ins: the real agents' digests. The destination imports the
    state the source had before the guest wrote to its TPM (what a replayed
    stream brings): refused. The source's current state imported: passes."""
    d = deployment
    a, b = d.hosts["a"], d.hosts["b"]
    instance = str(uuid.uuid4())
    rec = d.at["a"].create_vtpcm(instance, a.name)
    d.at["a"].start_vtpcm(instance)
    mid = str(uuid.uuid4())
    assert d.at["a"].begin(mid, instance, a.name, b.name).state == "PREPARED"
    earlier = d.agents.export_state(a.name, instance)
    # the guest writes to its TPM: NV index, persistent key (permanent state)
    tpmtools.write_guest_state(a.paths(instance, rec.vtpcm_id), b"tenant NV",
                               os.urandom(32), make_key=True)
    d.agents.import_state(b.name, earlier)
    with pytest.raises(exception.ImportedStateMismatch) as err:
        d.at["a"].commit(mid)
    assert type(err.value) is exception.ImportedStateMismatch
    assert d.operator.get_migration(mid).state == "PREPARED"
    assert d.operator.get_vtpcm(instance).host == a.name
    d.at["a"].abort(mid, "rolled back import refused", instance_uuid=instance)
    # again, faithfully: the source's current state
    mid = str(uuid.uuid4())
    assert d.at["a"].begin(mid, instance, a.name, b.name).state == "PREPARED"
    d.agents.import_state(b.name, d.agents.export_state(a.name, instance))
    assert d.at["a"].commit(mid).state == "COMMITTED"
    assert d.operator.get_vtpcm(instance).host == b.name
    d.at["b"].destroy_vtpcm(instance)
