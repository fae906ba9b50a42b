"""Benchmark "attestation-scale": the engine's periodic attestation at 1,000 hosts.

The real ``Attestor`` (nonce, quote, verification, verdict and clock state
stored: the engine's ``attest_all`` periodic task) on a real database,
SQLite and PostgreSQL, for growing numbers of enrolled hosts. The hosts'
agents are simulated in this process, but every quote is a real TPM2_Quote:
each host has its own AK (its own key secrets, so its own primary key) in
one of a few swtpm host TPMs, and the verifier checks each one. Hosts are
enrolled straight into the database (as an approved ``enroll`` leaves them;
enrollment is not what is measured).

Engine CPU per attestation = this process's CPU time over a round minus the
CPU the simulated agents spent in their quote calls (their tpm2-pytss
client side; swtpm runs in its own processes), divided by the hosts.
Usage: .venv/bin/python benchmarks/attestation_scale.py [--smoke]
       [--sizes 10,100,1000] [--tpms 3] [--out-dir DIR]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import benchlib
import sqlalchemy

from vtpcm_agent import keyauth
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_lab.hosttpm import BOOT_PCRS, HostTPMStandIn, measured_boot
from vtpcm_nova.engine import attestation
from vtpcm_nova.engine.db import migration
from vtpcm_nova.engine.db.api import Database

NAME = "attestation-scale"
SIZES = (10, 100, 1000)
SMOKE_SIZES = (3, 6)
PG_ADMIN_URL = os.environ.get("VTPCM_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


class Agents:
    """The agents of every host: host i quotes with its own AK in TPM i % k."""

    def __init__(self, tpms: list[HostTPM]) -> None:
        self.tpms = tpms
        self.auth: dict[str, tuple[int, keyauth.KeyAuth]] = {}
        self.cpu = 0.0  # thread CPU seconds spent answering quotes

    def add(self, host: str) -> Any:
        index = len(self.auth) % len(self.tpms)
        self.auth[host] = (index, keyauth.derive(os.urandom(32)))
        return self._use(host).identity(os.urandom(32))

    def _use(self, host: str) -> HostTPM:
        index, auth = self.auth[host]
        tpm = self.tpms[index]
        tpm.use_key_auth(auth)
        return tpm

    def quote(self, host: str, nonce: bytes, pcrs: Sequence[int],
              bank: str) -> Mapping[str, Any]:
        start = time.thread_time()
        try:
            q = self._use(host).quote(nonce, pcrs, bank)
            return {"attest": q.attest, "signature": q.signature, "pcr_values": q.pcr_values}
        finally:
            self.cpu += time.thread_time() - start


@contextmanager
def database(kind: str, work: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield "sqlite:///%s/engine-%s.sqlite" % (work, uuid.uuid4().hex[:6])
        return
    name = "vtpcm_bench_" + uuid.uuid4().hex[:10]
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT",
                                     connect_args={"connect_timeout": 5})
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text('CREATE DATABASE "%s"' % name))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name))
        admin.dispose()


def run_backend(kind: str, sizes: list[int], rounds: int, agents: Agents,
                work: Path) -> list[dict[str, Any]]:
    out = []
    with database(kind, work) as url:
        migration.db_sync(url)
        db = Database(url)
        att = attestation.Attestor(db, lambda: agents, verdict_ttl=3600, nonce_ttl=60)
        enrolled = 0
        for size in sizes:
            while enrolled < size:
                host = "host-%04d" % enrolled
                ident = agents.add(host) if host not in agents.auth else \
                    agents._use(host).identity(os.urandom(32))
                db.enroll_host(host, ak_public=ident.ak_public, ak_name=ident.ak_name,
                               kem_public=ident.kem_public, kem_name=ident.kem_name,
                               approved=True)
                if enrolled == 0:
                    att.record_policy_from_host("golden", host, BOOT_PCRS)
                db.assign_policy(host, "golden")
                enrolled += 1
            att.attest_all()  # warm-up: first clock states, caches
            wall, cpu, agent_cpu = [], [], []
            for _ in range(rounds):
                agents.cpu = 0.0
                t0, c0 = time.perf_counter(), time.process_time()
                verdicts = att.attest_all()
                wall.append((time.perf_counter() - t0) / size * 1000)
                cpu.append((time.process_time() - c0 - agents.cpu) / size * 1000)
                agent_cpu.append(agents.cpu / size * 1000)
                bad = {h: v.reason for h, v in verdicts.items() if not v.trusted}
                assert len(verdicts) == size and not bad, bad
            t0 = time.perf_counter()
            trusted = db.fresh_verdicts()
            fresh_ms = (time.perf_counter() - t0) * 1000
            assert len(trusted) == size
            row = {"backend": kind, "hosts": size, "rounds": rounds,
                   "engine_cpu_ms_per_attestation": benchlib.summary(cpu),
                   "wall_ms_per_attestation": benchlib.summary(wall),
                   "agent_cpu_ms_per_attestation": benchlib.summary(agent_cpu),
                   "fresh_verdicts_query_ms": fresh_ms}
            benchlib.progress("attestation-scale: %s %d hosts: engine CPU %.2f ms, wall "
                              "%.2f ms per attestation" % (
                                  kind, size, row["engine_cpu_ms_per_attestation"]["median"],
                                  row["wall_ms_per_attestation"]["median"]))
            out.append(row)
        db.dispose()
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    plt = benchlib.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, style in (("sqlite", "o-"), ("postgresql", "s-")):
        rows = [r for r in result["rows"] if r["backend"] == kind]
        hosts = [r["hosts"] for r in rows]
        ax1.plot(hosts, [r["engine_cpu_ms_per_attestation"]["median"] for r in rows], style,
                 label="%s engine CPU" % kind)
        ax1.plot(hosts, [r["wall_ms_per_attestation"]["median"] for r in rows],
                 style.replace("-", "--"), label="%s wall" % kind)
        ax2.plot(hosts, [r["fresh_verdicts_query_ms"] for r in rows], style, label=kind)
    ax1.set_xscale("log")
    ax1.set_xlabel("enrolled hosts (all attested each round)")
    ax1.set_ylabel("ms per attestation (median over rounds)")
    ax1.set_title("periodic attest_all: cost per host")
    ax1.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_xlabel("hosts")
    ax2.set_ylabel("ms")
    ax2.set_title("fresh_verdicts (the scheduler's query)")
    ax2.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle("attestation-scale: %s, %s cores, %s, load %s%s" % (
        m["cpu_model"], m["nproc"], m["date_utc"], m.get("loadavg_start"),
        " (SMOKE)" if result["smoke"] else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tpms", type=int, default=3)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--out-dir")
    args = parser.parse_args()
    sizes = args.sizes or list(SMOKE_SIZES if args.smoke else SIZES)
    rounds = args.rounds or (1 if args.smoke else 2)
    out = benchlib.out_dir(args.smoke, args.out_dir)
    machine = benchlib.machine()
    work = Path(tempfile.mkdtemp(prefix="vtbas"))
    standins: list[HostTPMStandIn] = []
    tpms: list[HostTPM] = []
    rows: list[dict[str, Any]] = []
    try:
        for i in range(args.tpms):
            standin = HostTPMStandIn(work / ("tpm%d" % i), name="scale%d" % i)
            standin.start()
            standins.append(standin)
            measured_boot(standin.tcti)
            tpms.append(HostTPM(standin.tcti))
        agents = Agents(tpms)
        for kind in args.backends.split(","):
            rows += run_backend(kind, sizes, rounds, agents, work)
    finally:
        for tpm in tpms:
            tpm.close()
        for standin in standins:
            standin.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": NAME, "smoke": args.smoke, "machine": machine,
              "tpms": args.tpms, "pcrs": list(BOOT_PCRS), "rows": rows,
              "method": __doc__.split("\n\n")[1].replace("\n", " ")}
    benchlib.write_json(out / (NAME + ".json"), result)
    plot(result, out / (NAME + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
