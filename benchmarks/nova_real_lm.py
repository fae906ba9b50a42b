"""Live migration on real Nova 34: a ``vtpcm.small`` and a plain server, interleaved.

The real-Nova lab (``vtpcm_lab.nova``: placement, glance, nova-api,
conductor, scheduler with ``VTPCMFilter``, two nova-computes with this
project's driver) boots one server of each flavor and live-migrates both
back and forth through the unmodified ``openstack`` CLI, ``--hops`` times
each, the order within a hop alternating. Per migration:

* ``cli_to_active_ms``: the CLI call until the server is out of MIGRATING
  with no task state (``vtpcm_lab.nova.servers.live_migrate``, polled
  every 0.3 s), what an operator waits;
* ``phases_ms``: spans read from the logs' timestamps (both nova-computes,
  the conductor, the engine), see ``nova_real_phases.py``;

and, per arm, their summaries, and ``comparison``: medians, the ratio
vTPCM/plain and the paired differences (the same hop's vTPCM minus plain:
the figure to quote on a busy machine).

Needs root, the lab lock (``flock /tmp/vtpcm-lab.lock``, taken here unless
an ancestor holds it), RabbitMQ, MariaDB and the services' venv
(``tools/install-nova-services.sh``; ``VTPCM_NOVA_SVC_VENV`` picks another,
e.g. one holding an older driver for a before/after run).

    .venv/bin/python benchmarks/nova_real_lm.py [--hops 6] [--label after] [--out-dir DIR]
        [--early-begin-timeout S]

``--early-begin-timeout`` sets both nova-computes' ``[vtpcm]
early_begin_timeout`` (0: no early begin, the begin runs in
``live_migration`` only; unset: the driver's default), for an A/B of the
early begin on one services venv; the JSON records it.

Writes ``nova-real-lm[-LABEL].json`` and keeps the run's Nova, engine and
agent logs under ``--logs-dir`` (default ``/tmp/nova-real-lm-logs[-LABEL]``).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
import nova_real_phases as phases

LOCK_TIMEOUT = 3600.0
ARMS = ("vtpcm", "plain")


def compute_options(early_begin_timeout: float | None) -> dict[str, dict[str, str]]:
    """What the run adds to the nova-computes' files (``NovaLab(compute_options=)``)."""
    if early_begin_timeout is None:
        return {}
    return {"vtpcm": {"early_begin_timeout": repr(float(early_begin_timeout))}}


def _hops(lab: Any, hops: int) -> list[dict[str, Any]]:
    from vtpcm_lab.nova import servers
    from vtpcm_lab.nova.cloud import PLAIN_FLAVOR, VTPCM_FLAVOR

    ids = {}
    for arm, flavor in (("vtpcm", VTPCM_FLAVOR), ("plain", PLAIN_FLAVOR)):
        started = time.monotonic()
        ids[arm] = servers.create(lab, "bench-" + arm, flavor)["id"]
        benchlib.progress("%s server %s ACTIVE in %.1f s"
                          % (arm, ids[arm], time.monotonic() - started))
    samples = []
    for hop in range(1, hops + 1):
        order = ARMS if hop % 2 else ARMS[::-1]
        for arm in order:
            before = servers.show(lab, ids[arm])
            wall_start = time.time()
            mig = servers.live_migrate(lab, ids[arm])
            wall_end = time.time()
            record = servers.last_migration(lab, ids[arm]) or {}
            sample = {"arm": arm, "hop": hop, "instance": ids[arm],
                      "migration": record.get("uuid"), "status": mig.status,
                      "source": servers.host_of(before), "dest": mig.host,
                      "wall_start": wall_start, "wall_end": wall_end,
                      "cli_to_active_ms": mig.seconds * 1000.0,
                      "loadavg_1m": os.getloadavg()[0]}
            samples.append(sample)
            benchlib.progress("hop %d %-5s %s -> %s %s in %.2f s"
                              % (hop, arm, sample["source"], sample["dest"], mig.status,
                                 mig.seconds))
            if mig.status != "completed" or mig.host == sample["source"]:
                raise RuntimeError("migration of %s %s: %s, on %s"
                                   % (arm, ids[arm], mig.status, mig.host))
    for server_id in ids.values():
        servers.delete(lab, server_id)
    return samples


def _keep_logs(lab: Any, dest: Path) -> dict[str, str]:
    """Copy the run's logs; the roles ``nova_real_phases`` reads, by file name."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    roles: dict[str, str] = {}
    layout = lab.layout
    for host in layout.computes:
        name = "nova-compute-%s.log" % host.name
        shutil.copy(host.log_file, dest / name)
        roles["compute:" + host.name] = name
    for name in ("nova-conductor", "nova-scheduler"):
        src = layout.logs / ("%s.log" % name)
        if src.exists():
            shutil.copy(src, dest / src.name)
            roles[name] = src.name
    for path in lab.log_files():
        if path.name.startswith(("engine", "agent")) and path.parent.name != dest.name:
            target = dest / ("%s-%s" % (path.parent.name, path.name))
            shutil.copy(path, target)
            roles.setdefault(path.name.split(".")[0], target.name)
    return roles


def compare(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per arm, ratio, difference of medians and paired differences."""
    out: dict[str, Any] = {}
    metrics = ["cli_to_active_ms"] + sorted({k for s in samples
                                             for k in s.get("phases_ms", {})})
    for metric in metrics:
        per = {arm: [s[metric] if metric == "cli_to_active_ms" else s["phases_ms"].get(metric)
                     for s in samples if s["arm"] == arm] for arm in ARMS}
        per = {arm: [v for v in vals if v is not None] for arm, vals in per.items()}
        row: dict[str, Any] = {arm: benchlib.summary(vals) if vals else None
                               for arm, vals in per.items()}
        if per["vtpcm"] and per["plain"]:
            v, p = statistics.median(per["vtpcm"]), statistics.median(per["plain"])
            row["added_ms"] = v - p
            row["ratio_vtpcm_over_plain"] = v / p if p else None
        paired = []
        by_hop = {(s["hop"], s["arm"]): s for s in samples}
        for (hop, arm), s in by_hop.items():
            other = by_hop.get((hop, "plain"))
            if arm != "vtpcm" or other is None:
                continue
            a = s[metric] if metric == "cli_to_active_ms" else s["phases_ms"].get(metric)
            b = (other[metric] if metric == "cli_to_active_ms"
                 else other["phases_ms"].get(metric))
            if a is not None and b is not None:
                paired.append(a - b)
        row["paired_added_ms"] = benchlib.summary(paired) if paired else None
        out[metric] = row
    return out


def _analyse(result: dict[str, Any], logs: Path) -> None:
    for sample in result["samples"]:
        sample["phases_ms"] = phases.phases(logs, result["log_roles"], sample)
    result["comparison"] = compare(result["samples"])
    result["metrics"] = phases.METRICS


def _reparse(path: Path, logs_dir: str | None) -> int:
    result = json.loads(path.read_text())
    logs = Path(logs_dir or result["logs_dir"])
    _analyse(result, logs)
    benchlib.write_json(path, result, rewrite=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=6)
    parser.add_argument("--label", default="", help="suffix of the result files")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--smoke", action="store_true", help="1 hop each, results/smoke/")
    parser.add_argument("--logs-dir", default=None,
                        help="where the run's logs are kept (default /tmp/nova-real-lm-logs"
                             "[-LABEL])")
    parser.add_argument("--early-begin-timeout", type=float, default=None, metavar="S",
                        help="the nova-computes' [vtpcm] early_begin_timeout (0: no early "
                             "begin; default: the driver's)")
    parser.add_argument("--reparse", metavar="JSON",
                        help="read the phases again from the kept logs of an earlier run "
                             "and rewrite its JSON (no lab)")
    args = parser.parse_args(argv)
    if args.reparse:
        return _reparse(Path(args.reparse), args.logs_dir)
    if os.geteuid() != 0:
        print("nova_real_lm needs root (the lab)", file=sys.stderr)
        return 2
    hops = 1 if args.smoke else args.hops
    out = benchlib.out_dir(args.smoke, args.out_dir)
    suffix = "-" + args.label if args.label else ""
    from vtpcm_lab import lablock
    from vtpcm_lab.nova.cloud import NovaLab

    options = compute_options(args.early_begin_timeout)
    lab = NovaLab(compute_options=options)
    result: dict[str, Any] = {"benchmark": "nova-real-lm", "label": args.label,
                              "hops": hops, "services_venv": str(lab.venv),
                              "compute_options": options,
                              "early_begin_timeout": args.early_begin_timeout}
    logs = Path(args.logs_dir or "/tmp/nova-real-lm-logs" + suffix)  # noqa: S108
    with lablock.hold(timeout=LOCK_TIMEOUT):
        started = time.monotonic()
        try:
            lab.up()
            result["lab_up_s"] = time.monotonic() - started
            benchlib.progress("lab up in %.1f s" % result["lab_up_s"])
            samples = _hops(lab, hops)
        finally:
            try:
                roles = _keep_logs(lab, logs) if lab.layout is not None else {}
            finally:
                lab.down()
    result.update(log_roles=roles, logs_dir=str(logs), samples=samples)
    _analyse(result, logs)
    benchlib.write_json(out / ("nova-real-lm%s.json" % suffix), result)
    row = result["comparison"]["cli_to_active_ms"]
    benchlib.progress("CLI to ACTIVE, median: vTPCM %.0f ms, plain %.0f ms, ratio %.2f, "
                      "paired added median %.0f ms"
                      % (row["vtpcm"]["median"], row["plain"]["median"],
                         row["ratio_vtpcm_over_plain"], row["paired_added_ms"]["median"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
