"""Pool alternating ``nova_real_lm.py`` runs of two settings into one A/B.

The runs are made one after the other on the same machine, the arms
alternating (``A-1``, ``B-1``, ``A-2``, ``B-2``, ...), e.g. the early begin
on and off::

    nova_real_lm.py --hops 6 --label ab-on-1 --early-begin-timeout 60
    nova_real_lm.py --hops 6 --label ab-off-1 --early-begin-timeout 0
    ...
    python3 benchmarks/nova_real_ab.py results --arms on,off --prefix nova-real-lm-ab \\
        --out results/nova-real-lm-ab.json

Each ``<prefix>-<arm>-<n>.json`` is read. Per run and pooled over an arm's
runs: summaries of ``cli_to_active_ms`` and of every span for the vTPCM and
the plain server, and of the paired differences (the same hop's vTPCM minus
plain: the plain server is the run's own control for the machine's load).
``a_minus_b``: per metric, the first arm's pooled paired median minus the
second's, with a bootstrap 95 % interval (pairs resampled within each arm,
fixed seed) and the same difference run pair by run pair (``A-n`` minus
``B-n``). Any Python 3.11, no third-party imports.
"""

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

BOOTSTRAP = 2000
SEED = 11


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "median": statistics.median(values), "p95": p95(values),
            "min": min(values), "max": max(values)}


def _value(sample: dict[str, Any], metric: str) -> float | None:
    if metric == "cli_to_active_ms":
        return float(sample[metric])
    found = sample.get("phases_ms", {}).get(metric)
    return None if found is None else float(found)


def metrics_of(samples: list[dict[str, Any]]) -> list[str]:
    return ["cli_to_active_ms"] + sorted({k for s in samples for k in s.get("phases_ms", {})})


def values(samples: list[dict[str, Any]], metric: str) -> dict[str, list[float]]:
    """Per server arm (``vtpcm``, ``plain``) and ``paired`` (same hop, vTPCM - plain)."""
    out: dict[str, list[float]] = {"vtpcm": [], "plain": [], "paired": []}
    by_hop: dict[tuple[int, str], float] = {}
    for s in samples:
        v = _value(s, metric)
        if v is not None:
            out[s["arm"]].append(v)
            by_hop[(s["hop"], s["arm"])] = v
    for (hop, arm), v in sorted(by_hop.items()):
        if arm == "vtpcm" and (hop, "plain") in by_hop:
            out["paired"].append(v - by_hop[(hop, "plain")])
    return out


def _bootstrap(a: list[float], b: list[float]) -> list[float]:
    """95 % interval of median(a) - median(b), each resampled with replacement."""
    rng = random.Random(SEED)
    diffs = sorted(statistics.median(rng.choices(a, k=len(a)))
                   - statistics.median(rng.choices(b, k=len(b))) for _ in range(BOOTSTRAP))
    return [diffs[int(0.025 * BOOTSTRAP)], diffs[int(0.975 * BOOTSTRAP) - 1]]


def pool(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """``runs[arm][n]``: the JSON of run ``n`` of ``arm``; two arms, first minus second."""
    arms = list(runs)
    every = [s for by_n in runs.values() for r in by_n.values() for s in r["samples"]]
    out: dict[str, Any] = {"arms": arms, "runs": {}, "pooled": {}, "a_minus_b": {}}
    for arm, by_n in runs.items():
        for n, result in sorted(by_n.items()):
            loads = [s["loadavg_1m"] for s in result["samples"]]
            out["runs"]["%s-%d" % (arm, n)] = {
                "date_utc": result.get("machine", {}).get("date_utc"),
                "loadavg_1m": summary(loads),
                "metrics": {m: {k: summary(v) for k, v in values(result["samples"], m).items()}
                            for m in metrics_of(result["samples"])}}
    for metric in metrics_of(every):
        per_arm = {}
        for arm, by_n in runs.items():
            pooled: dict[str, list[float]] = {"vtpcm": [], "plain": [], "paired": []}
            for result in by_n.values():
                for k, v in values(result["samples"], metric).items():
                    pooled[k] += v
            per_arm[arm] = pooled
            out["pooled"].setdefault(metric, {})[arm] = {k: summary(v)
                                                         for k, v in pooled.items()}
        row: dict[str, Any] = {}
        for kind in ("vtpcm", "plain"):
            a, b = per_arm[arms[0]][kind], per_arm[arms[1]][kind]
            if a and b:
                row[kind + "_median_diff"] = statistics.median(a) - statistics.median(b)
        if row:
            out["a_minus_b"][metric] = row
        a, b = per_arm[arms[0]]["paired"], per_arm[arms[1]]["paired"]
        if not (a and b):
            continue
        by_pair = []
        for n in sorted(set(runs[arms[0]]) & set(runs[arms[1]])):
            pa = values(runs[arms[0]][n]["samples"], metric)["paired"]
            pb = values(runs[arms[1]][n]["samples"], metric)["paired"]
            if pa and pb:
                by_pair.append(statistics.median(pa) - statistics.median(pb))
        row.update(paired_median_diff=statistics.median(a) - statistics.median(b),
                   bootstrap_95=_bootstrap(a, b), by_run_pair=by_pair)
    return out


def load(directory: Path, prefix: str, arm: str) -> dict[int, dict[str, Any]]:
    found = {}
    for path in directory.glob("%s-%s-*.json" % (prefix, arm)):
        tail = path.stem.rsplit("-", 1)[1]
        if tail.isdigit():
            found[int(tail)] = json.loads(path.read_text())
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--arms", default="on,off", help="A,B: A minus B")
    parser.add_argument("--prefix", default="nova-real-lm-ab")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    runs = {arm: load(args.dir, args.prefix, arm) for arm in arms}
    if len(arms) != 2 or not all(runs.values()):
        print("need runs of two arms, found %s" % {a: sorted(r) for a, r in runs.items()},
              file=sys.stderr)
        return 2
    result = pool(runs)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("%s minus %s, ms: medians of the vTPCM's and plain's values, of the paired "
          "differences (95 %% bootstrap), and of each run pair's paired medians" % tuple(arms))
    for metric, row in result["a_minus_b"].items():
        text = "%-30s vtpcm %+6.0f" % (metric, row["vtpcm_median_diff"])
        if "plain_median_diff" in row:
            text += "  plain %+6.0f" % row["plain_median_diff"]
        if "paired_median_diff" in row:
            text += "  paired %+6.0f [%+.0f, %+.0f]  by pair %s" % (
                row["paired_median_diff"], *row["bootstrap_95"],
                " ".join("%+.0f" % d for d in row["by_run_pair"]))
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
