"""Agent scale: N vTPCMs on one vtpcm-agent, no QEMU.

One real agent daemon (its host TPM a swtpm stand-in) on RabbitMQ creates
and starts N vTPCMs one after the other through its signed RPC API
(``create`` then ``start``: state dir, keys sealed to the host TPM, swtpm
started and initialised), as the engine would for N guests. At checkpoints
it records the agent's RSS, every swtpm's RSS and PSS (proportional:
shared library pages split among the processes), and the time of an agent
``health`` and ``list`` call; at some checkpoints the agent is restarted
(SIGTERM: its swtpm processes keep running) and the re-adoption is timed:
``recover_s`` (the agent's own ``Recovered: ... in X s`` log line: finding
each vTPCM's swtpm by its pid file) and ``restart_to_serving_s`` (process
start to the first answered ``health``: interpreter, config, host TPM,
recovery, RPC server), and every vTPCM must then be listed running.

    .venv/bin/python benchmarks/agent_scale.py [-n 200] [--smoke] [--out-dir DIR]

Writes ``agent-scale.json``; ``plot_agent_scale.py`` draws ``agent-scale.png``.
"""

import argparse
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import benchlib


def _rss_kib(pid: int) -> dict[str, int]:
    """Rss and Pss (KiB) of one process, from /proc/<pid>/smaps_rollup."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/%d/smaps_rollup" % pid).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower() + "_kib"] = int(rest.split()[0])
    return out


def _swtpm_pids(run_dir: Path) -> list[int]:
    """The running swtpm processes whose pid files are in ``run_dir``."""
    pids = []
    for pidfile in run_dir.glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip() or 0)
            if b"swtpm" in Path("/proc/%d/cmdline" % pid).read_bytes():
                pids.append(pid)
        except (OSError, ValueError):
            continue
    return pids


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - start) * 1e3


RECOVERED = re.compile(r"Recovered: (\d+) adopted, (\d+) crashed, .* in ([0-9.]+) s")


def _restart(agent: Any, api: Any, host: str, expect: int) -> dict[str, Any]:
    """Stop the agent (swtpm keep running), start it, time the re-adoption."""
    from vtpcm_lab import daemons

    agent.stop()
    log_before = len(agent.log_text())
    start = time.monotonic()
    agent.start()
    deadline = start + 120.0
    while True:
        if agent.proc is None or agent.proc.poll() is not None:
            raise RuntimeError("agent exited on restart:\n%s" % agent.log_text()[-3000:])
        try:
            if api.health(host, timeout=1):
                break
        except Exception:  # noqa: BLE001,S112 - not serving yet: poll again
            if time.monotonic() > deadline:
                raise
            continue
    serving = time.monotonic() - start
    match = None
    daemons.wait_for("recovery log line", lambda: bool(
        RECOVERED.search(agent.log_text()[log_before:])), 10.0)
    match = RECOVERED.search(agent.log_text()[log_before:])
    assert match is not None
    listed = api.list(host).vtpcms
    running = sum(1 for info in listed if info.running)
    if int(match.group(1)) != expect or running != expect:
        raise RuntimeError("after the restart %s of %d vTPCMs adopted, %d listed running"
                           % (match.group(1), expect, running))
    return {"n": expect, "recover_s": float(match.group(3)),
            "restart_to_serving_s": serving, "adopted": int(match.group(1)),
            "crashed": int(match.group(2)), "running_after": running}


def run(n: int, checkpoints: list[int], restarts: set[int]) -> dict[str, Any]:
    from vtpcm_common.api.agent.rpcapi import AgentAPI
    from vtpcm_lab import daemons
    from vtpcm_lab.hosttpm import HostTPMStandIn

    work = daemons.short_dir("vtscale")
    exchange = "vtpcm-bench-" + uuid.uuid4().hex[:8]
    host = "scale-" + uuid.uuid4().hex[:6]
    api = AgentAPI(daemons.client_conf(exchange), timeout=60)
    tpm = HostTPMStandIn(work / "hosttpm", name=host)
    run_dir = work / "run"
    agent = daemons.AgentDaemon(
        work, host, exchange, tpm.tcti, run_dir=run_dir,
        extra={"DEFAULT": {"debug": "false"},  # production logging
               "agent": {"register_with_engine": "false"}})
    creates: list[dict[str, float]] = []
    points: list[dict[str, Any]] = []
    readoptions: list[dict[str, Any]] = []
    try:
        tpm.start()
        agent.start()
        agent.wait_ready(api)
        benchlib.progress("agent %s up (pid %s); creating %d vTPCMs" % (host, agent.pid, n))
        t_all = time.monotonic()
        for i in range(1, n + 1):
            instance = str(uuid.uuid4())
            _, create_ms = _timed(lambda inst=instance: api.create(host, inst))
            info, start_ms = _timed(lambda inst=instance: api.start(host, inst))
            if not info.running:
                raise RuntimeError("vTPCM %d not running after start" % i)
            creates.append({"i": i, "create_ms": create_ms, "start_ms": start_ms,
                            "total_ms": create_ms + start_ms})
            if i in checkpoints:
                swtpms = [_rss_kib(pid) for pid in _swtpm_pids(run_dir)]
                if len(swtpms) != i:
                    raise RuntimeError("%d swtpm processes for %d vTPCMs" % (len(swtpms), i))
                _, health_ms = _timed(lambda: api.health(host))
                listed, list_ms = _timed(lambda: api.list(host))
                point = {
                    "n": i, "elapsed_s": time.monotonic() - t_all,
                    "agent": _rss_kib(agent.pid),
                    "swtpm_rss_kib": benchlib.summary([s["rss_kib"] for s in swtpms]),
                    "swtpm_pss_kib": benchlib.summary([s["pss_kib"] for s in swtpms]),
                    "swtpm_pss_total_kib": sum(s["pss_kib"] for s in swtpms),
                    "health_ms": health_ms, "list_ms": list_ms,
                    "listed": len(listed.vtpcms),
                    "create_start_ms_last": benchlib.summary(
                        [c["total_ms"] for c in creates[-min(len(creates), 10):]]),
                }
                points.append(point)
                benchlib.progress(
                    "n=%d: %.0f s so far, create+start %.0f ms (last 10 median), agent RSS "
                    "%.0f MiB, swtpm RSS %.1f MiB / PSS %.1f MiB each (median)" % (
                        i, point["elapsed_s"], point["create_start_ms_last"]["median"],
                        point["agent"].get("rss_kib", 0) / 1024,
                        point["swtpm_rss_kib"]["median"] / 1024,
                        point["swtpm_pss_kib"]["median"] / 1024))
            if i in restarts:
                r = _restart(agent, api, host, i)
                readoptions.append(r)
                benchlib.progress("n=%d: agent restart: recovery %.3f s, serving again after "
                                  "%.2f s, %d running" % (i, r["recover_s"],
                                                          r["restart_to_serving_s"],
                                                          r["running_after"]))
        total_s = time.monotonic() - t_all
    finally:
        # agent first: its watchdog would report the swtpm killed below
        agent.stop()
        daemons.kill_pidfiles(run_dir)
        tpm.cleanup()
        api.transport.cleanup()
        log = agent.log_text()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return {"n": n, "creates": creates, "checkpoints": points, "readoptions": readoptions,
            "create_total_s": total_s,
            "create_ms": benchlib.summary([c["create_ms"] for c in creates]),
            "start_ms": benchlib.summary([c["start_ms"] for c in creates]),
            "create_start_ms": benchlib.summary([c["total_ms"] for c in creates]),
            "agent_log_errors": sum(1 for line in log.splitlines() if " ERROR " in line)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="n=3, one restart: that it runs")
    parser.add_argument("--out-dir")
    args = parser.parse_args()
    n = 3 if args.smoke else args.n
    if n < 1:
        print("agent_scale.py: -n must be at least 1", file=sys.stderr)
        return 2
    checkpoints = sorted({c for c in (1, 10, 25, 50, 100, 150, 200, n) if c <= n})
    restarts = {c for c in (1, 50, 100, 200, n) if c <= n}
    if args.smoke:  # every step once, the fewest restarts (each ~1 s)
        checkpoints, restarts = [1, n], {n}
    from vtpcm_lab import daemons  # noqa: F401 - selects oslo's threading backend first

    # bench.sh's timeout sends SIGTERM: unwind, so that the finally blocks stop
    # what this run started (by pid) and release the lab
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    result: dict[str, Any] = {"benchmark": "agent-scale", "smoke": args.smoke,
                              "machine": benchlib.machine(),
                              "config": {"n": n, "checkpoints": checkpoints,
                                         "restarts_at": sorted(restarts),
                                         "agent_debug_logging": False}}
    result.update(run(n, checkpoints, restarts))
    last = result["readoptions"][-1]
    result["targets"] = [{"target": "re-adoption of all %d vTPCMs after an agent restart "
                                    "<= 2 s" % n,
                          "measured_recover_s": last["recover_s"],
                          "measured_restart_to_serving_s": last["restart_to_serving_s"],
                          "met": last["restart_to_serving_s"] <= 2.0}]
    out = benchlib.out_dir(args.smoke, args.out_dir)
    benchlib.write_json(out / "agent-scale.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
