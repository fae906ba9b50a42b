"""Live migration in the two-host lab, three arms interleaved in one run.

The same TCG guest image (vtpcm_lab's busybox initramfs) is live-migrated
between the lab's two libvirt session daemons with Nova's flags, as

* ``none``: no TPM,
* ``emulator``: upstream's way, ``<tpm><backend type='emulator' version='2.0'/>``:
  libvirt starts swtpm and QEMU carries its state in the stream, unencrypted
  (what Nova's ``hw:tpm_*`` does),
* ``vtpcm``: an external swtpm run by the vTPCM agent, moved by the protocol
  (``vtpcm_lab.live.live_migrate``: check, begin, libvirt, commit).

One round migrates each of the three guests once, in an order that rotates
every round; the guests alternate between A->B and B->A. ``total_ms`` is
what an operator waits (for ``vtpcm``: check + begin + libvirt + commit; for
the others: libvirt's migration call), ``downtime_ms`` and
``downtime_net_ms`` are libvirt's completed-job statistics of the
destination (``virDomainGetJobStats``), not wall clock.

The lab has fixed paths shared with other engineers' tests: each chunk
takes ``/tmp/vtpcm-lab.lock`` (``vtpcm_lab.lablock``), brings the lab up,
boots the guests, runs rounds until its time budget (``--chunk-seconds``) is
spent, and tears everything down; the next chunk waits for the lock again.

    .venv/bin/python benchmarks/lab_lm.py [--smoke] [--rounds 20] [--out-dir DIR]

Needs root (the lab creates users and daemons), RabbitMQ, swtpm, QEMU.
Writes ``lab-lm.json``; ``plot_lab_lm.py`` draws ``lab-lm.png`` from it.
"""

import argparse
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import benchlib

ARMS = ("none", "emulator", "vtpcm")
NAMES = {"none": "bench-lm-none", "emulator": "bench-lm-emulator",
         "vtpcm": "bench-lm-vtpcm"}
STAT_KEYS = ("downtime", "downtime_net", "time_elapsed", "time_elapsed_net",
             "setup_time", "memory_total", "memory_processed", "memory_remaining",
             "memory_normal", "memory_normal_bytes", "memory_constant",
             "memory_dirty_rate", "memory_iteration", "memory_bps", "memory_page_size")
LOCK_TIMEOUT = 1800.0


def _setup_logging() -> None:
    from oslo_config import cfg
    from oslo_log import log as logging

    conf = cfg.ConfigOpts()
    logging.register_options(conf)
    conf([], project="vtpcm", default_config_files=[])
    conf.set_override("default_log_levels", ["amqp=WARN", "oslo.messaging=WARN",
                                             "vtpcm_lab=WARN", "vtpcm_nova=WARN",
                                             "alembic=WARN"])
    logging.setup(conf, "vtpcm-bench")


class Chunk:
    """One hold of the lab lock: lab and stack up, three guests booted."""

    def __init__(self, memory_mib: int, dirty_mibps: int) -> None:
        from vtpcm_lab.hosts import Lab
        from vtpcm_lab.stack import Stack

        self.memory_mib = memory_mib
        self.dirty_mibps = dirty_mibps
        self.lab = Lab()
        self.stack = Stack(self.lab)
        self.where: dict[str, str] = {}
        self.written: dict[str, str] = {}
        self.dirty_measured: dict[str, int | None] = {}

    def up(self) -> None:
        from vtpcm_lab import live

        self.lab.up()
        live.destroy_guests(self.lab, lambda n: n in NAMES.values())
        self.stack.up()
        # the two libvirt-only guests boot side by side with the vTPCM guest
        for arm in ("none", "emulator"):
            self._start_plain(arm)
        _, con = live.boot_guest(self.stack, self.stack.host(self.lab.a), NAMES["vtpcm"],
                                 memory_mib=self.memory_mib)
        self._prepare("vtpcm", con)
        for arm in ("none", "emulator"):
            self._prepare(arm, self._console(arm))
        if self.dirty_mibps:
            self.dirty_measured = self._measure_dirty_rate()

    def _measure_dirty_rate(self) -> dict[str, int | None]:
        """What each guest really dirties (MiB/s), as QEMU samples it
        (virDomainStartDirtyRateCalc): under TCG a shell loop may fall short."""
        import libvirt

        conn = self.lab.a.connect()
        try:
            doms = {arm: conn.lookupByName(NAMES[arm]) for arm in ARMS}
            for dom in doms.values():
                dom.startDirtyRateCalc(3, 0)
            time.sleep(4.0)
            rates: dict[str, int | None] = {}
            for arm, dom in doms.items():
                stats = conn.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_DIRTYRATE)
                values = stats[0][1] if stats else {}
                rate = values.get("dirtyrate.megabytes_per_second")
                rates[arm] = int(rate) if isinstance(rate, int) else None
            return rates
        finally:
            conn.close()

    def _start_plain(self, arm: str) -> None:
        import libvirt

        from vtpcm_lab import domain

        name = NAMES[arm]
        assert self.lab.image is not None
        xml = domain.render_domain_xml(
            name, self.lab.image, None, self.lab.a.serial_path(name),
            memory_mib=self.memory_mib,
            tpm_backend="emulator" if arm == "emulator" else "external")
        conn = self.lab.a.connect()
        try:
            conn.defineXML(xml).create()
        except libvirt.libvirtError as exc:
            raise RuntimeError("booting the %s guest: %s" % (arm, exc)) from exc
        finally:
            conn.close()

    def _console(self, arm: str) -> Any:
        from vtpcm_lab import console

        con = console.GuestConsole(self.lab.a.serial_path(NAMES[arm]))
        try:
            con.wait_ready(timeout=120.0)
        except BaseException:
            con.close()
            raise
        return con

    def _prepare(self, arm: str, con: Any) -> None:
        """TPM guests write their NV value; all start dirtying if asked."""
        try:
            if arm != "none":
                # the guest's TPM state must survive every hop: checked at the end
                value = os.urandom(32).hex()
                con.write(value)
                self.written[arm] = value
            if self.dirty_mibps:
                answer = con.send("dirty %d" % self.dirty_mibps, timeout=60.0)
                if answer[-1:] != ["OK dirty %d" % self.dirty_mibps]:
                    raise RuntimeError("guest %s did not start dirtying: %s" % (arm, answer))
        finally:
            con.close()
        self.where[arm] = self.lab.a.name

    def hop(self, arm: str) -> dict[str, Any]:
        """Migrate ``arm``'s guest to the other host; one sample."""
        import libvirt

        from vtpcm_lab import domain, live, migrate

        lab = self.lab
        src_lab, dst_lab = ((lab.a, lab.b) if self.where[arm] == lab.a.name
                            else (lab.b, lab.a))
        name = NAMES[arm]
        record: dict[str, Any] = {"direction": "%s->%s" % (src_lab.name, dst_lab.name)}
        if arm == "vtpcm":
            res = live.live_migrate(self.stack, name, self.stack.host(src_lab),
                                    self.stack.host(dst_lab))
            result = res.libvirt
            record.update(total_ms=res.total_s * 1e3, check_ms=res.check_s * 1e3,
                          begin_ms=res.begin_s * 1e3, commit_ms=res.commit_s * 1e3,
                          protocol_ms=res.protocol_s * 1e3)
        else:
            start = time.monotonic()
            conn_src, conn_dst = src_lab.connect(), dst_lab.connect()
            try:
                dom = conn_src.lookupByName(name)
                dest_xml = domain.render_destination_xml(
                    dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), None,
                    dst_lab.serial_path(name))
                result = migrate.migrate(dom, conn_dst, dst_lab.uri, dest_xml,
                                         live.free_port(), timeout=300.0)
            finally:
                conn_src.close()
                conn_dst.close()
            record["total_ms"] = (time.monotonic() - start) * 1e3
        self.where[arm] = dst_lab.name
        record["libvirt_ms"] = result.total_s * 1e3
        stats = {k: result.stats[k] for k in STAT_KEYS if k in result.stats}
        record["stats"] = stats
        for key in ("downtime", "downtime_net", "time_elapsed"):
            value = stats.get(key)
            record[key + "_ms"] = float(value) if isinstance(value, int | float) else None
        # the guest runs on the destination (not timed); one that does not is
        # reported with libvirt's view of it there
        live.wait_migrated_guest(dst_lab, name, timeout=60.0)
        return record

    def verify_tpm(self) -> dict[str, bool]:
        """PCR16 and NV of the TPM guests still hold what they wrote at boot."""
        from vtpcm_lab import console

        held: dict[str, bool] = {}
        for arm, value in self.written.items():
            host = self.lab.a if self.where[arm] == self.lab.a.name else self.lab.b
            with console.GuestConsole(host.serial_path(NAMES[arm])) as con:
                con.wait_ready(timeout=60.0)
                if self.dirty_mibps:
                    con.send("dirty 0", timeout=60.0)  # quicker answers from the guest
                held[arm] = con.report(timeout=120.0).get("NV") == value
        return held

    def down(self) -> None:
        from vtpcm_lab import live

        try:
            live.destroy_guests(self.lab, lambda n: n in NAMES.values())
        finally:
            try:
                self.stack.down()
            finally:
                self.lab.down()


def _run_config(memory_mib: int, dirty_mibps: int, rounds: int, warmup: int,
                chunk_seconds: float) -> dict[str, Any]:
    """All rounds of one (memory, dirty rate) setting, in as many chunks as needed."""
    from vtpcm_lab import lablock

    samples: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    chunks: list[dict[str, Any]] = []
    done = 0
    label = "%d MiB%s" % (memory_mib, ", dirty %d MiB/s" % dirty_mibps if dirty_mibps else "")
    while done < rounds:
        benchlib.progress("%s: waiting for the lab lock" % label)
        with lablock.hold(LOCK_TIMEOUT, waiting=lambda s: benchlib.progress(
                "  still waiting for %s (%.0f s)" % (lablock.LOCK_PATH, s))) as took:
            held = time.monotonic()
            chunk = Chunk(memory_mib, dirty_mibps)
            info: dict[str, Any] = {"took_lock": took, "loadavg_start": list(os.getloadavg()),
                                    "rounds": 0}
            try:
                chunk.up()
                info["setup_s"] = round(time.monotonic() - held, 1)
                if dirty_mibps:
                    info["dirty_rate_measured_mibps"] = chunk.dirty_measured
                    benchlib.progress("%s: dirty rate as QEMU samples it (MiB/s): %s"
                                      % (label, chunk.dirty_measured))
                benchlib.progress("%s: lab up, guests booted in %.0f s"
                                  % (label, info["setup_s"]))
                in_chunk = 0
                round_s = 0.0
                while done < rounds:
                    elapsed = time.monotonic() - held
                    # an even number of rounds per chunk keeps A->B and B->A balanced
                    if (in_chunk >= warmup + 2 and (in_chunk - warmup) % 2 == 0
                            and elapsed + 2 * round_s + 30 > chunk_seconds):
                        break
                    measured = in_chunk >= warmup
                    r0 = time.monotonic()
                    order = ARMS[done % 3:] + ARMS[:done % 3]
                    line = []
                    for arm in order:
                        rec = chunk.hop(arm)
                        rec.update(round=done, warmup=not measured, order=list(order),
                                   loadavg=os.getloadavg()[0])
                        samples[arm].append(rec)
                        line.append("%s %.0f ms (down %s)" % (
                            arm, rec["total_ms"],
                            "%.0f" % rec["downtime_ms"] if rec["downtime_ms"] is not None
                            else "?"))
                    round_s = max(round_s, time.monotonic() - r0)
                    in_chunk += 1
                    if measured:
                        done += 1
                    benchlib.progress("%s: round %s %s: %s" % (
                        label, "%d/%d" % (done, rounds) if measured else "warm-up",
                        rec["direction"], ", ".join(line)))
                info["rounds"] = in_chunk
                info["tpm_state_held"] = chunk.verify_tpm()
                if not all(info["tpm_state_held"].values()):
                    raise RuntimeError("guest TPM state lost: %s" % info["tpm_state_held"])
            finally:
                chunk.down()
                info["held_s"] = round(time.monotonic() - held, 1)
                info["loadavg_end"] = list(os.getloadavg())
                chunks.append(info)
                benchlib.progress("%s: lab down, lock held %.0f s" % (label, info["held_s"]))
    return {"memory_mib": memory_mib, "dirty_mibps": dirty_mibps, "rounds": rounds,
            "chunks": chunks, "samples": samples}


def _values(recs: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in recs if not r["warmup"] and r.get(key) is not None]


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
    by_round = {r["round"]: r for r in b if not r["warmup"] and r.get(key) is not None}
    return [r[key] - by_round[r["round"]][key] for r in a
            if not r["warmup"] and r.get(key) is not None and r["round"] in by_round]


def analyse(config: dict[str, Any]) -> dict[str, Any]:
    """Per arm summaries, and vtpcm against none and emulator (ratios of medians,
    differences of medians, and paired: the same round's difference)."""
    samples = config["samples"]
    metrics = ("total_ms", "libvirt_ms", "downtime_ms", "downtime_net_ms", "time_elapsed_ms")
    arms: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        arms[arm] = {m: benchlib.summary(v) for m in metrics
                     if (v := _values(samples[arm], m))}
    proto = {m: benchlib.summary(v) for m in ("check_ms", "begin_ms", "commit_ms",
                                             "protocol_ms")
             if (v := _values(samples["vtpcm"], m))}
    comparison: dict[str, Any] = {}
    for base in ("none", "emulator"):
        for m in ("total_ms", "downtime_ms", "downtime_net_ms"):
            if m not in arms["vtpcm"] or m not in arms[base]:
                continue
            c, b = arms["vtpcm"][m]["median"], arms[base][m]["median"]
            paired = _paired(samples["vtpcm"], samples[base], m)
            comparison["vtpcm_vs_%s/%s" % (base, m)] = {
                "ratio_of_medians": c / b if b else None,
                "added_ms_of_medians": c - b,
                "paired_added_ms": benchlib.summary(paired) if paired else None,
            }
    return {"arms": arms, "vtpcm_protocol": proto, "comparison": comparison}


def targets(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the 1 GiB run without dirtying."""
    out: list[dict[str, Any]] = []
    for cfg in configs:
        if cfg["memory_mib"] != 1024 or cfg["dirty_mibps"]:
            continue
        cmp = cfg["analysis"]["comparison"]
        ratio = cmp.get("vtpcm_vs_none/total_ms", {}).get("ratio_of_medians")
        added = cmp.get("vtpcm_vs_none/downtime_ms", {}).get("added_ms_of_medians")
        out.append({"target": "total time vtpcm/none <= 1.01 at 1 GiB (median)",
                    "measured": ratio, "met": ratio is not None and ratio <= 1.01})
        out.append({"target": "added downtime <= 2 ms (median)",
                    "measured": added, "met": added is not None and added <= 2.0})
    return out


def _med_p95(summ: dict[str, float] | None) -> str:
    return "median %.0f p95 %.0f ms" % (summ["median"], summ["p95"]) if summ else "n/a"


def _parse_configs(text: str) -> list[tuple[int, int]]:
    """"256,1024,1024:32" -> [(256, 0), (1024, 0), (1024, 32)] (MiB, dirty MiB/s)."""
    configs = []
    for item in text.split(","):
        mem, _, dirty = item.partition(":")
        try:
            configs.append((int(mem), int(dirty or 0)))
        except ValueError:
            raise SystemExit("lab_lm.py: bad --configs item %r (want MIB or MIB:DIRTY)"
                             % item) from None
    return configs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="1 round, 256 MiB dirtying 8 MiB/s, no warm-up: that it "
                             "runs (the dirtying guest included, unless QEMU < 9.0 "
                             "would corrupt it), not numbers")
    parser.add_argument("--rounds", type=int, default=20,
                        help="measured rounds per setting (half each way; default 20)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds dropped per chunk")
    parser.add_argument("--configs", default="256,1024,1024:32",
                        help="MiB[:dirty MiB/s],... (default 256,1024,1024:32)")
    parser.add_argument("--chunk-seconds", type=float, default=540.0,
                        help="lab lock hold budget per chunk (default 540)")
    parser.add_argument("--out-dir")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("lab_lm.py: needs root (the lab creates users and daemons)", file=sys.stderr)
        return 2
    configs = _parse_configs(args.configs)
    import libvirt

    # daemons (unused here) selects oslo's threading backend first
    from vtpcm_lab import daemons, domain  # noqa: F401

    qemu = domain.qemu_version()
    loses_pages = domain.tcg_loses_dirty_pages(qemu)
    if args.smoke:
        # the smoke run checks that the benchmark runs; on a QEMU that corrupts
        # a writing guest in migration its dirtying guest would fail it at random
        configs, args.rounds, args.warmup = [(256, 0 if loses_pages else 8)], 1, 0
    if loses_pages:
        benchlib.progress(
            "QEMU %s loses dirty pages of a writing TCG guest in live migration "
            "(fixed in 9.0, 03bfc2188f): %s" % (
                ".".join(map(str, qemu)),
                "the smoke run does not dirty" if args.smoke else
                "a dirtying guest may crash or hang after a hop" if any(
                    d for _, d in configs) else "no setting dirties, unaffected"))

    # bench.sh's timeout sends SIGTERM: unwind, so that the finally blocks stop
    # what this run started (by pid) and release the lab
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    _setup_logging()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    out = benchlib.out_dir(args.smoke, args.out_dir)
    result: dict[str, Any] = {"benchmark": "lab-lm", "smoke": args.smoke,
                              "machine": benchlib.machine(), "run_id": str(uuid.uuid4()),
                              "config": {"rounds": args.rounds, "warmup_per_chunk": args.warmup,
                                         "chunk_seconds": args.chunk_seconds,
                                         "arms": list(ARMS), "guest": "TCG, 1 vCPU, "
                                         "busybox initramfs (vtpcm_lab.guest)",
                                         "qemu": ".".join(map(str, qemu)),
                                         "qemu_loses_tcg_dirty_pages": loses_pages},
                              "configs": []}
    started = time.monotonic()
    for memory_mib, dirty in configs:
        cfg = _run_config(memory_mib, dirty, args.rounds, args.warmup, args.chunk_seconds)
        cfg["analysis"] = analyse(cfg)
        result["configs"].append(cfg)
        benchlib.write_json(Path(out) / "lab-lm.json", result, quiet=True)
        for arm, summ in cfg["analysis"]["arms"].items():
            benchlib.progress("  %-8s total %s, downtime %s" % (
                arm, _med_p95(summ.get("total_ms")), _med_p95(summ.get("downtime_ms"))))
    result["targets"] = targets(result["configs"])
    result["wall_s"] = round(time.monotonic() - started, 1)
    benchlib.write_json(Path(out) / "lab-lm.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
