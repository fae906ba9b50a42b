"""Issue 9 point 3: a broker client flooding the unsigned endpoints does not
stall the migrations of everyone else. Real engine daemon, two agent
daemons with swtpm host TPMs, RabbitMQ; the flood (``vtpcm_lab.flood``)
throws register_agent casts (random names, and names of silent agents that
never answer), unsigned get_identity/quote/activate_credential calls to both
agents and attest calls to the engine, while host A's Nova driver begins
and aborts migrations to B. Completion within generous bounds is asserted,
not timing; the figures are benchmarks/unsigned_flood.py's job."""

import shutil
import time
import uuid

import pytest

from tests.functional.harness import (
    EngineDaemon,
    agent_cluster,
    client_conf,
    short_dir,
    trust_hosts,
)
from vtpcm_common import authn
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab import daemons
from vtpcm_lab.flood import Flood, SilentAgents

pytestmark = pytest.mark.functional

RATE = 40.0  # calls per second per endpoint; inline enrollment starved at ~1
ENGINE_RPC_TIMEOUT = 30  # how long an engine enrolling inline waits per silent name
BOUND = 45.0  # generous: a round takes about a second on an idle machine


def _round(api: EngineAPI, instance: str, a: str, b: str) -> str:
    """begin (seal at A, ZGen + prepare_incoming at B) then abort (both agents)."""
    mid = str(uuid.uuid4())
    assert api.begin(mid, instance, a, b).state in ("PREPARED", "MIGRATING")
    return api.abort(mid, "flood test").state


def test_a_flood_of_unsigned_calls_leaves_migrations_working():
    work = short_dir("vtflood")
    exchange = "vtpcm-flood-" + uuid.uuid4().hex[:8]
    conf = client_conf(exchange)
    rogue_conf = client_conf(exchange, signing=False)
    agents = AgentAPI(conf, timeout=30)
    operator = EngineAPI(conf, timeout=60)
    engine = EngineDaemon(work, exchange, "sqlite:///%s/engine.sqlite" % work, extra={
        "attestation": {"auto_approve": "true", "verdict_ttl": 900, "interval": 0,
                        "min_unsigned_interval": 5},
        "engine": {"rpc_timeout": ENGINE_RPC_TIMEOUT}})
    try:
        with agent_cluster(work, "fl", exchange, agents) as hosts:
            engine.start()
            engine.wait_ready(operator)
            (a, _, agent_a, _), (b, _, _, _) = hosts
            for name in (a, b):
                assert operator.enroll(name).status == "APPROVED"
            trust_hosts(operator, [a, b])
            key = agent_a.command_key
            at_a = EngineAPI(conf, operator.transport, timeout=BOUND,
                             host_signer=authn.load_host_key(key))
            instance = str(uuid.uuid4())
            at_a.create_vtpcm(instance, a)
            assert _round(at_a, instance, a, b) == "ABORTED"  # works before the flood
            with SilentAgents(rogue_conf, 4) as silent:
                flood = Flood(rogue_conf, [a, b], silent.names, rate=RATE)
                flood.start()
                try:
                    # long enough for inline enrollments to take every engine
                    # RPC thread (64 / (RATE / 2) s) and the casts to queue
                    time.sleep(5)
                    for _ in range(3):
                        started = time.monotonic()
                        assert _round(at_a, instance, a, b) == "ABORTED"
                        assert time.monotonic() - started < BOUND
                finally:
                    flood.stop()
            out = flood.outcomes
            assert out["register_agent answered"] > 0  # casts were sent
            # the agents refused most unsigned TPM calls at once...
            for kind in ("get_identity", "quote", "activate_credential"):
                assert out[kind + " refused"] > 0, dict(out)
            # ...and no flood name got enrolled
            assert {h.name for h in operator.list_hosts().hosts} == {a, b}
            assert agents.get(a, instance).state in ("ACTIVE", "STOPPED")
            at_a.destroy_vtpcm(instance)
    finally:
        engine.stop()
        agents.transport.cleanup()
        operator.transport.cleanup()
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
