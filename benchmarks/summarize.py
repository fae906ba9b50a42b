"""Print the results of the last runs as reStructuredText tables (what the
results section of ``benchmarks/README.rst`` is pasted from). Any Python 3.11,
no third-party imports::

    python3 benchmarks/summarize.py [RESULTS_DIR]     (default benchmarks/results)
"""

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    rule = " ".join("=" * w for w in widths)
    lines = [rule, " ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), rule]
    lines += [" ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(rule)
    return "\n".join(lines)


def machine_line(name: str, r: dict[str, Any]) -> str:
    m = r["machine"]
    return ("%s: %s, nproc %s, %s, git %s, load average %.1f at start, %.1f at end%s"
            % (name, m["cpu_model"], m["nproc"], m["date_utc"], m.get("git_head"),
               m["loadavg_start"][0], m.get("loadavg_end", [float("nan")])[0],
               " (SMOKE)" if r.get("smoke") else ""))


def met(flag: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[flag]


def filter_tables(r: dict[str, Any]) -> str:
    rows = []
    for s in r["sizes"]:
        h, q = s["per_host_ns"], s["per_request_ms"]
        rows.append([f"{s['hosts']:,}", "%.2f" % (h["vtpcm"]["median"] / 1000),
                     "%.2f" % (h["vtpcm"]["p95"] / 1000),
                     "%.2f" % (h["plain"]["median"] / 1000),
                     "%.0fx" % s["vtpcm_over_plain_ratio"]["median"],
                     "%.2f" % (h["filter_all_vtpcm"]["median"] / 1000),
                     "%.2f" % (h["filter_all_plain"]["median"] / 1000),
                     "%.1f" % q["request"]["median"], "%.1f" % q["request"]["p95"],
                     "%.1f" % q["fetch"]["median"], "%.1f" % q["request_decoded"]["median"]])
    t = r["targets"]
    out = [machine_line("filter", r), "",
           table(["hosts", "vtpcm µs/host", "p95", "plain µs/host", "ratio",
                  "filter_all vtpcm", "filter_all plain", "request ms", "p95 ms",
                  "fetch ms", "request+decode ms"], rows), "",
           "per host <= 5 µs: %s (worst median %.2f µs); per request <= 50 ms at 10,000 "
           "hosts: %s (median %s ms; with the wire decode %s ms)" % (
               met(t["per_host"]["met"]), t["per_host"]["worst_median_ns"] / 1000,
               met(t["per_request"]["met"]),
               "%.1f" % t["per_request"]["median_ms"] if "median_ms" in t["per_request"]
               else "-",
               "%.1f" % t["per_request"]["with_wire_decode_median_ms"]
               if "with_wire_decode_median_ms" in t["per_request"] else "-")]
    parts = ("part_requested", "part_parse", "part_trusted", "part_now", "part_why_not",
             "part_why_not_fixed_now")
    prow = [[f"{s['hosts']:,}"] + ["%.2f" % (s["per_host_ns"][p]["median"] / 1000)
                                   for p in parts] for s in r["sizes"]]
    out += ["", table(["hosts"] + [p[5:] for p in parts], prow)]
    return "\n".join(out)


def nova_lm_tables(r: dict[str, Any]) -> str:
    rows = []
    for mode, per in r["comparison"].items():
        for metric in ("api_wall_ms", "harness_wall_ms", "api_to_compute_done_ms",
                       "driver_window_ms", "lm_entry_to_post_exit_ms", "vtpcm_rpc_ms",
                       "cpu_total_ms", "cpu_nova_process_ms", "cpu_vtpcm_daemons_ms"):
            c = per.get(metric)
            if not c:
                continue
            pa = r["arms"]["%s/plain" % mode][metric]
            va = r["arms"]["%s/vtpcm" % mode][metric]
            rows.append([mode, metric, "%.0f" % c["plain_median"], "%.0f" % pa["p95"],
                         "%.0f" % c["vtpcm_median"], "%.0f" % va["p95"],
                         "%.2f" % c["ratio_vtpcm_over_plain"] if c["ratio_vtpcm_over_plain"]
                         else "-", "%+.0f" % c["added_ms"],
                         "%+.0f" % c["paired_added_ms"]["median"]])
    n = min(len(v) for v in r["samples"].values())
    out = [machine_line("nova-lm", r) + ", %d migrations per arm%s" % (
        n, "" if r.get("complete", True) else " (INCOMPLETE)"), "",
        table(["mode", "metric", "plain med", "p95", "vtpcm med", "p95", "ratio",
               "added", "paired added"], rows)]
    mode = "fine" if "fine/vtpcm" in r["arms"] else r["modes"][0]
    steps = r["arms"]["%s/vtpcm" % mode]["steps_ms"]
    srows = [[k, "%.1f" % v["median"], "%.1f" % v["p95"]]
             for k, v in sorted(steps.items(), key=lambda kv: -kv[1]["median"])]
    out += ["", "vtpcm arm, %s mode, timed spans (ms per migration):" % mode, "",
            table(["span", "median", "p95"], srows)]
    return "\n".join(out)


def attestation_table(r: dict[str, Any]) -> str:
    a = r["attest_ms"]
    return "\n".join([machine_line("attestation", r), "", table(
        ["n", "attest p50 ms", "p95 ms", "min ms", "max ms", "verify_quote/s (1 core)"],
        [[str(r["n"]), "%.1f" % a["p50"], "%.1f" % a["p95"], "%.1f" % a["min"],
          "%.1f" % a["max"], "%.0f" % r["verify_quote_per_second_one_core"]]])])


def lab_lm_tables(r: dict[str, Any]) -> str:
    """Per setting and arm: total and downtime median/p95; vtpcm over none and
    over emulator (ratio of medians, and the paired same-round difference)."""
    rows, crows = [], []
    for cfg in r["configs"]:
        label = "%d MiB%s" % (cfg["memory_mib"],
                              " +%d MiB/s" % cfg["dirty_mibps"] if cfg["dirty_mibps"] else "")
        arms = cfg["analysis"]["arms"]
        for arm in ("none", "emulator", "vtpcm"):
            a = arms.get(arm, {})
            cells = [label, arm, str(a["total_ms"]["n"]) if "total_ms" in a else "0"]
            for metric in ("total_ms", "downtime_ms", "downtime_net_ms"):
                m = a.get(metric)
                cells += ["%.0f" % m["median"], "%.0f" % m["p95"]] if m else ["-", "-"]
            rows.append(cells)
        cmp = cfg["analysis"]["comparison"]
        for base in ("none", "emulator"):
            cells = [label, "vtpcm/" + base]
            for metric in ("total_ms", "downtime_ms"):
                c = cmp.get("vtpcm_vs_%s/%s" % (base, metric))
                if not c:
                    cells += ["-", "-", "-"]
                    continue
                paired = c["paired_added_ms"]
                cells += ["%.3f" % c["ratio_of_medians"] if c["ratio_of_medians"] else "-",
                          "%+.0f" % c["added_ms_of_medians"],
                          "%+.0f" % paired["median"] if paired else "-"]
            crows.append(cells)
        proto = cfg["analysis"]["vtpcm_protocol"]
        if proto:
            crows.append([label, "vtpcm protocol ms", "check %.0f" % proto["check_ms"]["median"],
                          "begin %.0f" % proto["begin_ms"]["median"],
                          "commit %.0f" % proto["commit_ms"]["median"],
                          "sum %.0f" % proto["protocol_ms"]["median"], "", ""])
    held = [c["held_s"] for cfg in r["configs"] for c in cfg["chunks"]]
    out = [machine_line("lab-lm", r) + ", lock held per chunk %s s" % held, "",
           table(["setting", "arm", "n", "total med ms", "p95", "downtime med ms", "p95",
                  "downtime_net med", "p95"], rows), "",
           table(["setting", "vtpcm over", "total ratio", "added ms", "paired added",
                  "downtime ratio", "added ms", "paired added"], crows)]
    for t in r.get("targets", []):
        out.append("%s: %s (%s)" % (t["target"], met(t["met"]), "%.3f" % t["measured"]
                                     if t["measured"] is not None else "-"))
    return "\n".join(out)


def agent_scale_table(r: dict[str, Any]) -> str:
    rows = []
    ro = {x["n"]: x for x in r["readoptions"]}
    for p in r["checkpoints"]:
        x = ro.get(p["n"])
        rows.append([str(p["n"]), "%.0f" % p["create_start_ms_last"]["median"],
                     "%.1f" % (p["agent"].get("rss_kib", 0) / 1024),
                     "%.2f" % (p["swtpm_rss_kib"]["median"] / 1024),
                     "%.2f" % (p["swtpm_pss_kib"]["median"] / 1024),
                     "%.0f" % (p["swtpm_pss_total_kib"] / 1024),
                     "%.0f" % p["health_ms"], "%.0f" % p["list_ms"],
                     "%.3f" % x["recover_s"] if x else "",
                     "%.2f" % x["restart_to_serving_s"] if x else ""])
    t = r["targets"][0]
    return "\n".join([
        machine_line("agent-scale", r), "",
        "create %.0f ms median (p95 %.0f), start %.0f ms (p95 %.0f); %d vTPCMs in %.0f s"
        % (r["create_ms"]["median"], r["create_ms"]["p95"], r["start_ms"]["median"],
           r["start_ms"]["p95"], r["n"], r["create_total_s"]), "",
        table(["n", "create+start ms (last 10)", "agent RSS MiB", "swtpm RSS MiB",
               "swtpm PSS MiB", "all swtpm PSS MiB", "health ms", "list ms",
               "recover s", "restart to serving s"], rows), "",
        "%s: %s" % (t["target"], met(t["met"]))])


def main() -> int:
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results"
    for name, fn in (("filter", filter_tables), ("nova-lm", nova_lm_tables),
                     ("attestation", attestation_table), ("lab-lm", lab_lm_tables),
                     ("agent-scale", agent_scale_table)):
        path = results / (name + ".json")
        if path.exists():
            try:
                print(fn(json.loads(path.read_text())))
            except KeyError as exc:  # a benchmark's JSON moved on: say so, print the rest
                print("%s: this summarize.py does not know its format (no key %s)"
                      % (name, exc))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
