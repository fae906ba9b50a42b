"""The real-Nova demo: what an operator does, on Nova 34 with this driver.

Starts the real-Nova lab, then through the unmodified ``openstack`` CLI:
boots a ``vtpcm.small`` and a plain server, has the guest write its TPM,
live-migrates both back and forth (interleaved, so the two medians compare
like with like), checks the guest's TPM and boot id after every hop,
cold-migrates, resizes (each confirmed) and shelves/unshelves the vTPCM
server, checking that the TPM contents the guest wrote come back, makes
the other host untrusted and shows that a migration there is refused,
deletes both servers and checks the vTPCM is shredded. Prints a summary with
the time of each step; exit status 0 only if every check held.
"""

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vtpcm_agent.hosttpm import HostTPM
from vtpcm_common import exception
from vtpcm_lab.nova import servers
from vtpcm_lab.nova.cloud import PLAIN_FLAVOR, VTPCM_FLAVOR, VTPCM_FLAVOR_LARGER, NovaLab

T = TypeVar("T")
TPM_KEYS = ("PCR16", "NV", "EK", "BOOTID")


class Demo:
    def __init__(self, lab: NovaLab) -> None:
        self.lab = lab
        self.failed: list[str] = []
        self.steps: list[tuple[str, float]] = []

    def expect(self, ok: bool, what: str) -> None:
        print("  [%s] %s" % ("ok" if ok else "FAILED", what), flush=True)
        if not ok:
            self.failed.append(what)

    def step(self, title: str, action: Callable[[], T]) -> T:
        print("\n== %s" % title, flush=True)
        started = time.monotonic()
        result = action()
        took = time.monotonic() - started
        self.steps.append((title, took))
        print("  (%.1f s)" % took, flush=True)
        return result


def _same_tpm(before: dict[str, str], after: dict[str, str]) -> bool:
    return all(before[k] == after[k] for k in TPM_KEYS)


def run(lab: NovaLab, hops: int) -> Demo:
    demo = Demo(lab)
    stack = lab.stack
    assert stack is not None
    tpm_server = demo.step("openstack server create --flavor %s --nic none" % VTPCM_FLAVOR,
                           lambda: servers.create(lab, "demo-vtpcm", VTPCM_FLAVOR))
    instance = tpm_server["id"]
    demo.expect(tpm_server["status"] == "ACTIVE", "server %s ACTIVE on %s"
                % (instance, servers.host_of(tpm_server)))
    with servers.console(lab, tpm_server) as con:
        con.write(os.urandom(32).hex())
        before = con.report()
    print("  guest wrote NV and extended PCR16: PCR16=%s... NV=%s..."
          % (before["PCR16"][:16], before["NV"][:16]))
    plain = demo.step("openstack server create --flavor %s --nic none" % PLAIN_FLAVOR,
                      lambda: servers.create(lab, "demo-plain", PLAIN_FLAVOR))

    plain_id = plain["id"]
    vtpcm_times: list[float] = []
    plain_times: list[float] = []
    for hop in range(1, hops + 1):
        src = servers.host_of(tpm_server)
        mig = demo.step("live migration %d/%d of the vTPCM server (from %s, no host given)"
                        % (hop, hops, src), lambda: servers.live_migrate(lab, instance))
        vtpcm_times.append(mig.seconds)
        tpm_server = mig.server
        after = servers.tpm_report(lab, tpm_server)
        demo.expect(mig.status == "completed" and mig.host != src,
                    "migration %s, now on %s" % (mig.status, mig.host))
        demo.expect(_same_tpm(before, after), "guest PCR16, NV, EK and boot id identical")
        record = stack.engine.get_vtpcm(instance)
        demo.expect((record.host, record.generation) == (mig.host, hop),
                    "engine: vTPCM on %s, generation %d" % (record.host, record.generation))
        demo.expect(stack.agents.get(src, instance).state == "DESTROYED",
                    "source vTPCM on %s destroyed" % src)
        pmig = demo.step("live migration %d/%d of the plain server" % (hop, hops),
                         lambda: servers.live_migrate(lab, plain_id))
        plain_times.append(pmig.seconds)
        plain = pmig.server
        demo.expect(pmig.status == "completed", "plain migration %s" % pmig.status)

    tpm_server, before = _cold_moves(demo, tpm_server)
    src = servers.host_of(tpm_server)
    bad = servers.other_host(lab, src)

    def untrusted() -> servers.Migration:
        with HostTPM(lab.stack_host(bad).tpm.tcti) as tpm:
            tpm.extend_pcr(5, hashlib.sha256(b"unexpected bootloader").digest())
        verdict = stack.engine.attest(bad)
        print("  %s's host TPM PCR 5 extended: verdict %s" % (bad, verdict.status))
        return servers.live_migrate(lab, instance, host=bad)

    mig = demo.step("openstack server migrate --live-migration --host %s (UNTRUSTED)" % bad,
                    untrusted)
    demo.expect(mig.status in ("refused", "error", "failed") and mig.host == src
                and mig.server["status"] == "ACTIVE",
                "refused: %s, server ACTIVE on %s"
                % (mig.refusal.rsplit(", ", 1)[-1].strip() if mig.refusal else
                   "migration " + mig.status, mig.host))
    demo.expect(_same_tpm(before, servers.tpm_report(lab, mig.server)),
                "guest TPM untouched")

    def delete() -> None:
        servers.delete(lab, instance)
        servers.delete(lab, plain_id)

    demo.step("openstack server delete (both)", delete)
    try:
        stack.engine.get_vtpcm(instance)
        demo.expect(False, "engine forgot the vTPCM")
    except exception.NotFound:
        demo.expect(True, "engine forgot the vTPCM")
    leftovers = list((lab.stack_host(src).state_dir / "vtpcms").glob("*"))
    demo.expect(not leftovers, "vTPCM state shredded on %s" % src)

    _summary(demo, vtpcm_times, plain_times)
    return demo


def _check_moved(demo: Demo, written: dict[str, str], after: dict[str, str]) -> None:
    """After a power off and on elsewhere: NV and the EK as written, PCRs afresh."""
    demo.expect((after["NV"], after["EK"]) == (written["NV"], written["EK"]),
                "guest NV and EK as written before the power off")
    demo.expect(after["PCR16"] == "0" * 64 and after["BOOTID"] != written["BOOTID"],
                "guest rebooted: PCR16 afresh, new boot id")


def _cold_moves(demo: Demo, server: dict[str, Any]) -> tuple[dict[str, Any],
                                                             dict[str, str]]:
    """Cold migration + confirm, resize to the larger vTPCM flavor + confirm,
    shelve-offload + unshelve onto the other host; the guest writes new TPM
    contents before each, which must come back. The server and its last report."""
    lab = demo.lab
    stack = lab.stack
    assert stack is not None
    instance = server["id"]
    report: dict[str, str] = {}
    for title, flavor in (("openstack server migrate (cold)", None),
                          ("openstack server resize --flavor %s" % VTPCM_FLAVOR_LARGER,
                           VTPCM_FLAVOR_LARGER)):
        src = servers.host_of(server)
        generation = stack.engine.get_vtpcm(instance).generation
        with servers.console(lab, server) as con:
            con.write(os.urandom(32).hex())
            written = con.report()
        moved = demo.step("%s, from %s" % (title, src),
                          lambda f=flavor: servers.resize(lab, instance, f))  # type: ignore[misc]
        demo.expect(moved.server["status"] == "VERIFY_RESIZE" and moved.host != src,
                    "VERIFY_RESIZE on %s" % moved.host)
        confirmed = demo.step("openstack server resize confirm",
                              lambda: servers.confirm_resize(lab, instance))
        server = confirmed.server
        record = stack.engine.get_vtpcm(instance)
        demo.expect((confirmed.status, record.host, record.generation)
                    == ("confirmed", moved.host, generation + 1),
                    "confirmed; engine: vTPCM on %s, generation %d"
                    % (record.host, record.generation))
        demo.expect(stack.agents.get(src, instance).state == "DESTROYED",
                    "source vTPCM on %s destroyed" % src)
        report = servers.tpm_report(lab, server)
        _check_moved(demo, written, report)

    src = servers.host_of(server)
    other = servers.other_host(lab, src)
    with servers.console(lab, server) as con:
        con.write(os.urandom(32).hex())
        written = con.report()
    demo.step("openstack server shelve (offloaded)", lambda: servers.shelve(lab, instance))
    server = demo.step("openstack server unshelve --host %s" % other,
                       lambda: servers.unshelve(lab, instance, other))
    record = stack.engine.get_vtpcm(instance)
    demo.expect(servers.host_of(server) == other == record.host,
                "ACTIVE on %s; engine: vTPCM there, generation %d"
                % (servers.host_of(server), record.generation))
    report = servers.tpm_report(lab, server)
    _check_moved(demo, written, report)
    return server, report


def _summary(demo: Demo, vtpcm_times: list[float], plain_times: list[float]) -> None:
    print("\n== summary")
    for title, took in demo.lab.timings.steps.items():
        print("  %6.1f s  %s" % (took, title))
    for title, took in demo.steps:
        print("  %6.1f s  %s" % (took, title))
    if vtpcm_times and plain_times:
        v, p = statistics.median(vtpcm_times), statistics.median(plain_times)
        print("  live migration, CLI call to ACTIVE on the destination (median of %d): "
              "vTPCM %.1f s, plain %.1f s: the vTPCM added %.1f s"
              % (len(vtpcm_times), v, p, v - p))
    print("  %s" % ("ALL CHECKS PASSED" if not demo.failed else
                    "FAILED: %s" % "; ".join(demo.failed)), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=4,
                        help="live migrations of each server (default 4)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the lab running afterwards (for a look around)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the real-Nova demo needs root", file=sys.stderr)
        return 2
    lab = NovaLab()
    result: Any = None
    print("== starting the real-Nova lab (Nova 34, placement, glance, 2 computes)",
          flush=True)
    try:
        lab.up()
        print("  up in %.1f s" % lab.timings.steps["up in total"], flush=True)
        result = run(lab, args.hops)
    finally:
        if not args.keep:
            lab.down()
    return 0 if result is not None and not result.failed else 1


if __name__ == "__main__":
    sys.exit(main())
