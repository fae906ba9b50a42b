"""Attestation round trip through the real services, and verifier throughput.

One engine daemon and one agent daemon on the local RabbitMQ, a swtpm
standing in for the host TPM. Measures ``EngineAPI.attest`` (nonce, RPC to
the agent, TPM quote, RPC back, verification, verdict stored) N times, and
``verifier.verify_quote`` alone on one core. Writes JSON to stdout or --out.
First measurements for the benchmark issue; no targets are asserted here.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import uuid

from vtpcm_common import concurrency

# Native threads, as the daemons run: before anything imports oslo.messaging
# (which would otherwise select oslo.service's eventlet backend, and then
# vtpcm_lab's own use_native_threads() raises BackendAlreadySelected).
concurrency.use_native_threads()

from vtpcm_agent import keyauth  # noqa: E402
from vtpcm_agent.hosttpm import HostTPM  # noqa: E402
from vtpcm_common.api.agent.rpcapi import AgentAPI  # noqa: E402
from vtpcm_common.api.engine.rpcapi import EngineAPI  # noqa: E402
from vtpcm_lab import daemons  # noqa: E402
from vtpcm_lab.hosttpm import BOOT_PCRS, HostTPMStandIn, measured_boot  # noqa: E402
from vtpcm_nova.engine import verifier  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--out")
    args = parser.parse_args()
    load_start = list(os.getloadavg())
    work = daemons.short_dir("vtbench")
    exchange = "vtpcm-bench-" + uuid.uuid4().hex[:6]
    conf = daemons.client_conf(exchange)
    tpm = HostTPMStandIn(work / "tpm", name="bench")
    tpm.start()
    started: list[daemons.Daemon] = []
    try:
        measured_boot(tpm.tcti)
        agent = daemons.AgentDaemon(work, "bench-host", exchange, tpm.tcti,
                                    run_dir=work / "run",
                                    extra={"agent": {"register_with_engine": "false"}})
        engine = daemons.EngineDaemon(work, exchange, "sqlite:///%s/e.sqlite" % work,
                                      extra={"DEFAULT": {"debug": "false"}})
        for daemon in (agent, engine):
            daemon.start()
            started.append(daemon)
        agent.wait_ready(AgentAPI(conf))
        api = EngineAPI(conf)
        engine.wait_ready(api)
        api.enroll("bench-host")
        api.record_policy("bench", "bench-host", BOOT_PCRS)
        api.assign_policy("bench-host", "bench")
        rtt = []
        for _ in range(args.n):
            start = time.perf_counter()
            verdict = api.attest("bench-host")
            rtt.append((time.perf_counter() - start) * 1000)
            assert verdict.status == "TRUSTED", verdict
        # the agent's keys need its host key; a key of the same kind does for timing
        with HostTPM(tpm.tcti, keyauth.derive(os.urandom(32))) as host_tpm:
            ident = host_tpm.identity(os.urandom(32))
            nonce = os.urandom(32)
            quote = host_tpm.quote(nonce, BOOT_PCRS)
        ak = verifier.load_ak(ident.ak_public)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 3.0:
            verifier.verify_quote(ak, quote.attest, quote.signature, nonce, quote.pcr_values)
            count += 1
        per_second = count / (time.perf_counter() - start)
        # what the engine runs per attestation: the enrolled AK (loaded,
        # cached), the quote, the policy decision against the last clock
        policy = verifier.PolicySpec("bench", "sha256", dict(quote.pcr_values))
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 3.0:
            evidence = verifier.verify_quote(verifier.load_ak(ident.ak_public), quote.attest,
                                             quote.signature, nonce, quote.pcr_values)
            verdict = verifier.evaluate(evidence, policy, verifier.clock_state(evidence))
            count += 1
        assert verdict.trusted, verdict
        full_per_second = count / (time.perf_counter() - start)
    finally:
        for daemon in reversed(started):
            daemon.stop()
        tpm.cleanup()
        # the work directory and this exchange's keys, as the tests' deployment does
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "attestation_rtt",
        "n": args.n,
        "attest_ms": {"p50": statistics.median(rtt), "p95": percentile(rtt, 0.95),
                      "min": min(rtt), "max": max(rtt)},
        "verify_quote_per_second_one_core": per_second,
        "load_ak_verify_evaluate_per_second_one_core": full_per_second,
        "machine": {"loadavg_start": load_start, "loadavg_end": list(os.getloadavg())},
        "pcrs": list(BOOT_PCRS),
    }
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
