"""Draw ``nova-lm.png`` from ``nova-lm.json`` (the nova-lm benchmark calls
``plot``; run it alone to re-draw a plot without re-running the benchmark)::

    python benchmarks/plot_nova_lm.py benchmarks/results/nova-lm.json

Needs matplotlib only. Left: every migration's main metrics per arm. Middle:
vtpcm minus plain of the same round (the two migrations ran seconds apart,
so machine noise mostly cancels). Right: the timed spans of the vtpcm and
plain arms (medians; the driver spans nest: live_migration contains
_live_migration_operation and post_live_migration, and so on).
"""

import json
import sys
from pathlib import Path
from typing import Any

import benchlib


def plot(result: dict[str, Any], path: Path) -> None:
    plt = benchlib.pyplot()
    arms = list(result["samples"])
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(20, 5.8),
                                        gridspec_kw={"width_ratios": [1.2, 0.7, 1]})
    # left: per-migration distributions of the main metrics, per arm
    metrics = [("api_wall_ms", "API wall"), ("harness_wall_ms", "harness wall"),
               ("driver_window_ms", "driver window"), ("vtpcm_rpc_ms", "vTPCM RPCs"),
               ("cpu_total_ms", "CPU total")]
    data, labels, colors = [], [], []
    palette = {"plain": "tab:blue", "vtpcm": "tab:orange"}
    for metric, mlabel in metrics:
        for arm in arms:
            vals = [r[metric] for r in result["samples"][arm] if r[metric] is not None]
            if not vals:
                continue
            data.append(vals)
            labels.append("%s\n%s" % (mlabel, arm))
            colors.append(palette[arm.split("/")[1]])
    box = ax1.boxplot(data, patch_artist=True, showfliers=True)
    for patch, color in zip(box["boxes"], colors, strict=True):
        patch.set_facecolor(color)
        patch.set_alpha(0.5)
    for i, vals in enumerate(data, start=1):
        ax1.plot([i] * len(vals), vals, "k.", ms=3, alpha=0.6)
    ax1.set_xticks(range(1, len(labels) + 1), labels, fontsize=6, rotation=90)
    ax1.set_ylabel("ms per live migration")
    ax1.set_yscale("log")
    ax1.set_title("per migration (blue plain, orange vtpcm); n=%d per arm"
                  % result["rounds"])
    # middle: vtpcm minus plain within the same round (pairs seconds apart)
    pairs, plabels = [], []
    for mode in result["modes"]:
        plain, vtpcm = result["samples"].get(mode + "/plain"), \
            result["samples"].get(mode + "/vtpcm")
        if not plain or not vtpcm:
            continue
        for metric, mlabel in (("api_wall_ms", "API wall"),
                               ("driver_window_ms", "driver window"),
                               ("cpu_total_ms", "CPU total"),
                               ("vtpcm_rpc_ms", "vTPCM RPCs")):
            diffs = [v[metric] - p[metric] for p, v in zip(plain, vtpcm, strict=False)
                     if v.get(metric) is not None and p.get(metric) is not None]
            if diffs:
                pairs.append(diffs)
                plabels.append("%s\n%s" % (mlabel, mode))
    if pairs:
        ax3.boxplot(pairs, showfliers=True)
        for i, vals in enumerate(pairs, start=1):
            ax3.plot([i] * len(vals), vals, "k.", ms=3, alpha=0.6)
        ax3.set_xticks(range(1, len(plabels) + 1), plabels, fontsize=6, rotation=90)
    ax3.axhline(0, color="grey", lw=1)
    ax3.set_ylabel("ms, vtpcm - plain of the same round")
    ax3.set_title("added by the vTPCM, paired")
    # right: where the vtpcm arm's time goes (fine mode if present): median per step
    mode = "fine" if "fine/vtpcm" in result["arms"] else result["modes"][0]
    steps_v = result["arms"]["%s/vtpcm" % mode]["steps_ms"]
    steps_p = result["arms"]["%s/plain" % mode]["steps_ms"]
    names = sorted(steps_v, key=lambda k: -steps_v[k]["median"])
    ys = range(len(names))
    ax2.barh([y + 0.2 for y in ys], [steps_v[k]["median"] for k in names], height=0.4,
             color=palette["vtpcm"], label="vtpcm")
    ax2.barh([y - 0.2 for y in ys], [steps_p[k]["median"] if k in steps_p else 0
                                     for k in names], height=0.4, color=palette["plain"],
             label="plain")
    ax2.set_yticks(list(ys), names, fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xscale("symlog", linthresh=1)
    ax2.set_xlabel("ms (median per migration; driver spans nest)")
    ax2.set_title("timed spans, %s mode" % mode)
    ax2.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle("nova-lm: %s, %s cores, %s%s" % (m["cpu_model"], m["nproc"], m["date_utc"],
                                                  " (SMOKE)" if result["smoke"] else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    benchlib.progress("wrote %s" % path)


def main() -> int:
    path = Path(sys.argv[1])
    plot(json.loads(path.read_text()), path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
