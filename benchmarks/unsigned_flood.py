"""Migrations while a broker client floods the unsigned endpoints (issue 9 point 3).

One engine daemon, two agent daemons with swtpm host TPMs, RabbitMQ. Host
A's or B's Nova driver (its host command key) migrates a vTPCM to the
other host, whole (engine: begin re-attests the destination, transfer_state
moves the state, commit; agents: seal, ECDH_ZGen and prepare_incoming,
export, import, commit on both and the source's shred), one way then back:
the operation measured. Arms,
interleaved round by round (order rotated): ``quiet`` and ``flood``, the
latter while ``vtpcm_lab.flood`` throws ``--rate`` calls per second at each
unsigned endpoint (register_agent casts for random names and for silent
agents' names, get_identity, quote, activate_credential to both agents,
attest to the engine) from a client with broker credentials only.

Writes ``unsigned-flood.json``: calls thrown per second and their outcomes,
migrations completed per arm and their latency. Measures; asserts nothing
(tests/functional/engine/test_unsigned_flood.py is the test).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vtpcm_common import concurrency  # noqa: E402

concurrency.use_native_threads()  # before oslo.messaging is imported

import benchlib  # noqa: E402

from vtpcm_common import authn  # noqa: E402
from vtpcm_common.api.agent.rpcapi import AgentAPI  # noqa: E402
from vtpcm_common.api.engine.rpcapi import EngineAPI  # noqa: E402
from vtpcm_lab import daemons  # noqa: E402
from vtpcm_lab.flood import DEFAULT_WORKERS, Flood, SilentAgents  # noqa: E402
from vtpcm_lab.hosttpm import HostTPMStandIn  # noqa: E402

ENGINE_RPC_TIMEOUT = 30


def _migrate(at_source: EngineAPI, instance: str, source: str, dest: str) -> float:
    """One whole cold migration of the vTPCM, signed by the source; ms."""
    started = time.perf_counter()
    mid = str(uuid.uuid4())
    try:
        at_source.begin(mid, instance, source, dest)
        transferred = at_source.transfer_state(mid).state
        if transferred != "TRANSFERRED":
            raise RuntimeError("migration %s: transfer ended %s" % (mid, transferred))
    except Exception:
        # before the commit point (a begin that timed out may have taken
        # effect): abort, so the next round starts clean
        with contextlib.suppress(Exception):
            at_source.abort(mid, "benchmark: begin or transfer failed",
                            instance_uuid=instance)  # tombstoned if never recorded
        raise
    state = at_source.commit(mid).state
    if state != "COMMITTED":
        raise RuntimeError("migration %s ended %s" % (mid, state))
    return (time.perf_counter() - started) * 1000


def _holder(operator: EngineAPI, instance: str, last: str) -> str:
    """Where the vTPCM is after a failed migration (the engine's record)."""
    try:
        return operator.get_vtpcm(instance).host
    except Exception:  # noqa: BLE001 - the next round's begin will say
        return last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ops", type=int, default=5, help="operations per arm and round")
    parser.add_argument("--rate", type=float, default=40.0,
                        help="calls per second thrown at each unsigned endpoint")
    parser.add_argument("--warm", type=float, default=5.0,
                        help="seconds the flood runs before measuring")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.ops, args.warm = 1, 2, 2.0
    work = daemons.short_dir("vtbflood")
    exchange = "vtpcm-bflood-" + uuid.uuid4().hex[:6]
    conf = daemons.client_conf(exchange)
    rogue_conf = daemons.client_conf(exchange, signing=False)
    started: list[daemons.Daemon | HostTPMStandIn] = []
    latency: dict[str, list[float]] = {"quiet": [], "flood": []}
    failures: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    rates: list[dict[str, float]] = []
    flood_seconds = 0.0
    try:
        agents = AgentAPI(conf, timeout=30)
        names, keys = [], []
        for label in ("a", "b"):
            name = "bflood-%s-%s" % (label, uuid.uuid4().hex[:6])
            tpm = HostTPMStandIn(work / ("tpm-" + label), name=name)
            tpm.start()
            started.append(tpm)
            agent = daemons.AgentDaemon(
                work, name, exchange, tpm.tcti, run_dir=work / ("run-" + label),
                extra={"agent": {"register_with_engine": "false"},
                       "DEFAULT": {"debug": "false"}})
            agent.start()
            started.append(agent)
            agent.wait_ready(agents)
            names.append(name)
            keys.append(Path(agent.config["agent"]["state_dir"]) / "host-command.key")
        engine = daemons.EngineDaemon(work, exchange, "sqlite:///%s/e.sqlite" % work, extra={
            "DEFAULT": {"debug": "false"},
            "attestation": {"auto_approve": "true", "verdict_ttl": 3600, "interval": 0,
                            "min_unsigned_interval": 5},
            "engine": {"rpc_timeout": ENGINE_RPC_TIMEOUT}})
        engine.start()
        started.append(engine)
        operator = EngineAPI(conf, timeout=60)
        engine.wait_ready(operator)
        a, b = names
        for name in names:
            operator.enroll(name)
        operator.record_policy("bench", a, (0, 1, 2), "stand-ins")
        for name in names:
            operator.assign_policy(name, "bench")
            operator.attest(name)
        at = {name: EngineAPI(conf, operator.transport, timeout=120,
                              host_signer=authn.load_host_key(key))
              for name, key in zip(names, keys, strict=True)}
        instance = str(uuid.uuid4())
        at[a].create_vtpcm(instance, a)
        where = a

        def migrate() -> float:
            nonlocal where
            dest = b if where == a else a
            ms = _migrate(at[where], instance, where, dest)
            where = dest
            return ms

        migrate()  # warm-up
        with SilentAgents(rogue_conf, 4) as silent:
            for r in range(args.rounds):
                order = ("quiet", "flood") if r % 2 == 0 else ("flood", "quiet")
                for arm in order:
                    flood = None
                    if arm == "flood":
                        flood = Flood(rogue_conf, names, silent.names, rate=args.rate)
                        flood.start()
                        time.sleep(args.warm)
                    try:
                        for _ in range(args.ops):
                            try:
                                latency[arm].append(migrate())
                            except Exception as err:  # noqa: BLE001 - counted, reported
                                failures["%s %s" % (arm, type(err).__name__)] += 1
                                where = _holder(operator, instance, where)
                    finally:
                        if flood is not None:
                            flood.stop()
                            outcomes.update(flood.outcomes)
                            rates.append(flood.calls_per_second())
                            flood_seconds += flood.stopped - flood.started
                    benchlib.progress("round %d %s: %d ops" % (r, arm, len(latency[arm])))
        enrolled = sorted(h.name for h in operator.list_hosts().hosts)
        at[_holder(operator, instance, where)].destroy_vtpcm(instance)
        operator.transport.cleanup()
        agents.transport.cleanup()
    finally:
        for daemon in reversed(started):
            if isinstance(daemon, HostTPMStandIn):
                daemon.cleanup()
            else:
                daemon.stop()
        left = benchlib.stop_left_swtpms(work)
        if left:
            benchlib.progress("unsigned-flood: stopped vTPCM swtpm processes left behind: %s"
                              % left)
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    kinds = sorted({k for rate in rates for k in rate})
    result = {
        "benchmark": "unsigned_flood",
        "smoke": args.smoke,
        "config": {"rounds": args.rounds, "ops_per_arm_and_round": args.ops,
                   "rate_per_endpoint": args.rate, "warm_s": args.warm,
                   # threads per kind of call, spread over the hosts: 1
                   # before 2026-12-02 (results of earlier dates: one)
                   "workers_per_kind": DEFAULT_WORKERS,
                   "engine_rpc_timeout_s": ENGINE_RPC_TIMEOUT, "silent_agents": 4,
                   # "begin + abort, A -> B" before 2026-12-03
                   "operation": "begin + transfer_state + commit (a whole cold "
                                "migration), A -> B then B -> A, signed by the source"},
        "flood": {
            "seconds": round(flood_seconds, 1),
            "calls_per_second": {k: round(sum(r.get(k, 0.0) for r in rates) / len(rates), 1)
                                 for k in kinds} if rates else {},
            "outcomes": dict(sorted(outcomes.items())),
            "hosts_enrolled_after": len(enrolled),
        },
        "completed": {arm: len(v) for arm, v in latency.items()},
        "failed": dict(failures),
        "latency_ms": {arm: benchlib.summary(v) for arm, v in latency.items() if v},
    }
    if latency["quiet"] and latency["flood"]:
        result["flood_over_quiet_median"] = round(
            result["latency_ms"]["flood"]["median"] / result["latency_ms"]["quiet"]["median"], 2)
    benchlib.write_json(benchlib.out_dir(args.smoke, args.out_dir) / "unsigned-flood.json",
                        result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
