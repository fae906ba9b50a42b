"""Draw ``agent-scale.png`` from the JSON ``agent_scale.py`` wrote (any venv with
matplotlib): cost against the number of vTPCMs on one agent.

Left: create + start time of each vTPCM (dots) by its index. Middle: memory,
the agent's RSS and the swtpm processes' total PSS and median RSS. Right:
re-adoption after an agent restart, recovery and time to serving, with the
2 s target.

    python benchmarks/plot_agent_scale.py benchmarks/results/agent-scale.json
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import benchlib


def plot(result: dict[str, Any], dest: Path) -> None:
    plt = benchlib.pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.5))
    creates = result["creates"]
    ax1.scatter([c["i"] for c in creates], [c["create_ms"] for c in creates], s=8,
                label="create (keys sealed, state dir)")
    ax1.scatter([c["i"] for c in creates], [c["start_ms"] for c in creates], s=8,
                label="start (swtpm up)")
    ax1.set_xlabel("vTPCMs on the agent")
    ax1.set_ylabel("ms per call")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax1.set_title("creation, each vTPCM")
    points = result["checkpoints"]
    ns = [p["n"] for p in points]
    ax2.plot(ns, [p["agent"].get("rss_kib", 0) / 1024 for p in points], "o-",
             label="agent RSS")
    ax2.plot(ns, [p["swtpm_pss_total_kib"] / 1024 for p in points], "o-",
             label="all swtpm, PSS total")
    ax2.plot(ns, [p["swtpm_rss_kib"]["median"] / 1024 for p in points], "o-",
             label="one swtpm, RSS (median)")
    ax2.set_xlabel("vTPCMs on the agent")
    ax2.set_ylabel("MiB")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    ax2.set_title("memory")
    ro = result["readoptions"]
    ax3.plot([r["n"] for r in ro], [r["restart_to_serving_s"] for r in ro], "o-",
             label="restart to serving")
    ax3.plot([r["n"] for r in ro], [r["recover_s"] for r in ro], "o-",
             label="recovery (re-adoption loop)")
    ax3.axhline(2.0, linestyle="--", color="gray", label="target 2 s")
    ax3.set_xlabel("vTPCMs on the agent")
    ax3.set_ylabel("s")
    ax3.set_ylim(bottom=0)
    ax3.legend(fontsize=8)
    ax3.set_title("agent restart")
    machine = result["machine"]
    fig.suptitle("%d vTPCMs on one agent (%s, %s cores, %s)%s" % (
        result["n"], machine.get("cpu_model"), machine.get("nproc"),
        str(machine.get("date_utc", ""))[:16], " SMOKE" if result.get("smoke") else ""),
        fontsize=10)
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
