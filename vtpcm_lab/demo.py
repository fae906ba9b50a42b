"""The main job: live-migrate a VM together with its vTPCM in the two-host lab.

Boots a guest with a vTPCM on host A, has the guest write TPM state (PCR16,
an NV index), attests host B, live-migrates A -> B (and back, unless
--one-way), checks that the guest sees identical PCRs, NV contents and EK and
kept running, that the source vTPCM is destroyed, and prints a summary.
Exit status 0 only if every check held.
"""

import argparse
import os
import sys
import time

import libvirt
from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_lab import console, domain, live, migrate
from vtpcm_lab.hosts import Lab
from vtpcm_lab.stack import Stack, StackHost

GUEST = "vtpcm-demo"
PLAIN_GUEST = "vtpcm-demo-plain"


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        print("  [%s] %s" % ("ok" if ok else "FAILED", what), flush=True)
        if not ok:
            self.failed.append(what)


def _hop(stack: Stack, src: StackHost, dst: StackHost, before: dict[str, str],
         checks: Checks) -> live.LiveMigration:
    print("\n== attest %s and live-migrate %s -> %s" % (dst.name, src.name, dst.name))
    result = live.live_migrate(stack, GUEST, src, dst)
    print("  destination verdict: %s" % result.verdict)
    with console.GuestConsole(dst.lab_host.serial_path(GUEST)) as con:
        con.wait_ready(timeout=30)
        after = con.report()
    for key in ("PCR16", "NV", "EK"):
        checks.expect(after[key] == before[key], "guest %s identical on %s (%s...)"
                      % (key, dst.name, after[key][:16]))
    checks.expect(after["BOOTID"] == before["BOOTID"]
                  and float(after["UPTIME"]) > float(before["UPTIME"]),
                  "guest kept running (same boot id, uptime %s -> %s s)"
                  % (before["UPTIME"], after["UPTIME"]))
    gone = stack.agents.get(src.name, result.instance_uuid)
    checks.expect(gone.state == "DESTROYED" and not gone.running,
                  "source vTPCM on %s destroyed (state %s)" % (src.name, gone.state))
    leftovers = list((src.state_dir / "vtpcms").glob("*"))
    keys = list((src.state_dir / "keys").glob("*.keys"))
    checks.expect(not leftovers and not keys,
                  "source state and keys shredded on %s" % src.name)
    record = stack.engine.get_vtpcm(result.instance_uuid)
    checks.expect(record.host == dst.name, "engine: vTPCM lives on %s, generation %d"
                  % (record.host, record.generation))
    return result


def _plain_baseline(stack: Stack) -> migrate.MigrationResult:
    """The same guest without a vTPCM, migrated the same way: the baseline."""
    lab = stack.lab
    assert lab.image is not None
    xml = domain.render_domain_xml(PLAIN_GUEST, lab.image, None,
                                   lab.a.serial_path(PLAIN_GUEST))
    conn_a, conn_b = lab.a.connect(), lab.b.connect()
    try:
        dom = conn_a.defineXML(xml)
        dom.create()
        with console.GuestConsole(lab.a.serial_path(PLAIN_GUEST)) as con:
            con.wait_ready(timeout=120)
        dest_xml = domain.render_destination_xml(
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), None,
            lab.b.serial_path(PLAIN_GUEST))
        return migrate.migrate(dom, conn_b, lab.b.uri, dest_xml, live.free_port())
    finally:
        conn_a.close()
        conn_b.close()


def _cleanup_guests(lab: Lab) -> None:
    live.destroy_guests(lab, lambda name: name in (GUEST, PLAIN_GUEST))


def run(one_way: bool, keep: bool) -> int:
    started = time.monotonic()
    lab = Lab()
    stack = Stack(lab)
    checks = Checks()
    try:
        print("== bringing up the two-host lab (libvirt session daemons, guest image)")
        lab.up()
        _cleanup_guests(lab)
        print("== starting host TPMs, vtpcm-agents and vtpcm-engine; enrolling hosts")
        stack.up()
        up_s = time.monotonic() - started
        a, b = stack.host(lab.a), stack.host(lab.b)
        for host in (a, b):
            enrolled = [e for e in stack.engine.list_audit(limit=20, host=host.name).entries
                        if e.event == "enroll" and e.outcome == "APPROVED"]
            checks.expect(bool(enrolled) and "AK activated" in enrolled[0].detail,
                          "%s enrolled: EK certificate verified, AK proven in its TPM"
                          % host.name)
        for verdict in (stack.engine.attest(a.name), stack.engine.attest(b.name)):
            print("  %s: %s %s" % (verdict.host, verdict.status, verdict.reason))
        print("\n== booting %s with a vTPCM on %s" % (GUEST, a.name))
        job = time.monotonic()
        instance, con = live.boot_guest(stack, a, GUEST)
        value = os.urandom(32).hex()
        con.write(value)
        before = con.report()
        con.close()
        print("  instance %s\n  guest wrote NV=%s..., PCR16=%s..."
              % (instance, before["NV"][:16], before["PCR16"][:16]))
        checks.expect(before["NV"] == value, "guest NV index holds what it wrote")
        hops = [_hop(stack, a, b, before, checks)]
        if not one_way:
            hops.append(_hop(stack, b, a, before, checks))
        job_s = time.monotonic() - job
        print("\n== baseline: the same guest without a vTPCM")
        plain = _plain_baseline(stack)
        print("\n== summary")
        for hop in hops:
            print("  %s -> %s: total %.2f s (libvirt %.2f s, vTPCM protocol %.3f s: "
                  "check %.3f + begin %.3f + commit %.3f), downtime %s"
                  % (hop.source, hop.dest, hop.total_s, hop.libvirt.total_s, hop.protocol_s,
                     hop.check_s, hop.begin_s, hop.commit_s, _ms(hop.libvirt.downtime_s)))
        print("  without vTPCM: libvirt %.2f s, downtime %s"
              % (plain.total_s, _ms(plain.downtime_s)))
        print("  lab up %.1f s; boot + migrations %.1f s; whole run %.1f s"
              % (up_s, job_s, time.monotonic() - started))
    except (exception.VTPCMException, libvirt.libvirtError, OSError) as err:
        checks.failed.append("error: %s" % err)
        print("\nvtpcm-demo: error: %s" % err, file=sys.stderr)
    finally:
        if not keep:
            _cleanup_guests(lab)
            stack.down()
            lab.down()
    if checks.failed:
        print("\nFAILED: %d check(s): %s" % (len(checks.failed), "; ".join(checks.failed)))
        return 1
    print("\nall checks passed")
    return 0


def _ms(seconds: float | None) -> str:
    return "%.0f ms" % (seconds * 1000) if seconds is not None else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtpcm-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one-way", action="store_true", help="migrate A -> B only")
    parser.add_argument("--keep", action="store_true",
                        help="leave the lab, services and guest running afterwards")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("vtpcm-demo: error: the lab needs root (it creates users and daemons)",
              file=sys.stderr)
        return 2
    logging.setup(_log_conf(), "vtpcm-demo")
    # libvirt prints every error to stderr, also the ones we handle.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return run(args.one_way, args.keep)


def _log_conf():  # type: ignore[no-untyped-def]
    from oslo_config import cfg

    conf = cfg.ConfigOpts()
    logging.register_options(conf)
    conf([], project="vtpcm", default_config_files=[])
    conf.set_override("default_log_levels", ["amqp=WARN", "oslo.messaging=WARN"])
    return conf


if __name__ == "__main__":
    sys.exit(main())
