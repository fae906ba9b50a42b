"""Combine alternating ``protocol.py`` runs of two code versions into one
before/after comparison (``protocol-before-after.json``).

The runs are made beforehand, in pairs one right after the other on the
same machine (the order alternating pair by pair), each version from its
own checkout, e.g.::

    (cd OLD && PYTHONPATH=$PWD .venv/bin/python benchmarks/protocol.py \\
        --rounds 40 --out-dir RUNS/before-1)
    (cd NEW && PYTHONPATH=$PWD .venv/bin/python benchmarks/protocol.py \\
        --rounds 40 --out-dir RUNS/after-1)
    ...
    python3 benchmarks/protocol_ab.py RUNS --before before --after after \\
        --method "what was compared" --out results/protocol-before-after.json

Each ``RUNS/<arm>-<pair>/protocol.json`` is read; steps and floors are
pooled over all pairs (medians, p95, after/before of the pooled medians),
and the ratio of each pair's medians is kept with its median (the figure
least moved by the machine's load drifting between pairs). Also pooled:
the per-step span breakdown (median over pairs of each span's median ms
per step). Any Python 3.11, no third-party imports.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

KEYS = ("check", "begin", "commit", "abort", "check_begin_commit", "shred_after_answer",
        "rpc_agent_health", "rpc_engine_get_vtpcm", "swtpm_start", "zgen", "seal")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def load(runs: Path, arm: str) -> dict[int, dict[str, Any]]:
    found = {}
    for path in sorted(runs.glob("%s-*/protocol.json" % arm)):
        pair = int(path.parent.name.rsplit("-", 1)[1])
        found[pair] = json.loads(path.read_text())
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--before", default="before")
    parser.add_argument("--after", default="after")
    parser.add_argument("--method", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    before, after = load(args.runs, args.before), load(args.runs, args.after)
    pairs = sorted(set(before) & set(after))
    if not pairs:
        print("no complete pair in %s" % args.runs, file=sys.stderr)
        return 1
    runs, pooled, per_pair = [], {}, []
    for pair in pairs:
        for name, result in (("before", before[pair]), ("after", after[pair])):
            m = result["machine"]
            runs.append({"pair": pair, "arm": name, "date_utc": m["date_utc"],
                         "loadavg_start": m["loadavg_start"],
                         "loadavg_end": m.get("loadavg_end"), "git_head": m.get("git_head"),
                         "medians_ms": {k: statistics.median(v) for k, v in
                                        result["samples_ms"].items() if v}})
        ratio: dict[str, Any] = {"pair": pair}
        for key in KEYS:
            b, a = before[pair]["samples_ms"].get(key), after[pair]["samples_ms"].get(key)
            if b and a:
                ratio[key] = round(statistics.median(a) / statistics.median(b), 3)
        per_pair.append(ratio)
    for key in KEYS:
        b = [x for p in pairs for x in before[p]["samples_ms"].get(key, [])]
        a = [x for p in pairs for x in after[p]["samples_ms"].get(key, [])]
        if b and a:
            pooled[key] = {"before_median": round(statistics.median(b), 2),
                           "after_median": round(statistics.median(a), 2),
                           "before_p95": round(p95(b), 2), "after_p95": round(p95(a), 2),
                           "after_over_before": round(statistics.median(a)
                                                      / statistics.median(b), 3),
                           "n_before": len(b), "n_after": len(a)}
    spans: dict[str, dict[str, dict[str, float]]] = {}
    for step in ("check", "begin", "commit", "abort"):
        spans[step] = {}
        for name, arm in (("before", before), ("after", after)):
            labels = {lab for p in pairs for lab in arm[p]["breakdown"].get(step, {})}
            spans[step][name] = {
                lab: round(statistics.median(
                    arm[p]["breakdown"][step][lab]["ms_median"] for p in pairs
                    if lab in arm[p]["breakdown"].get(step, {})), 2)
                for lab in sorted(labels)}
            spans[step][name + "_count"] = {
                lab: statistics.median(
                    arm[p]["breakdown"][step][lab]["count"] for p in pairs
                    if lab in arm[p]["breakdown"].get(step, {}))
                for lab in sorted(labels)}
    result = {"benchmark": "protocol-before-after", "method": args.method,
              "pairs": pairs, "runs": runs, "pooled": pooled, "per_pair_ratio": per_pair,
              "per_pair_ratio_median": {
                  key: statistics.median(r[key] for r in per_pair if key in r)
                  for key in KEYS if any(key in r for r in per_pair)},
              "breakdown_medians_ms": spans}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for key, v in pooled.items():
        print("%-20s before %7.1f (%7.1f)  after %7.1f (%7.1f)  ratio %.3f  pairs %.3f"
              % (key, v["before_median"], v["before_p95"], v["after_median"], v["after_p95"],
                 v["after_over_before"], result["per_pair_ratio_median"].get(key, 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
