"""Benchmark "protocol": the migration protocol alone, without QEMU (issue 11 point 2).

One engine daemon (SQLite), two agent daemons with swtpm host TPMs, RabbitMQ:
the real services of the lab. A vTPCM moves A -> B -> A ... through the
signed calls the Nova driver makes: ``check_destination`` (the destination
check), ``begin`` (re-attest the destination, seal the migration key to its
TPM, prepare the incoming vTPCM), the state handed over as QEMU would (the
source agent's ``export_state`` into the destination's ``import_state``; not
counted), then ``commit`` as the driver asks it since engine API 1.11
(``shred_later``: answered once the destination is live; the source is
shredded after the answer, and each round waits, untimed, until it was). Every
``--abort-every``-th round is ``begin`` + ``abort`` instead.

In the same run, interleaved with the rounds, the floors: one agent RPC
round trip (``health``), one engine RPC round trip (``get_vtpcm``: RPC plus
one database read), one swtpm (re)start through the agent (``start`` after
``stop``, RPC included), and in this process one ECDH_ZGen on a third swtpm
host TPM and one software seal of a migration key (``sealing.seal``).
Writes ``protocol.json`` and ``protocol.png``. Asserts one thing, after every
round: the engine's holder keeps its vTPCM (``holder_problem``); a failed
run keeps its work directory (the daemons' logs).
Usage: .venv/bin/python benchmarks/protocol.py [--rounds 200] [--smoke] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vtpcm_common import concurrency  # noqa: E402

concurrency.use_native_threads()  # before oslo.messaging is imported

import benchlib  # noqa: E402

from vtpcm_agent import keyauth, sealing  # noqa: E402
from vtpcm_agent.hosttpm import HostTPM  # noqa: E402
from vtpcm_common import authn, exception, spans, tpmpublic  # noqa: E402
from vtpcm_common.api.agent.rpcapi import AgentAPI  # noqa: E402
from vtpcm_common.api.engine.rpcapi import EngineAPI  # noqa: E402
from vtpcm_lab import daemons  # noqa: E402
from vtpcm_lab.hosttpm import HostTPMStandIn  # noqa: E402

NAME = "protocol"
STEPS = ("check", "begin", "commit", "abort", "check_begin_commit")
# not a step the driver waits for: from the commit's answer until the
# engine shows the migration COMMITTED (the source's shred after the
# answer; polled, one engine RPC per poll)
AFTER = ("shred_after_answer",)
FLOORS = ("rpc_agent_health", "rpc_engine_get_vtpcm", "swtpm_start", "zgen", "seal")
TARGET_TOTAL_MS = 30.0
TARGET_BEGIN_MS = 15.0
CTX = sealing.SealContext(migration_id="m", instance_uuid="i", generation=1,
                          source_host="a", dest_host="b")


Window = tuple[str, float, float, str, str]  # step, wall start, end, source, destination


def timed(fn: Callable[[], Any], step: str | None = None, windows: list[Window] | None = None,
          hosts: tuple[str, str] = ("", "")) -> tuple[float, Any]:
    wall, start = time.time(), time.perf_counter()
    out = fn()
    took = time.perf_counter() - start
    if windows is not None and step is not None:
        windows.append((step, wall, wall + took, *hosts))
    return took * 1000, out


def holder_problem(operator: EngineAPI, agents: AgentAPI, instance: str,
                   state_dirs: dict[str, Path]) -> str | None:
    """What is wrong with the vTPCM where the engine's authority places it
    (None: nothing): its agent's record must be live at the engine's
    generation with its key store entry on disk, and the other host must
    hold no live copy. Checked after every round, outside the timed
    windows, so a lost key is caught in the round that lost it, not at a
    later ``begin``."""
    rec = operator.get_vtpcm(instance)
    held = agents.get(rec.host, instance)
    entry = state_dirs[rec.host] / "keys" / (held.vtpcm_id + ".keys")
    problems = []
    if held.state not in ("ACTIVE", "STOPPED") or held.generation != rec.generation:
        problems.append("the holder %s has it %s at generation %d, the engine says generation "
                        "%d" % (rec.host, held.state, held.generation, rec.generation))
    if not entry.exists():
        problems.append("the holder %s lost the key store entry of vTPCM %s"
                        % (rec.host, held.vtpcm_id))
    for other in state_dirs:
        if other != rec.host:
            try:
                state = agents.get(other, instance).state
            except exception.NotFound:
                continue
            if state not in ("DESTROYED",):
                problems.append("%s also holds it (%s)" % (other, state))
    return "; ".join(problems) or None


def settled(operator: EngineAPI, migration_id: str, timeout: float = 30.0) -> str | None:
    """Wait (outside the timed windows) for a commit answered SHREDDING to
    end COMMITTED: the source's shred after the answer ran. None when it
    did, else what is wrong."""
    deadline = time.monotonic() + timeout
    while True:
        state = operator.get_migration(migration_id).state
        if state == "COMMITTED":
            return None
        if time.monotonic() > deadline:
            return "migration %s still %s %d s after its commit's answer" % (
                migration_id, state, timeout)
        time.sleep(0.002)


def breakdown(span_dir: Path, roles: dict[int, str],
              windows: list[Window]) -> dict[str, Any]:
    """Per step: the spans that started inside its windows, by process
    (driver, engine, source or destination agent) and label: count and ms
    per step (median over the step's runs)."""
    spans_by_role: list[tuple[str, dict[str, Any]]] = []
    for path in span_dir.glob("*.jsonl"):
        role = roles.get(int(path.stem), "pid-" + path.stem)
        for line in path.read_text().splitlines():
            spans_by_role.append((role, json.loads(line)))
    spans_by_role.sort(key=lambda item: item[1]["at"])
    starts = [item[1]["at"] for item in spans_by_role]
    out: dict[str, Any] = {}
    for step in STEPS:
        runs = [(a, b, src, dst) for s, a, b, src, dst in windows if s == step]
        if not runs:
            continue
        per_run: list[dict[str, tuple[int, float]]] = []
        for a, b, src, dst in runs:
            got: dict[str, tuple[int, float]] = {}
            for i in range(bisect.bisect_left(starts, a), bisect.bisect_right(starts, b)):
                role, rec = spans_by_role[i]
                role = {src: "source-agent", dst: "dest-agent"}.get(role, role)
                key = "%s %s" % (role, rec["label"])
                n, ms = got.get(key, (0, 0.0))
                got[key] = (n + 1, ms + rec["ms"])
            per_run.append(got)
        keys = sorted({k for run in per_run for k in run})
        out[step] = {k: {"count": statistics.median(run.get(k, (0, 0.0))[0] for run in per_run),
                         "ms_median": statistics.median(run.get(k, (0, 0.0))[1]
                                                        for run in per_run)}
                     for k in keys}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--abort-every", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir")
    parser.add_argument("--keep-spans", help="copy the raw span files here")
    parser.add_argument("--post-import-check", choices=("on", "off"), default="on",
                        help="[engine] post_import_check (off: to measure what the "
                             "check adds to the commit; on is the default deployment)")
    parser.add_argument("--keep-work", action="store_true",
                        help="leave the work directory (daemon logs) behind")
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 4
    out_dir = benchlib.out_dir(args.smoke, args.out_dir)
    machine = benchlib.machine()
    work = daemons.short_dir("vtbproto")
    exchange = "vtpcm-bproto-" + uuid.uuid4().hex[:6]
    conf = daemons.client_conf(exchange)
    started: list[daemons.Daemon | HostTPMStandIn] = []
    samples: dict[str, list[float]] = {k: [] for k in STEPS + AFTER + FLOORS}
    windows: list[Window] = []
    span_dir = work / "spans"
    span_dir.mkdir()
    os.environ[spans.ENV] = str(span_dir)  # the daemons started below record spans
    spans.configure(str(span_dir))  # and so does this process (the driver's side)
    roles: dict[int, str] = {os.getpid(): "driver"}
    completed = False
    try:
        agents = AgentAPI(conf, timeout=30)
        names, keys = [], []
        state_dirs: dict[str, Path] = {}
        for label in ("a", "b"):
            name = "bproto-%s-%s" % (label, uuid.uuid4().hex[:6])
            tpm = HostTPMStandIn(work / ("tpm-" + label), name=name)
            tpm.start()
            started.append(tpm)
            agent = daemons.AgentDaemon(
                work, name, exchange, tpm.tcti, run_dir=work / ("run-" + label),
                extra={"agent": {"register_with_engine": "false"},
                       "DEFAULT": {"debug": "false"}})
            agent.start()
            started.append(agent)
            roles[agent.pid or 0] = "agent-" + label
            agent.wait_ready(agents)
            names.append(name)
            state_dirs[name] = Path(agent.config["agent"]["state_dir"])
            keys.append(state_dirs[name] / "host-command.key")
        engine = daemons.EngineDaemon(work, exchange, "sqlite:///%s/e.sqlite" % work, extra={
            "DEFAULT": {"debug": "false"},
            "attestation": {"auto_approve": "true", "verdict_ttl": 3600, "interval": 0},
            "engine": {"rpc_timeout": 30,
                       "post_import_check": str(args.post_import_check == "on").lower()}})
        engine.start()
        started.append(engine)
        roles[engine.pid or 0] = "engine"
        operator = EngineAPI(conf, timeout=60)
        engine.wait_ready(operator)
        for name in names:
            operator.enroll(name)
        operator.record_policy("bench", names[0], (0, 1, 2), "stand-ins")
        for name in names:
            operator.assign_policy(name, "bench")
            operator.attest(name)
        at = {name: EngineAPI(conf, operator.transport, timeout=120,
                              host_signer=authn.load_host_key(key))
              for name, key in zip(names, keys, strict=True)}
        # the in-process floors: a third host TPM for ZGen, its KEM key for seal
        zgen_standin = HostTPMStandIn(work / "tpm-z", name="bproto-z")
        zgen_standin.start()
        started.append(zgen_standin)
        zgen_tpm = HostTPM(zgen_standin.tcti, keyauth.derive(os.urandom(32)))
        kem_public = zgen_tpm.identity(b"").kem_public
        nums = tpmpublic.kem_public_key(kem_public).key.public_numbers()
        point = (nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big"))
        instance = str(uuid.uuid4())
        at[names[0]].create_vtpcm(instance, names[0])
        at[names[0]].start_vtpcm(instance)
        holder = 0
        try:
            for r in range(-2, args.rounds):  # two warm-up rounds, discarded
                src, dst = names[holder], names[1 - holder]
                api = at[src]
                record = r >= 0
                pair = ("agent-" + "ab"[holder], "agent-" + "ab"[1 - holder])
                mid = str(uuid.uuid4())
                if r % args.abort_every == args.abort_every - 1:
                    api.begin(mid, instance, src, dst)
                    ms, info = timed(partial(api.abort, mid, "benchmark"), "abort",
                                     windows if record else None, pair)
                    assert info.state == "ABORTED", info
                    if record:
                        samples["abort"].append(ms)
                else:
                    check_ms, verdict = timed(partial(api.check_destination, instance, dst),
                                              "check", windows if record else None, pair)
                    assert verdict.status == "TRUSTED", verdict
                    begin_ms, info = timed(partial(api.begin, mid, instance, src, dst),
                                           "begin", windows if record else None, pair)
                    assert info.state == "PREPARED", info
                    agents.import_state(dst, agents.export_state(src, instance))
                    # as the Nova driver asks it: the answer once the
                    # destination committed, the source's shred after it
                    commit_ms, info = timed(partial(api.commit, mid, shred_later=True),
                                            "commit", windows if record else None, pair)
                    assert info.state in ("COMMITTED", "SHREDDING"), info
                    # untimed, before the floors (which the background shred
                    # would slow down): until the source's shred ran
                    shred_ms, late = timed(partial(settled, operator, mid)) \
                        if info.state == "SHREDDING" else (0.0, None)
                    if late:
                        raise RuntimeError("round %d (commit, migration %s): %s"
                                           % (r, mid, late))
                    holder = 1 - holder
                    if record:
                        samples["check"].append(check_ms)
                        samples["begin"].append(begin_ms)
                        samples["commit"].append(commit_ms)
                        samples["check_begin_commit"].append(check_ms + begin_ms + commit_ms)
                        samples["shred_after_answer"].append(shred_ms)
                # floors, once per round, order rotated
                here = names[holder]
                floors: list[tuple[str, Callable[[], Any]]] = [
                    ("rpc_agent_health", partial(agents.health, here)),
                    ("rpc_engine_get_vtpcm", lambda: operator.get_vtpcm(instance)),
                    ("zgen", lambda: zgen_tpm.ecdh_zgen(*point)),
                    ("seal", lambda: sealing.seal(kem_public, os.urandom(32), CTX)),
                ]
                k = r % len(floors)
                for name, fn in floors[k:] + floors[:k]:
                    ms, _ = timed(fn)
                    if record:
                        samples[name].append(ms)
                agents.stop(here, instance)
                ms, _ = timed(partial(agents.start, here, instance))
                if record:
                    samples["swtpm_start"].append(ms)
                problem = holder_problem(operator, agents, instance, state_dirs)
                if problem:
                    raise RuntimeError("round %d (%s, migration %s): %s" % (
                        r, "abort" if r % args.abort_every == args.abort_every - 1
                        else "commit", mid, problem))
                if r >= 0 and r % 10 == 9:
                    benchlib.progress("protocol: %d/%d rounds" % (r + 1, args.rounds))
        finally:
            zgen_tpm.close()
        at[names[holder]].destroy_vtpcm(instance)
        operator.transport.cleanup()
        agents.transport.cleanup()
        spans.configure(None)
        steps = breakdown(span_dir, roles, windows)
        if args.keep_spans:
            shutil.copytree(span_dir, args.keep_spans, dirs_exist_ok=True)
            (Path(args.keep_spans) / "roles.json").write_text(json.dumps(
                {"roles": roles, "windows": windows}))
        completed = True
    finally:
        for daemon in reversed(started):
            if isinstance(daemon, HostTPMStandIn):
                daemon.cleanup()
            else:
                daemon.stop()
        left = benchlib.stop_left_swtpms(work)
        if left:
            benchlib.progress("protocol: stopped vTPCM swtpm processes left behind: %s" % left)
        shutil.rmtree(daemons.signing_key_path(exchange).parent, ignore_errors=True)
        if args.keep_work or not completed:
            # a failed run keeps its daemons' logs, asked for or not
            benchlib.progress("protocol: work directory kept: %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary = {k: benchlib.summary(v) for k, v in samples.items() if v}
    total = summary.get("check_begin_commit", {}).get("median")
    begin = summary.get("begin", {}).get("median")
    result = {
        "benchmark": NAME,
        "smoke": args.smoke,
        "machine": machine,
        "config": {"rounds": args.rounds, "abort_every": args.abort_every,
                   "database": "sqlite", "logging": "INFO (debug false)",
                   "post_import_check": args.post_import_check},
        "ms": summary,
        "targets": {
            "check_begin_commit_p50": {"target_ms": TARGET_TOTAL_MS, "median_ms": total,
                                       "met": total is not None and total <= TARGET_TOTAL_MS},
            "begin_p50": {"target_ms": TARGET_BEGIN_MS, "median_ms": begin,
                          "met": begin is not None and begin <= TARGET_BEGIN_MS},
        },
        "breakdown": steps,
        "samples_ms": samples,
    }
    benchlib.write_json(out_dir / (NAME + ".json"), result)
    plot(result, out_dir / (NAME + ".png"))
    for step, parts in steps.items():
        benchlib.progress("protocol: %s, per run (median): %s" % (step, ", ".join(
            "%s %gx %.1f ms" % (k, v["count"], v["ms_median"]) for k, v in parts.items()
            if v["count"])))
    for key in STEPS + AFTER + FLOORS:
        if key in summary:
            benchlib.progress("protocol: %-22s p50 %7.1f ms  p95 %7.1f ms" % (
                key, summary[key]["median"], summary[key]["p95"]))
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    plt = benchlib.pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    keys = [k for k in STEPS + AFTER + FLOORS if result["samples_ms"].get(k)]
    ax.boxplot([result["samples_ms"][k] for k in keys], tick_labels=keys, showfliers=True,
               whis=(5, 95))
    ax.axhline(TARGET_TOTAL_MS, color="red", ls="--", lw=1, label="target check+begin+commit")
    ax.axhline(TARGET_BEGIN_MS, color="orange", ls="--", lw=1, label="target begin")
    ax.set_yscale("log")
    ax.set_ylabel("ms (box: quartiles, whiskers p5-p95)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7)
    m = result["machine"]
    ax.set_title("protocol steps and floors: %s, %s cores, %s, load %s%s" % (
        m["cpu_model"], m["nproc"], m["date_utc"],
        [round(x, 1) for x in m["loadavg_start"]], " (SMOKE)" if result["smoke"] else ""),
        fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
