"""Attestation round trip through the real services, and verifier throughput.

One engine daemon and one agent daemon on the local RabbitMQ, a swtpm
standing in for the host TPM. Measures ``EngineAPI.attest`` (nonce, RPC to
the agent, TPM quote, RPC back, verification, verdict stored) N times, and
``verifier.verify_quote`` alone on one core. Writes JSON to stdout or --out.
No targets are asserted here.

``--old-root DIR`` (A/B): a second deployment whose daemons import the code
in DIR (e.g. a worktree of the commit before a change) runs beside this
one; the two are attested alternately (ABBA...), so both see the same
machine load, and the JSON gets ``ab`` (the old arm's figures and the
ratios new/old of p50 and p95). ``--spans``: the daemons record timing
spans (``vtpcm_common.spans``); the JSON gets, per arm, the median count
and ms per attestation of each process's span labels (RPC serve, TPM
command, database commit).
"""

import argparse
import bisect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from vtpcm_common import concurrency

# Native threads, as the daemons run: before anything imports oslo.messaging
# (which would otherwise select oslo.service's eventlet backend, and then
# vtpcm_lab's own use_native_threads() raises BackendAlreadySelected).
concurrency.use_native_threads()

from vtpcm_agent import keyauth  # noqa: E402
from vtpcm_agent.hosttpm import HostTPM  # noqa: E402
from vtpcm_common import spans  # noqa: E402
from vtpcm_common.api.agent.rpcapi import AgentAPI  # noqa: E402
from vtpcm_common.api.engine.rpcapi import EngineAPI  # noqa: E402
from vtpcm_lab import daemons  # noqa: E402
from vtpcm_lab.hosttpm import BOOT_PCRS, HostTPMStandIn, measured_boot  # noqa: E402
from vtpcm_nova.engine import verifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class _Arm:
    """One deployment (swtpm host TPM, agent, engine on SQLite) whose
    daemons import the code under ``root`` (this checkout, or another
    commit's worktree for an A/B run); spans go to ``span_dir`` if given."""

    def __init__(self, name: str, root: Path, span_dir: Path | None) -> None:
        self.name, self.root, self.span_dir = name, root, span_dir
        self.work = daemons.short_dir("vtbench")
        self.exchange = "vtpcm-bench-" + uuid.uuid4().hex[:6]
        self.conf = daemons.client_conf(self.exchange)
        self.tpm = HostTPMStandIn(self.work / "tpm", name="bench")
        self.started: list[daemons.Daemon] = []
        self.api: EngineAPI | None = None
        self.pids: dict[int, str] = {}

    def _launch(self, daemon: daemons.Daemon) -> None:
        env = {"PYTHONPATH": str(self.root)}
        if self.span_dir is not None:
            self.span_dir.mkdir(parents=True, exist_ok=True)
            env[spans.ENV] = str(self.span_dir)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            daemon.write_config()
            log = open(daemon.log_file, "ab")  # noqa: SIM115 - owned by the child
            daemon.proc = subprocess.Popen(
                [sys.executable, "-m", daemon.module, "--config-file", str(daemon.config_file)],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), cwd=str(self.root))
            log.close()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.started.append(daemon)

    def start(self) -> EngineAPI:
        self.tpm.start()
        measured_boot(self.tpm.tcti)
        agent = daemons.AgentDaemon(self.work, "bench-host", self.exchange, self.tpm.tcti,
                                    run_dir=self.work / "run",
                                    extra={"agent": {"register_with_engine": "false"}})
        engine = daemons.EngineDaemon(self.work, self.exchange,
                                      "sqlite:///%s/e.sqlite" % self.work,
                                      extra={"DEFAULT": {"debug": "false"}})
        # the schema of the arm's own code (the two may differ by a migration)
        subprocess.run([sys.executable, "-c", "import sys\n"
                        "from vtpcm_nova.engine.db import migration\n"
                        "migration.db_sync(sys.argv[1])",
                        str(engine.config["engine"]["connection"])],
                       env=dict(os.environ, PYTHONPATH=str(self.root)), check=True,
                       cwd=str(self.root))
        for daemon, role in ((agent, "agent"), (engine, "engine")):
            self._launch(daemon)
            assert daemon.pid is not None
            self.pids[daemon.pid] = role
        agent.wait_ready(AgentAPI(self.conf))
        api = EngineAPI(self.conf)
        engine.wait_ready(api)
        api.enroll("bench-host")
        api.record_policy("bench", "bench-host", BOOT_PCRS)
        api.assign_policy("bench-host", "bench")
        self.api = api
        return api

    def attest_ms(self) -> tuple[float, float, float]:
        """One round trip: (wall start, wall end, ms)."""
        assert self.api is not None
        wall, start = time.time(), time.perf_counter()
        verdict = self.api.attest("bench-host")
        took = (time.perf_counter() - start) * 1000
        assert verdict.status == "TRUSTED", verdict
        return wall, time.time(), took

    def stop(self) -> None:
        for daemon in reversed(self.started):
            daemon.stop()
        self.tpm.cleanup()
        # the work directory and this exchange's keys, as the tests' deployment does
        shutil.rmtree(daemons.signing_key_path(self.exchange).parent, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)


def stats(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p95": percentile(values, 0.95),
            "min": min(values), "max": max(values)}


def span_breakdown(arm: _Arm, windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Per attestation (the spans that started inside its window), by
    process and label: median count and median ms over the attestations."""
    assert arm.span_dir is not None
    recs: list[tuple[float, str, float]] = []
    for path in arm.span_dir.glob("*.jsonl"):
        role = arm.pids.get(int(path.stem), "driver")
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            recs.append((rec["at"], "%s %s" % (role, rec["label"]), rec["ms"]))
    recs.sort()
    starts = [r[0] for r in recs]
    per_run: list[dict[str, tuple[int, float]]] = []
    for a, b in windows:
        got: dict[str, tuple[int, float]] = {}
        for i in range(bisect.bisect_left(starts, a), bisect.bisect_right(starts, b)):
            _at, key, ms = recs[i]
            n, total = got.get(key, (0, 0.0))
            got[key] = (n + 1, total + ms)
        per_run.append(got)
    keys = sorted({k for run in per_run for k in run})
    return {k: {"count": statistics.median(run.get(k, (0, 0.0))[0] for run in per_run),
                "ms_median": round(statistics.median(run.get(k, (0, 0.0))[1]
                                                     for run in per_run), 3)}
            for k in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--out")
    parser.add_argument("--old-root", help="A/B: a checkout of the code before (its "
                        "daemons run beside this one's, attestations alternate)")
    parser.add_argument("--spans", action="store_true",
                        help="record timing spans in the daemons: where each "
                             "attestation's time goes")
    args = parser.parse_args()
    load_start = list(os.getloadavg())
    span_root = Path(tempfile.mkdtemp(prefix="vtbench-spans")) if args.spans else None
    arms = [_Arm("new", ROOT, span_root / "new" if span_root else None)]
    if args.old_root:
        arms.append(_Arm("old", Path(args.old_root).resolve(),
                         span_root / "old" if span_root else None))
    started: list[_Arm] = []
    rtt: dict[str, list[float]] = {arm.name: [] for arm in arms}
    windows: dict[str, list[tuple[float, float]]] = {arm.name: [] for arm in arms}
    breakdown: dict[str, Any] = {}
    try:
        for arm in arms:
            started.append(arm)
            arm.start()
        for arm in arms:  # warm-up: first quotes build the agent's key cache
            for _ in range(3):
                arm.attest_ms()
        for i in range(args.n):
            order = arms if i % 2 == 0 else arms[::-1]
            for arm in order:
                a, b, took = arm.attest_ms()
                rtt[arm.name].append(took)
                windows[arm.name].append((a, b))
        if span_root is not None:
            breakdown = {arm.name: span_breakdown(arm, windows[arm.name]) for arm in arms}
        # the agent's keys need its host key; a key of the same kind does for timing
        tpm = arms[0].tpm
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
        for arm in reversed(started):
            arm.stop()
        if span_root is not None:
            shutil.rmtree(span_root, ignore_errors=True)
    result = {
        "benchmark": "attestation_rtt",
        "n": args.n,
        "attest_ms": stats(rtt["new"]),
        "verify_quote_per_second_one_core": per_second,
        "load_ak_verify_evaluate_per_second_one_core": full_per_second,
        "machine": {"loadavg_start": load_start, "loadavg_end": list(os.getloadavg())},
        "pcrs": list(BOOT_PCRS),
    }
    if args.old_root:
        old, new_ = stats(rtt["old"]), result["attest_ms"]
        result["ab"] = {"old_root": str(args.old_root), "interleaved": True,
                        "old_attest_ms": old,
                        "ratio_new_over_old": {k: new_[k] / old[k] for k in ("p50", "p95")}}
    if breakdown:
        result["spans_per_attestation"] = breakdown
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
