"""Real vtpcm-agent daemons over the local RabbitMQ obey only commands the
engine signed: a compromised compute node with broker credentials (a client
without the engine's signing key, or with a key of its own) cannot seal a
VM's migration key to its own KEM key, export, destroy or move a vTPCM; a
captured signed command cannot be replayed or redirected to another host."""

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.functional.harness import (
    AgentDaemon,
    HostTPMStandIn,
    agent_cluster,
    agent_seals,
    client_conf,
    short_dir,
)
from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.agent import messages as m
from vtpcm_common.api.agent.rpcapi import RPC_API_VERSION, AgentAPI

pytestmark = pytest.mark.functional

@dataclasses.dataclass
class Host:
    name: str
    agent: AgentDaemon
    run_dir: Path
    tpm: HostTPMStandIn


@pytest.fixture(scope="module")
def cluster():
    work = short_dir("vtauth")
    exchange = "vtpcm-test-" + uuid.uuid4().hex[:8]
    api = AgentAPI(client_conf(exchange), timeout=30)  # holds the engine's key
    rogue = AgentAPI(client_conf(exchange, signing=False), timeout=30)  # broker creds only
    assert api.signer is not None and rogue.signer is None
    try:
        with agent_cluster(work, "au", exchange, api) as hosts:
            a, b = (Host(name, agent, run_dir, tpm) for name, tpm, agent, run_dir in hosts)
            yield api, rogue, a, b, work, exchange
    finally:
        api.transport.cleanup()
        rogue.transport.cleanup()


def _active(api: AgentAPI, host: Host) -> m.VTPCMInfo:
    instance = str(uuid.uuid4())
    api.create(host.name, instance)
    return api.start(host.name, instance)


def _raw(api: AgentAPI, host: str, method: str, version: str, **kwargs):
    """The bare oslo.messaging call a compromised node can make (the
    agent's refusal comes back rebuilt: allowed_remote_exmods)."""
    try:
        return api.client.prepare(server=host, version=version, timeout=30).call(
            {}, method, **kwargs)
    except exception.VTPCMException as err:
        raise rpc.plain(err) from None


def test_signed_client_works_and_readers_need_no_signature(cluster):
    api, rogue, a, b, _, _ = cluster
    info = _active(api, a)
    assert info.state == "ACTIVE" and info.running
    # read-only and nonce-bound methods stay open to any broker client
    assert rogue.get(a.name, info.instance_uuid) == api.get(a.name, info.instance_uuid)
    assert info.instance_uuid in {v.instance_uuid for v in rogue.list(a.name).vtpcms}
    assert rogue.health(a.name).api_version == RPC_API_VERSION
    kem = rogue.get_identity(b.name, os.urandom(32)).kem_public
    ctx = m.MigrationContext(str(uuid.uuid4()), info.instance_uuid, 0, a.name, b.name)
    assert agent_seals(a.agent, info.instance_uuid) == []
    sealed = api.seal_migration_key(a.name, ctx, kem)
    # control for the "nothing sealed" checks below: a signed seal is recorded
    [seal] = agent_seals(a.agent, info.instance_uuid)
    assert (seal.migration_id, seal.generation, seal.dest_host) == (ctx.migration_id, 0, b.name)
    incoming = api.prepare_incoming(b.name, ctx, sealed.envelope)
    assert incoming.state == "MIGRATING_IN"
    api.abort_incoming(b.name, ctx)
    api.abort_outgoing(a.name, ctx)
    assert api.get(a.name, info.instance_uuid).state == "ACTIVE"


def test_unsigned_commands_are_refused_and_change_nothing(cluster):
    api, rogue, a, b, _, _ = cluster
    info = _active(api, a)
    before = api.get(a.name, info.instance_uuid)
    attacker_kem = rogue.get_identity(b.name, os.urandom(32)).kem_public
    ctx = m.MigrationContext(str(uuid.uuid4()), info.instance_uuid, 0, a.name, b.name)
    attempts = [
        lambda: rogue.seal_migration_key(a.name, ctx, attacker_kem),
        lambda: rogue.export_state(a.name, info.instance_uuid),
        lambda: rogue.destroy(a.name, info.instance_uuid),
        lambda: rogue.stop(a.name, info.instance_uuid),
        lambda: rogue.commit_outgoing(a.name, ctx),
        lambda: rogue.abort_outgoing(a.name, ctx),
        lambda: rogue.reclaim_outgoing(a.name, ctx, 2),
        lambda: rogue.create(a.name, str(uuid.uuid4())),
    ]
    for attempt in attempts:
        with pytest.raises(exception.CommandRefused, match="no engine signature"):
            attempt()
    assert api.get(a.name, info.instance_uuid) == before
    assert len(api.list(a.name).vtpcms) == len(rogue.list(a.name).vtpcms)
    assert agent_seals(a.agent, info.instance_uuid) == []  # nothing sealed
    assert "Command seal_migration_key refused: no engine signature" in a.agent.log_text()


def test_a_key_of_its_own_does_not_help(cluster):
    api, rogue, a, b, _, _ = cluster
    info = _active(api, a)
    forger = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
    attacker_kem = rogue.get_identity(b.name, os.urandom(32)).kem_public
    ctx = m.MigrationContext(str(uuid.uuid4()), info.instance_uuid, 0, a.name, b.name)
    payload = m.SealRequest(ctx, attacker_kem).validated().to_wire()
    with pytest.raises(exception.CommandRefused, match="signature does not"):
        _raw(rogue, a.name, "seal_migration_key", "1.2", payload=payload,
             auth=forger.sign("seal_migration_key", a.name, payload))
    assert api.get(a.name, info.instance_uuid).state == "ACTIVE"
    assert agent_seals(a.agent, info.instance_uuid) == []  # nothing sealed


def test_captured_signed_command_cannot_be_replayed(cluster):
    api, rogue, a, _, _, _ = cluster
    info = _active(api, a)
    api.stop(a.name, info.instance_uuid)
    payload = m.InstanceRef(info.instance_uuid).validated().to_wire()
    auth = api.signer.sign("start", a.name, payload)  # what the engine put on the wire
    assert _raw(api, a.name, "start", "1.0", payload=payload, auth=auth)["state"] == "ACTIVE"
    api.stop(a.name, info.instance_uuid)
    with pytest.raises(exception.CommandRefused, match="replayed"):
        _raw(rogue, a.name, "start", "1.0", payload=payload, auth=auth)
    after = api.get(a.name, info.instance_uuid)
    assert after.state == "STOPPED" and not after.running
    # nor used for another method with the same payload
    with pytest.raises(exception.CommandRefused, match="signature does not"):
        _raw(rogue, a.name, "destroy", "1.0", payload=payload,
             auth=api.signer.sign("start", a.name, payload))
    assert api.get(a.name, info.instance_uuid).state == "STOPPED"


def test_a_replay_after_an_agent_restart_is_refused(cluster):
    """Accepted nonces are in the agent's association list: the replay comes
    seconds after signing, inside the validity period and the start-time
    allowance, so only the stored nonce can refuse it."""
    api, rogue, a, _, _, _ = cluster
    info = _active(api, a)
    api.stop(a.name, info.instance_uuid)
    payload = m.InstanceRef(info.instance_uuid).validated().to_wire()
    auth = api.signer.sign("start", a.name, payload)
    assert _raw(api, a.name, "start", "1.0", payload=payload, auth=auth)["state"] == "ACTIVE"
    api.stop(a.name, info.instance_uuid)
    a.agent.stop()
    a.agent.start()
    a.agent.wait_ready(api)
    with pytest.raises(exception.CommandRefused, match="replayed"):
        _raw(rogue, a.name, "start", "1.0", payload=payload, auth=auth)
    after = api.get(a.name, info.instance_uuid)
    assert after.state == "STOPPED" and not after.running


def test_command_signed_for_one_host_is_refused_by_another(cluster):
    api, rogue, a, b, _, _ = cluster
    info = _active(api, b)
    payload = m.InstanceRef(info.instance_uuid).validated().to_wire()
    auth = api.signer.sign("destroy", a.name, payload)  # signed for host A
    with pytest.raises(exception.CommandRefused, match="misdirected"):
        _raw(rogue, b.name, "destroy", "1.0", payload=payload, auth=auth)
    forged = dict(auth, server=b.name)  # relabelled: the signature still says A
    with pytest.raises(exception.CommandRefused, match="signature does not"):
        _raw(rogue, b.name, "destroy", "1.0", payload=payload, auth=forged)
    after = api.get(b.name, info.instance_uuid)
    assert after.state == "ACTIVE" and after.running


def test_agent_without_engine_public_key_does_not_start(cluster):
    _, _, _, _, work, exchange = cluster
    # the key check comes first: no host TPM is needed to see the refusal
    agent = AgentDaemon(work, "nokey-" + uuid.uuid4().hex[:6], exchange,
                        "swtpm:path=/nonexistent", run_dir=work / "run-nokey",
                        extra={"agent": {"register_with_engine": "false",
                                         "engine_public_key": ""}})
    agent.start()
    try:
        assert agent.proc is not None
        assert agent.proc.wait(timeout=60) != 0
        assert "[agent] engine_public_key is not set" in agent.log_text()
    finally:
        agent.stop()


# Another local user of the host TPM: it can open the TPM (here the
# stand-in's socket, /dev/tpmrm0 in production) but has not the agent's
# host key. It makes an AK and a KEM key from the same templates with an
# auth value of its own (a HostTPM without one refuses to use them): other
# keys. test_hostkeys.py gives such a user the agent's key blobs too.
_FOREIGN_TPM_USER = """
import json, os, sys
from vtpcm_agent import keyauth, sealing
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_common.exception import VTPCMException
args = json.loads(sys.argv[1])
ctx = sealing.SealContext(**args["ctx"])
out = {}
with HostTPM(args["tcti"], keyauth.derive(os.urandom(32))) as tpm:
    try:
        out["opened"] = sealing.open_envelope(bytes.fromhex(args["envelope"]), ctx,
                                              tpm.ecdh_zgen).hex()
    except VTPCMException as err:
        out["refusal"] = "%s: %s" % (type(err).__name__, err)
    quote = tpm.quote(bytes.fromhex(args["nonce"]), [0, 1, 2])
    out["quote"] = [quote.attest.hex(), quote.signature.hex(),
                    {i: v.hex() for i, v in quote.pcr_values.items()}]
print(json.dumps(out))
"""


def test_another_tpm_user_cannot_use_the_kem_key_or_the_ak(cluster):
    """Issue 9 point 8: the enrolled KEM key and AK are the agent's alone."""
    from vtpcm_agent import sealing
    from vtpcm_nova.engine import verifier

    api, rogue, a, b, _, _ = cluster
    identity = rogue.get_identity(b.name, os.urandom(32))
    # an envelope sealed to b's enrolled KEM key, as a source agent does
    ctx = dict(migration_id=str(uuid.uuid4()), instance_uuid=str(uuid.uuid4()),
               generation=1, source_host=a.name, dest_host=b.name)
    secret = os.urandom(32)
    envelope = sealing.seal(identity.kem_public, secret, sealing.SealContext(**ctx))
    nonce = os.urandom(32)
    proc = subprocess.run(
        [sys.executable, "-c", _FOREIGN_TPM_USER,
         json.dumps({"tcti": b.tpm.tcti, "ctx": ctx, "envelope": envelope.hex(),
                     "nonce": nonce.hex()})],
        capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "opened" not in out, "a foreign TPM user opened an envelope sealed to the agent"
    assert out["refusal"].startswith("SealError: ") and "authentication failed" in out["refusal"]
    attest, sig, pcrs = out["quote"]
    with pytest.raises(exception.QuoteVerificationError, match="signature"):
        verifier.verify_quote(verifier.load_ak(identity.ak_public), bytes.fromhex(attest),
                              bytes.fromhex(sig), nonce,
                              {int(i): bytes.fromhex(v) for i, v in pcrs.items()})
    # positive control: the agent itself opens it (prepare_incoming runs
    # ECDH_ZGen with the enrolled KEM key) and quotes with the enrolled AK
    info = _active(api, a)
    mctx = m.MigrationContext(str(uuid.uuid4()), info.instance_uuid, 0, a.name, b.name)
    sealed = api.seal_migration_key(a.name, mctx, identity.kem_public)
    assert api.prepare_incoming(b.name, mctx, sealed.envelope).state == "MIGRATING_IN"
    api.abort_incoming(b.name, mctx)
    api.abort_outgoing(a.name, mctx)
    quote = rogue.quote(b.name, nonce, (0, 1, 2), "sha256")
    verifier.verify_quote(verifier.load_ak(identity.ak_public), quote.attest, quote.signature,
                          nonce, quote.pcr_values)
