"""Draw a PNG from one or more ``nova-real-lm*.json`` runs (e.g. before and after).

Left: every migration's CLI-to-ACTIVE time per run and arm. Right: the
median of each phase (``nova_real_phases.SPANS``), stacked, per run and arm.

    python benchmarks/plot_nova_real_lm.py RUN.json [RUN.json ...] [--out PNG]

The PNG goes next to the first JSON (same name, ``.png``) unless ``--out``.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import benchlib

PHASES = ("prechecks_ms", "pre_live_migration_ms", "to_driver_ms", "before_libvirt_ms",
          "libvirt_ms", "to_post_ms", "post_driver_ms", "to_dest_post_ms", "tail_ms")
ARMS = ("vtpcm", "plain")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.runs[0]).with_suffix(".png")
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    plt = benchlib.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5),
                                      gridspec_kw={"width_ratios": [1, 1.4]})
    labels = []
    for i, run in enumerate(runs):
        name = run.get("label") or "run %d" % (i + 1)
        for j, arm in enumerate(ARMS):
            x = i * 3 + j
            values = [s["cli_to_active_ms"] / 1000.0 for s in run["samples"]
                      if s["arm"] == arm]
            left.scatter([x] * len(values), values, s=18,
                         color="tab:red" if arm == "vtpcm" else "tab:blue")
            left.hlines(statistics.median(values), x - 0.3, x + 0.3, color="black")
            labels.append((x, "%s\n%s" % (name, arm)))
    left.set_xticks([x for x, _ in labels], [t for _, t in labels], fontsize=8)
    left.set_ylabel("CLI call to ACTIVE on the destination (s)")
    left.set_title("each live migration (bar: median)")
    left.set_ylim(bottom=0)

    bars = []
    for i, run in enumerate(runs):
        name = run.get("label") or "run %d" % (i + 1)
        for arm in ARMS:
            bars.append(("%s %s" % (name, arm), {
                p: statistics.median([s["phases_ms"][p] for s in run["samples"]
                                      if s["arm"] == arm and p in s["phases_ms"]] or [0.0])
                for p in PHASES}))
    colors = plt.get_cmap("tab10")
    for k, phase in enumerate(PHASES):
        bottoms = [sum(b[1][p] for p in PHASES[:k]) / 1000.0 for b in bars]
        right.barh([b[0] for b in bars], [b[1][phase] / 1000.0 for b in bars], left=bottoms,
                   color=colors(k), label=phase[:-3])
    right.invert_yaxis()
    right.set_xlabel("median span (s), from the logs' timestamps")
    right.set_title("where the time goes")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5)
    fig.suptitle("Real Nova 34 live migration, vtpcm.small vs plain.small, interleaved "
                 "(%s)" % ", ".join("%s: %d hops" % (r.get("label") or "run", r["hops"])
                                     for r in runs), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    benchlib.progress("wrote %s" % out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
