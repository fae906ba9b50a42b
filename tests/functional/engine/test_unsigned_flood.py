"""Issue 9 point 3: a broker client flooding the unsigned endpoints does not
stall the migrations of everyone else. Real engine daemon, two agent
daemons with swtpm host TPMs, RabbitMQ; the flood (``vtpcm_lab.flood``)
throws register_agent casts (random names, and names of silent agents that
never answer), unsigned get_identity/quote/activate_credential calls to both
agents and attest calls to the engine, while host A's Nova driver begins
and aborts migrations to B. Completion within generous bounds is asserted,
not timing; the figures are benchmarks/unsigned_flood.py's job."""

import time
import uuid

import pytest

from tests.functional.deploy import Spec, build
from tests.functional.harness import client_conf
from vtpcm_common.api.engine.rpcapi import EngineAPI
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
    spec = Spec("flood", engine={
        "attestation": {"auto_approve": "true", "verdict_ttl": 900, "interval": 0,
                        "min_unsigned_interval": 5},
        "engine": {"rpc_timeout": ENGINE_RPC_TIMEOUT}},
        # limits well below what a flood throws even on a loaded machine: the
        # defaults (5 calls/s, 2 activations/min) let the host TPM's own
        # work back the agents' queues up there (CI: answers took seconds,
        # every call was served within its limit, none refused). Refusals
        # cost no TPM work; the benchmark measures the defaults
        agent={"host_tpm": {"unsigned_calls_per_second": 0.5, "unsigned_calls_burst": 2,
                            "credential_activations_per_minute": 0.01}})
    with build(spec) as d:
        operator, agents = d.operator, d.agents
        a, b = d.names["a"], d.names["b"]
        rogue_conf = client_conf(d.exchange, signing=False)
        at_a = d.host_api("a", timeout=BOUND)
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
