"""Plot (and date) the JSON that ``attestation_rtt.py --out`` wrote.

``tools/bench.sh attestation`` runs ``attestation_rtt.py`` in the project venv,
then this in whichever venv has matplotlib: it adds the ``machine`` block
(nproc, CPU model, date, git head) and ``smoke`` to the JSON and draws
``<json>.png`` beside it. attestation_rtt.py keeps summary statistics only,
so the plot shows those (both arms side by side for an ``--old-root`` A/B run).

    python benchmarks/plot_attestation.py benchmarks/results/attestation.json [--smoke]
"""

import argparse
import json
import sys
from pathlib import Path

import benchlib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    path = Path(args.json)
    result = json.loads(path.read_text())
    result["smoke"] = args.smoke
    # attestation_rtt.py records the load it ran under; the rest is added here
    result["machine"] = {**benchlib.machine(), **result.get("machine", {})}
    benchlib.write_json(path, result)
    plt = benchlib.pyplot()
    att = result["attest_ms"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    keys = ("min", "p50", "p95", "max")
    if "ab" in result:  # an A/B run: the code before beside the code after
        old = result["ab"]["old_attest_ms"]
        xs = range(len(keys))
        for offset, label, values, color in ((-0.2, "before", old, "tab:gray"),
                                             (0.2, "after", att, "tab:blue")):
            bars = ax.bar([x + offset for x in xs], [values[k] for k in keys], width=0.4,
                          label=label, color=color)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(list(xs), keys)
        ax.legend(fontsize=8, title="interleaved, one run", title_fontsize=8)
    else:
        bars = ax.bar(keys, [att[k] for k in keys], color=["tab:green", "tab:blue",
                                                            "tab:orange", "tab:red"])
        ax.bar_label(bars, fmt="%.1f ms", fontsize=8)
    ax.set_ylabel("EngineAPI.attest round trip, ms")
    ax.set_title("attestation: n=%d, verify_quote %.0f/s, with load_ak + evaluate "
                 "%.0f/s on one core (target 10,000)"
                 % (result["n"], result["verify_quote_per_second_one_core"],
                    result.get("load_ak_verify_evaluate_per_second_one_core", 0)),
                 fontsize=9)
    m = result["machine"]
    fig.suptitle("%s, %s cores, %s, load %s%s" % (
        m["cpu_model"], m["nproc"], m["date_utc"],
        [round(x, 1) for x in m["loadavg_start"]], " (SMOKE)" if args.smoke else ""),
        fontsize=8)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    benchlib.progress("wrote %s" % png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
