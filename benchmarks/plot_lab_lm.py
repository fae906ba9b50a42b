"""Draw ``lab-lm.png`` from the JSON ``lab_lm.py`` wrote (any venv with matplotlib).

One column per setting (guest RAM, dirty rate); top row: total time per
migration, bottom row: libvirt's downtime; each arm's samples as dots over a
box (median, quartiles, whiskers at 5-95 %).

    python benchmarks/plot_lab_lm.py benchmarks/results/lab-lm.json
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import benchlib

ARMS = ("none", "emulator", "vtpcm")
COLORS = {"none": "tab:gray", "emulator": "tab:orange", "vtpcm": "tab:blue"}


def _label(cfg: dict[str, Any]) -> str:
    text = "%d MiB" % cfg["memory_mib"]
    if cfg["dirty_mibps"]:
        text += ", dirtying %d MiB/s" % cfg["dirty_mibps"]
        if cfg.get("dirty_note"):
            text += "\n(in place: ~3 MiB per pass)"
    return text


def plot(result: dict[str, Any], dest: Path) -> None:
    plt = benchlib.pyplot()
    configs = result["configs"]
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 7.5),
                             squeeze=False)
    for col, cfg in enumerate(configs):
        for row, (metric, title) in enumerate((("total_ms", "total time (s)"),
                                               ("downtime_ms", "downtime (ms)"))):
            ax = axes[row][col]
            scale = 1e-3 if metric == "total_ms" else 1.0
            data = [[r[metric] * scale for r in cfg["samples"][arm]
                     if not r["warmup"] and r.get(metric) is not None] for arm in ARMS]
            ax.boxplot([d or [0.0] for d in data], whis=(5, 95), showfliers=False)
            for i, (arm, values) in enumerate(zip(ARMS, data, strict=True)):
                xs = [i + 1 + 0.25 * ((k % 7) / 6 - 0.5) for k in range(len(values))]
                ax.scatter(xs, values, s=10, alpha=0.6, color=COLORS[arm], zorder=3)
            ax.set_xticks(range(1, len(ARMS) + 1), ARMS)
            ax.set_ylabel(title)
            ax.set_ylim(bottom=0)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(_label(cfg))
            cmp = cfg["analysis"]["comparison"]
            notes = []
            for base in ("none", "emulator"):
                item = cmp.get("vtpcm_vs_%s/%s" % (base, metric))
                if item and item["ratio_of_medians"] is not None:
                    notes.append("vtpcm/%s %.3f" % (base, item["ratio_of_medians"]))
            ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, va="top",
                    fontsize=8)
    machine = result["machine"]
    fig.suptitle("Live migration in the two-host lab, TCG guest\n%s, %s cores, %s%s"
                 % (machine.get("cpu_model"), machine.get("nproc"),
                    str(machine.get("date_utc", ""))[:16], " SMOKE" if result.get("smoke")
                    else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    args = parser.parse_args()
    path = Path(args.json)
    dest = path.with_suffix(".png")
    plot(json.loads(path.read_text()), dest)
    benchlib.progress("wrote %s" % dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
