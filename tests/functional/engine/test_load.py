"""Concurrency and load (issue 10, point 6): 200 protocol runs at once
against two engine worker processes on one PostgreSQL database, three real
agent daemons with swtpm host TPMs and a handful of vTPCMs each, real
RabbitMQ. No QEMU: the switchover is stood in for by the agents' state
collector (export on the source, import on the destination), or done by
the engine itself (``transfer_state``, a cold migration).

Runs mix commits (live and cold), aborts before and after the switchover,
and races the protocol must settle: two begins for one vTPCM, two commits
of one migration, a commit against an abort. Meanwhile an engine worker is
killed (-9) and restarted, then an agent, then the other worker. Callers
are the Nova driver's own functions (``vtpcm_nova.virt.livemigration``:
a failed or unanswered ``begin`` is aborted, ``commit`` retries); the
engine's own answers beneath them are counted too. The same runs, 40 of them,
go against one engine worker on SQLite.

Afterwards, within ``SETTLE_BOUND``: every migration is final; per vTPCM
the committed migrations form one chain (generations 0, 1, 2 ... each once,
each starting where the previous one ended: no double commit, no lost
update); the engine's authority is the one agent holding the vTPCM ACTIVE
at that generation, the others hold nothing live (no orphan swtpm, no
incoming left); the guest's NV data written before the runs reads back
where the vTPCM lives; what each caller was told agrees with the record;
the audit has exactly one commit point per committed migration and none
for the others.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.functional import tpmtools
from tests.functional.deploy import Spec, build
from tests.functional.harness import ClusterHost, EngineDaemon, wait_for
from vtpcm_agent.swtpm import process
from vtpcm_common import exception
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab import daemons
from vtpcm_nova.engine import protocol as p
from vtpcm_nova.engine.coordinator import TOMBSTONE_REASON
from vtpcm_nova.engine.db import api as db_api
from vtpcm_nova.virt import livemigration

pytestmark = pytest.mark.functional

RUNS = 200  # migration ids (a race run spends two)
PER_HOST = 4  # vTPCMs each agent holds at the start
CALLERS = 10  # concurrent callers (Nova drivers)
LABELS = ("a", "b", "c")
MIGRATION_TIMEOUT = 30  # [migration] timeout: a begin nobody answered for ends by then
RECONCILE_INTERVAL = 2
# every migration is final this long after the last caller returned: the
# deadline of a begin whose caller never heard of it, plus reconcile passes
SETTLE_BOUND = MIGRATION_TIMEOUT + 10 * RECONCILE_INTERVAL
# [engine] worker_lease_ttl: a begin whose worker was killed (and whose
# caller's abort got lost) is aborted this long after the kill + a pass
WORKER_LEASE_TTL = 10
CALL_BOUND = 90.0  # a caller retries a commit/abort without an answer this long
CALLERS_BOUND = 420.0  # every caller has returned by then (~60-130 s here)
KINDS = (("live", 40), ("cold", 15), ("abort", 12), ("switch-abort", 8),
         ("begin-race", 10), ("commit-race", 10), ("commit-abort-race", 5))
FINAL = {s.value for s in p.TERMINAL}


@dataclasses.dataclass
class Told:
    """What one caller was told about one migration."""

    instance: str
    source: str
    dest: str
    kind: str
    answers: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Cluster:
    operator: EngineAPI
    at: dict[str, EngineAPI]  # host name -> the engine as that host's driver calls it
    hosts: dict[str, ClusterHost]
    agents: AgentAPI
    engines: list[EngineDaemon]
    db: db_api.Database
    runs: int  # migration ids to spend


def _state(info: Any) -> str:
    return "NotFound" if info is None else str(info.state)  # None: begin never recorded


class Driver:
    """The engine as one host's Nova driver calls it (``livemigration``
    takes it), noting every answer the engine itself gave: the driver's
    retries hide a raced or lost answer, the figures should not."""

    def __init__(self, load: Load, api: EngineAPI) -> None:
        self.load, self.api = load, api

    def begin(self, migration_id: str, *args: str) -> Any:
        return self._ask("begin", migration_id,
                         lambda: self.api.begin(migration_id, *args))

    def commit(self, migration_id: str, shred_later: bool = False) -> Any:
        return self._ask("commit", migration_id,
                         lambda: self.api.commit(migration_id, shred_later))

    def abort(self, migration_id: str, reason: str, instance_uuid: str | None = None,
              timeout: float | None = None) -> Any:
        return self._ask("abort", migration_id,
                         lambda: self.api.abort(migration_id, reason, instance_uuid, timeout))

    def get_migration(self, migration_id: str) -> Any:
        return self.api.get_migration(migration_id)

    def _ask(self, what: str, migration_id: str, call: Callable[[], Any]) -> Any:
        try:
            info = call()
        except exception.VTPCMException as err:
            why = ("unanswered" if isinstance(err, exception.ServiceUnreachable) else
                   "raced" if "changed concurrently" in str(err) else type(err).__name__)
            self.load.note(migration_id, "engine-%s:%s" % (what, why))
            raise
        self.load.note(migration_id, "engine-%s:%s" % (what, info.state))
        return info


class Load:
    """The shared bookkeeping of one load run (callers are threads)."""

    def __init__(self, cluster: Cluster, instances: list[str], seed: int) -> None:
        self.c = cluster
        self.rng = random.Random(seed)  # noqa: S311 - a test's mix, not a secret
        self.lock = threading.Lock()
        self.free = list(instances)
        self.told: dict[str, Told] = {}
        self.budget = cluster.runs
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.counts: collections.Counter[str] = collections.Counter()
        self.started = 0

    # --- bookkeeping -----------------------------------------------------------

    def take(self) -> tuple[str, str] | None:
        """An idle instance and a kind of run, or None once the budget is spent."""
        with self.lock:
            if self.budget <= 0 or not self.free:
                return None
            if self.started < len(KINDS):  # each kind at least once, then the mix
                kind = KINDS[self.started][0]
            else:
                kind = self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
            need = 2 if kind == "begin-race" else 1
            if self.budget < need:
                kind, need = "live", 1
            self.budget -= need
            self.started += need
            instance = self.free.pop(self.rng.randrange(len(self.free)))
            return instance, kind

    def give_back(self, instance: str) -> None:
        with self.lock:
            self.free.append(instance)

    def new_migration(self, instance: str, source: str, dest: str, kind: str) -> str:
        mid = str(uuid.uuid4())
        with self.lock:
            self.told[mid] = Told(instance, source, dest, kind)
        return mid

    def note(self, mid: str, answer: str) -> None:
        with self.lock:
            self.told[mid].answers.append(answer)
            self.counts[answer.split(" ")[0]] += 1

    def timed(self, what: str, call: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        result = call()
        with self.lock:
            self.latency[what].append(time.monotonic() - t0)
        return result

    # --- what a Nova driver does ---------------------------------------------

    def holder(self, instance: str) -> tuple[str, str]:
        """(source, a destination) for the instance's next migration."""
        source = self.c.db.get_vtpcm(instance).host
        with self.lock:
            dest = self.rng.choice([h for h in self.c.hosts if h != source])
        return source, dest

    def driver(self, host: str) -> Driver:
        return Driver(self, self.c.at[host])

    def begin(self, mid: str) -> bool:
        """True iff PREPARED. The driver aborts a begin that failed or went
        unanswered (issue 10)."""
        t = self.told[mid]
        try:
            info = self.timed("begin", lambda: livemigration.begin(
                self.driver(t.source), mid, t.instance, t.source, t.dest))
        except exception.VTPCMException as err:
            self.note(mid, "begin:failed %s" % type(err).__name__)
            return False
        self.note(mid, "begin:%s" % info.state)
        return True

    def switchover(self, mid: str) -> bool:
        """QEMU's stop-and-copy, stood in for by the state collector."""
        t = self.told[mid]
        try:
            blobs = self.c.agents.export_state(t.source, t.instance)
            self.c.agents.import_state(t.dest, blobs)
        except exception.VTPCMException as err:
            self.note(mid, "switchover:failed %s" % type(err).__name__)
            return False
        self.note(mid, "switchover:done")
        return True

    def transfer(self, mid: str) -> bool:
        t = self.told[mid]
        try:
            info = self.c.at[t.source].transfer_state(mid)
        except exception.VTPCMException as err:
            self.note(mid, "transfer:failed %s" % type(err).__name__)
            return False
        self.note(mid, "transfer:%s" % info.state)
        return info.state == "TRANSFERRED"

    def commit(self, mid: str) -> str:
        """The driver's commit (it retries for ~17 s and takes a commit that
        went through as success); should it give up, retried as long as the
        engine does not answer (the guest runs on the destination)."""
        return self._retried(mid, "commit", lambda: livemigration.commit(
            self.driver(self.told[mid].source), mid).state)

    def abort(self, mid: str, signer: str, reason: str) -> str:
        return self._retried(mid, "abort", lambda: _state(livemigration.abort(
            self.driver(signer), mid, reason)))

    def _retried(self, mid: str, what: str, call: Callable[[], str]) -> str:
        deadline = time.monotonic() + CALL_BOUND
        first = True
        while True:
            try:
                state = self.timed(what, call) if first else call()
            except exception.ServiceUnreachable as err:
                self.note(mid, "%s:unanswered %s" % (what, type(err).__name__))
            except (exception.MigrationError, exception.InvalidTransition) as err:
                self.note(mid, "%s:refused %s" % (what, err))
                return "refused"
            else:
                self.note(mid, "%s:%s" % (what, state))
                return state
            first = False
            assert time.monotonic() < deadline, "%s of %s unanswered for %ss" % (
                what, mid, CALL_BOUND)
            time.sleep(0.5)

    # --- one run -------------------------------------------------------------

    def run(self, instance: str, kind: str) -> None:
        source, dest = self.holder(instance)
        if kind == "begin-race":
            self._begin_race(instance, source)
            return
        mid = self.new_migration(instance, source, dest, kind)
        if not self.begin(mid):
            return
        if kind == "abort":
            self.abort(mid, self.rng.choice([source, dest]), "Nova rolled back")
            return
        moved = self.transfer(mid) if kind == "cold" else self.switchover(mid)
        if not moved or kind == "switch-abort":
            self.abort(mid, source, "rollback after the transfer" if moved
                       else "the transfer failed")
            return
        if kind == "commit-race":
            _together(lambda: self.commit(mid), lambda: self.commit(mid))
        elif kind == "commit-abort-race":
            _together(lambda: self.commit(mid),
                      lambda: self.abort(mid, dest, "Nova rolled back meanwhile"))
        else:
            self.commit(mid)

    def _begin_race(self, instance: str, source: str) -> None:
        """Two begins for one vTPCM at once (to both other hosts): one wins."""
        dests = [h for h in self.c.hosts if h != source]
        mids = [self.new_migration(instance, source, d, "begin-race") for d in dests]
        won = _together(*(lambda m=m: self.begin(m) for m in mids))
        assert sum(won) <= 1, "two begins of one vTPCM both PREPARED: %s" % mids
        for mid, ok in zip(mids, won, strict=True):
            if ok and self.switchover(mid):
                self.commit(mid)
            elif ok:
                self.abort(mid, source, "the transfer failed")


def _together(*calls: Callable[[], Any]) -> list[Any]:
    """Run calls at the same instant on threads; their results in order."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []
    gate = threading.Barrier(len(calls))

    def one(i: int) -> None:
        try:
            gate.wait(timeout=30)
            results[i] = calls[i]()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            errors.append(err)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CALL_BOUND * 3)
    assert not any(t.is_alive() for t in threads), "a racing call never returned"
    if errors:
        raise errors[0]
    return results


@dataclasses.dataclass(frozen=True)
class Setup:
    """One database arm: its engine workers and how many runs it gets."""

    backend: str
    workers: int
    runs: int


SETUPS = [Setup("postgresql", 2, RUNS), Setup("sqlite", 1, RUNS // 5)]


@pytest.fixture(scope="module", params=SETUPS, ids=lambda s: s.backend)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    setup: Setup = request.param
    spec = Spec(
        "load", labels=LABELS, workers=setup.workers,
        db_url=request.getfixturevalue("pg_url") if setup.backend == "postgresql" else None,
        engine={"attestation": {"verdict_ttl": 3600},
                # a begin of a killed worker is aborted within SETTLE_BOUND
                "engine": {"rpc_timeout": 10, "worker_lease_ttl": WORKER_LEASE_TTL},
                "migration": {"reconcile_interval": RECONCILE_INTERVAL,
                              "timeout": MIGRATION_TIMEOUT}},
        host_timeout=25, keep_work=bool(os.environ.get("VTPCM_KEEP_WORK")))
    with build(spec) as d:
        db = db_api.Database(d.db_url)
        try:
            yield Cluster(d.operator, {h.name: d.at[label] for label, h in d.hosts.items()},
                          {h.name: h for h in d.hosts.values()}, d.agents, d.engines, db,
                          setup.runs)
        finally:
            db.dispose()


def _with_guest_state(c: Cluster) -> dict[str, tuple[str, bytes]]:
    """PER_HOST running vTPCMs on each host, each with its own NV data:
    instance -> (first host, NV data)."""
    nv: dict[str, tuple[str, bytes]] = {}
    for name, host in c.hosts.items():
        for _ in range(PER_HOST):
            instance = str(uuid.uuid4())
            rec = c.at[name].create_vtpcm(instance, name)
            c.at[name].start_vtpcm(instance)
            nv[instance] = (name, b"tenant NV " + os.urandom(8))
            tpmtools.write_guest_state(host.paths(instance, rec.vtpcm_id), nv[instance][1],
                                       os.urandom(32), make_key=False)
    return nv


class Chaos:
    """Kills (-9) and restarts an engine worker, then an agent, then the
    other worker (the only one again with one), as the runs reach a third,
    a half and two thirds."""

    def __init__(self, c: Cluster, load: Load) -> None:
        agent = c.hosts[sorted(c.hosts)[2]].agent
        runs = c.runs
        self.steps: list[tuple[int, str, Any]] = [
            (runs // 3, c.engines[-1].name, c.engines[-1]),
            (runs // 2, "agent " + agent.host, agent),
            (2 * runs // 3, c.engines[0].name, c.engines[0])]
        self.c, self.load = c, load
        self.done: list[str] = []
        self.stop = threading.Event()
        # a daemon: a test failed by pytest-timeout must not keep the run
        # alive with it (the test's finally stops it)
        self.thread = threading.Thread(target=self._loop, name="chaos", daemon=True)
        self.error: BaseException | None = None

    def _loop(self) -> None:
        try:
            for at_run, name, daemon in self.steps:
                while self.load.started < at_run:
                    if self.stop.wait(0.1):
                        return
                daemon.kill9()
                self.stop.wait(2.0)  # down for a moment: calls to it go unanswered
                daemon.start()
                if isinstance(daemon, daemons.AgentDaemon):
                    daemon.wait_ready(self.c.agents)
                else:
                    daemon.wait_ready(self.c.operator)
                self.done.append(name)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


def _caller(load: Load, errors: list[BaseException]) -> None:
    try:
        while (job := load.take()) is not None:
            instance, kind = job
            try:
                load.run(instance, kind)
            finally:
                load.give_back(instance)
    except BaseException as err:  # noqa: BLE001 - reported by the test
        errors.append(err)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _settled(c: Cluster, mids: list[str]) -> dict[str, db_api.MigrationRecord]:
    recs = {r.migration_id: r for r in c.db.list_migrations()}
    open_ = [(m, recs[m].state) for m in mids if m in recs and recs[m].state not in FINAL]
    if open_:
        raise AssertionError("not final yet: %s" % open_[:5])
    return recs


def _in_doubt_or_final(c: Cluster, mid: str) -> str | None:
    state = str(c.db.get_migration(mid).state)
    return state if state == "IN_DOUBT" or state in FINAL else None


def test_concurrent_runs_with_kills_converge(cluster: Cluster) -> None:
    """200 runs on two workers on PostgreSQL; 40 on one worker on SQLite."""
    c = cluster
    nv = _with_guest_state(c)
    load = Load(c, list(nv), seed=int.from_bytes(os.urandom(4), "big"))
    chaos = Chaos(c, load)
    errors: list[BaseException] = []
    callers = [threading.Thread(target=_caller, args=(load, errors), name="caller-%d" % i,
                                daemon=True)
               for i in range(CALLERS)]
    t0 = time.monotonic()
    try:
        chaos.thread.start()
        for thread in callers:
            thread.start()
        # one budget for all, inside pytest-timeout's 600 s with the setup
        deadline = t0 + CALLERS_BOUND
        for thread in callers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        wall = time.monotonic() - t0
    finally:
        # chaos restarting a daemon after build() stopped it would leave
        # that daemon running past the test
        chaos.stop.set()
        chaos.thread.join(timeout=120)
    assert not any(t.is_alive() for t in callers), "a caller never returned"
    assert not errors, errors
    assert chaos.error is None, chaos.error
    assert chaos.done == [name for _, name, _ in chaos.steps]
    assert load.started == c.runs

    # the operator's part, by design only: a destination agent killed after
    # the import leaves the post-import check unable to vouch for what it
    # imported; the commit is refused, the deadline makes the migration
    # IN_DOUBT, and the operator, who knows of the kill, resolves it
    # (operator guide, "A commit refused by the post-import check")
    unverified = [mid for mid, told in load.told.items()
                  if any(a.startswith("commit:refused") and "cannot be checked" in a
                         for a in told.answers)]
    for mid in unverified:
        # IN_DOUBT, or final already: a commit-abort-race's abort, or the
        # deadline's abort finding the destination not in use, ends it
        # ABORTED with no operator (the chain checks below still hold it)
        state = wait_for("migration %s in doubt or final" % mid,
                         lambda mid=mid: _in_doubt_or_final(c, mid), SETTLE_BOUND)
        if state != "IN_DOUBT":
            continue
        assert c.operator.resolve_migration(mid, "destination", execute=True,
                                            despite_import_check=True).done
        load.note(mid, "resolve:destination")
    # every migration final within the bound, with no caller or other operator step
    mids = list(load.told)
    recs = wait_for("every migration final", lambda: _settled(c, mids), SETTLE_BOUND)
    states = collections.Counter(recs[m].state if m in recs else "never begun" for m in mids)

    # what each caller was told agrees with the record
    for mid, told in load.told.items():
        final = recs[mid].state if mid in recs else None
        if {"commit:COMMITTED", "commit:SHREDDING"} & set(told.answers):
            assert final == "COMMITTED", (mid, told)
        if "abort:ABORTED" in told.answers:
            assert final == "ABORTED", (mid, told)
        if "resolve:destination" in told.answers:
            assert final == "COMMITTED", (mid, told)
        if told.kind == "commit-abort-race":
            assert not {"commit:COMMITTED", "abort:ABORTED"} <= set(told.answers), told

    # per vTPCM: one chain of commits, the authority at its end
    arrived: dict[str, str | None] = {}  # the migration that brought it where it is
    for instance, (first_host, _) in nv.items():
        chain = sorted((r for r in recs.values()
                        if r.instance_uuid == instance and r.state == "COMMITTED"),
                       key=lambda r: r.generation)
        assert [r.generation for r in chain] == list(range(len(chain))), \
            "double commit or lost update of %s: %s" % (
                instance, [(r.generation, r.source, r.dest) for r in chain])
        for before, after in zip(chain, chain[1:], strict=False):
            assert after.source == before.dest, (instance, before, after)
        rec = c.db.get_vtpcm(instance)
        # A vTPCM whose every run was refused before its begin claimed the
        # record keeps the state its create recorded (the agent's STOPPED: a
        # start does not write the record); a claim ends ACTIVE (restored or
        # committed). Nothing else writes STOPPED, so only "never claimed"
        # passes here (a CI run drew such a mix: 40 runs, one vTPCM unclaimed).
        expected_state = "ACTIVE" if chain or rec.state != "STOPPED" else "STOPPED"
        assert (rec.host, rec.generation, rec.state, rec.migration_id) == (
            chain[-1].dest if chain else first_host, len(chain), expected_state, None), (
            rec, recs.get(rec.migration_id or ""), load.told.get(rec.migration_id or ""),
            [(m, t.kind, t.answers) for m, t in load.told.items() if t.instance == instance])
        arrived[instance] = chain[-1].migration_id if chain else None

    # every vTPCM in exactly one place: its holder, live at the generation
    # (an agent keeps the id of the migration a vTPCM arrived with, until
    # an aborted migration out of it clears it)
    for name in c.hosts:
        for info in c.agents.list(name).vtpcms:
            rec = c.db.get_vtpcm(info.instance_uuid)
            if rec.host == name:
                assert (info.state, info.generation, info.running) == (
                    "ACTIVE", rec.generation, True), info
                assert info.migration_id in (None, arrived[info.instance_uuid]), info
            else:
                assert info.state == "DESTROYED" and not info.running, (name, info, rec)
    for instance, (_, data) in nv.items():
        rec = c.db.get_vtpcm(instance)
        holder = c.hosts[rec.host]
        info = c.agents.get(rec.host, instance)
        paths = holder.paths(instance, info.vtpcm_id)
        assert tpmtools.read_guest_state(paths, with_key=False)["nv"] == data, instance
        _only_live_swtpm(c, instance, rec.host, paths)

    # the audit: one commit point per committed migration, none for the others
    audit = c.db.list_audit(limit=100000)
    points = collections.Counter(e.migration_id for e in audit
                                 if (e.event, e.outcome) ==
                                 ("migration.commit", "commit point passed"))
    for mid in mids:
        expected = 1 if mid in recs and recs[mid].state == "COMMITTED" else 0
        assert points[mid] == expected, (mid, points[mid], recs.get(mid))
        accepted = [e for e in audit if e.migration_id == mid and
                    (e.event, e.outcome) == ("migration.begin", "accepted")]
        # none for a refused begin, nor for a tombstone (its caller's abort
        # came before the engine recorded the begin, which it then refused)
        assert len(accepted) == (0 if mid not in recs or recs[mid].state == "REFUSED"
                                 or recs[mid].error == TOMBSTONE_REASON else 1), (
            mid, accepted, recs.get(mid))
    assert not set(points) - set(mids)

    lat = {k: (_pct(v, 0.5), _pct(v, 0.95), len(v)) for k, v in load.latency.items()}
    print("\nLOAD %s: %d runs in %.1fs (%.2f runs/s), %d callers, kills %s\n  final: %s\n"
          "  answers: %s\n  latency ms p50/p95/n: %s" % (
              c.db.engine.url.get_backend_name(), len(mids), wall, len(mids) / wall,
              CALLERS, chaos.done, dict(states),
              dict(load.counts), {k: "%.0f/%.0f/%d" % v for k, v in lat.items()}))
    print("  tombstones: %d; begins aborted for their run: %d" % (
        sum(1 for m in mids if m in recs and recs[m].error == TOMBSTONE_REASON),
        sum(1 for m in mids if m in recs and "its begin never returned" in (
            recs[m].error or ""))))
    # the mix reached what it is for (or the checks above checked little)
    assert states["COMMITTED"] >= c.runs // 4 and states["ABORTED"] >= c.runs // 10, states
    # a begin race was lost: its loser is REFUSED, or ABORTED by its caller's
    # abort when it lost after its record was written (which way depends on
    # the instant; one SQLite run of 40 had no REFUSED at all)
    lost = [m for m, t in load.told.items()
            if t.kind == "begin-race" and "engine-begin:PREPARED" not in t.answers]
    assert lost and all(recs[m].state in ("REFUSED", "ABORTED") for m in lost if m in recs), (
        states, {m: load.told[m] for m in lost})


def _only_live_swtpm(c: Cluster, instance: str, holder: str, paths: process.SwtpmPaths
                     ) -> None:
    """The holder's swtpm runs; no other host runs one for the instance."""
    assert process.find_running(paths) is not None, (instance, holder)
    for name, host in c.hosts.items():
        pidfile = Path(host.run_dir) / (instance + ".pid")
        if name == holder or not pidfile.exists():
            continue
        pid = int(pidfile.read_text().strip() or 0)
        assert pid <= 1 or not _alive_swtpm(pid), (instance, name, pid)


def _alive_swtpm(pid: int) -> bool:
    try:
        return b"swtpm" in Path("/proc/%d/cmdline" % pid).read_bytes()
    except OSError:
        return False
