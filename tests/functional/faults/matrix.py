"""The fault-injection matrix's cells (issue 10, point 4), without QEMU:
``run_cell`` (test_matrix.py parametrizes it).

Each cell kills one part at one step of a migration A -> B and either
brings it back at once ("restart": kill -9, then start) or keeps it down
past the RPC timeouts ("down": back after ``DOWN_FOR`` s, while the
migration goes on without it). The test plays Nova's driver with the real
``livemigration`` functions (begin aborts when it fails, a failed transfer
is rolled back with an abort, a commit is retried) and the agents' state
collector plays QEMU's stream. Then, with no operator action unless the
design calls for one (a human decision, or the hard reboot a dead swtpm
needs): the vTPCM is in exactly one place and the engine and both agents
agree (``assert_one_place``), its TPM contents (NV, persistent key, PCR16
read with tpm2-pytss) are unchanged or the documented outcome (permanent
state kept, PCRs fresh after the hard reboot), no orphan swtpm, state
directory or key file, and the next migration succeeds. Outcomes go to
``results.json`` (``tools/faults-table.py`` makes the docs table).

Left to the lab (QEMU only): a source swtpm dying before the switchover
(the state collector starts a stopped vTPCM for its read, where QEMU's
pre-save fails), the destination QEMU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.functional import tpmtools
from tests.functional.deploy import frozen, permanent, running_vtpcm, switchover
from tests.functional.faults import results
from tests.functional.faults.deployment import (
    MIGRATION_TIMEOUT,
    Deployment,
    assert_one_place,
    files_now,
    other,
    wait_state,
)
from tests.functional.harness import wait_for
from vtpcm_common import exception
from vtpcm_nova.virt import livemigration

# longer than the engine's agent RPC timeout and the driver's engine timeout
DOWN_FOR = 6.5
BROKER_RESTART = 1.0
# a caller's lost abort before the commit point is settled by the deadline
CONVERGE_WITHIN = MIGRATION_TIMEOUT + 20.0


def _quick_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 3.0))


class Fault:
    """One part of the deployment, killed on ``fire`` and back by ``heal``."""

    def __init__(self, d: Deployment, part: str, mode: str, instance: str) -> None:
        self.d, self.part, self.mode, self.instance = d, part, mode, instance
        self.timer: threading.Thread | None = None
        self.killed_pid: int | None = None

    def _restart(self) -> None:
        if self.part == "broker":
            assert self.d.relay is not None
            self.d.relay.restore()
        elif self.part == "engine":
            self.d.restart_engine()
        else:
            self.d.restart_agent("a" if self.part == "src_agent" else "b")

    def _daemon(self) -> object:
        if self.part == "engine":
            return self.d.engine
        return self.d.hosts["a" if self.part == "src_agent" else "b"].agent

    def fire(self) -> None:
        if self.part.endswith("swtpm"):
            # from its pid file: the agent may be held (SIGSTOP) right now
            host = self.d.hosts["a" if self.part == "src_swtpm" else "b"]
            pid = int((host.run_dir / (self.instance + ".pid")).read_text())
            assert b"swtpm" in Path("/proc/%d/cmdline" % pid).read_bytes()
            os.kill(pid, signal.SIGKILL)
            self.killed_pid = pid
            return
        if self.part == "broker":
            assert self.d.relay is not None
            self.d.relay.cut()
        else:
            self._daemon().kill9()  # type: ignore[attr-defined]
        if self.mode == "restart" and self.part == "broker":
            time.sleep(BROKER_RESTART)  # what a RabbitMQ restart takes, at least
            self._restart()
        elif self.mode == "restart":
            self._restart()
        else:
            def later() -> None:
                time.sleep(DOWN_FOR)
                self._restart()
            self.timer = threading.Thread(target=later, daemon=True)
            self.timer.start()

    def heal(self) -> None:
        """Every part up again (also after a failed cell)."""
        if self.timer is not None:
            self.timer.join(timeout=DOWN_FOR + 60)
            self.timer = None
        if self.part == "broker":
            assert self.d.relay is not None
            self.d.relay.restore()
        elif not self.part.endswith("swtpm"):
            daemon = self._daemon()
            if daemon.proc is None:  # type: ignore[attr-defined]
                self._restart()


@contextlib.contextmanager
def _held(d: Deployment, label: str) -> Iterator[None]:
    pid = d.hosts[label].agent.pid
    assert pid is not None
    with frozen(pid):
        yield


def _set_post_import_check(d: Deployment, on: bool) -> None:
    """Every engine worker restarted with ``[engine] post_import_check``
    ``on`` (a fault may have left one down: started again either way)."""
    for index, engine in enumerate(d.engines):
        engine.config.setdefault("engine", {})["post_import_check"] = str(on).lower()
        engine.stop()
        d.restart_engine(index)


@contextlib.contextmanager
def _without_post_import_check(d: Deployment) -> Iterator[None]:
    """For the inside-commit cells: they hold the destination's agent
    across the commit to stop it at COMMITTING, and the check, which asks
    that agent before the commit point, would wait on it instead. Past the
    commit point the check has no part, so those cells test the same with
    it off; every other cell runs with the default (on)."""
    _set_post_import_check(d, False)
    try:
        yield
    finally:
        _set_post_import_check(d, True)


def _in_thread(func: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(func())
        except exception.VTPCMException as err:
            out.append(err)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _drive(d: Deployment, fault: Fault, step: str, instance: str, mid: str) -> bool:
    """The driver's migration with the fault at ``step``. True if the
    switchover happened (the guest would run on B)."""
    a, b = d.hosts["a"], d.hosts["b"]
    eng = d.at["a"]
    if step == "before_begin":
        fault.fire()
    try:
        if step == "inside_begin":
            with _held(d, "b"):  # the prepare waits: sealed, not prepared
                thread, out = _in_thread(
                    lambda: livemigration.begin(eng, mid, instance, a.name, b.name))
                wait_state(d, mid, {"PREPARING"}, 20)
                fault.fire()
            thread.join(timeout=60)
            assert not thread.is_alive()
            if isinstance(out[0], exception.VTPCMException):
                raise out[0]
        else:
            livemigration.begin(eng, mid, instance, a.name, b.name)
    except exception.VTPCMException:
        return False  # livemigration.begin aborted (best effort)
    try:
        blobs = d.agents.export_state(a.name, instance)
        if step == "transfer":
            fault.fire()
        d.agents.import_state(b.name, blobs)
    except exception.VTPCMException as err:
        with contextlib.suppress(exception.VTPCMException):  # Nova's rollback
            livemigration.abort(eng, mid, "transfer failed: %s" % err)
        return False
    if step == "after_switchover":
        fault.fire()
    if step == "inside_commit":
        with _held(d, "b"):  # commit_incoming waits: past the commit point
            thread, _ = _in_thread(lambda: livemigration.commit(eng, mid, sleep=_quick_sleep))
            wait_state(d, mid, {"COMMITTING"}, 20)
            fault.fire()
        thread.join(timeout=120)
    else:
        with contextlib.suppress(exception.VTPCMException):
            livemigration.commit(eng, mid, sleep=_quick_sleep)
    return True


def _known(d: Deployment, mid: str) -> bool:
    try:
        d.operator.get_migration(mid)
    except exception.NotFound:
        return False
    return True


def _guest_tpm(d: Deployment, label: str, instance: str, vtpcm_id: str, running: bool
               ) -> tuple[dict[str, bytes], bool]:
    """The guest-visible TPM contents and whether the guest needed a hard
    reboot for them (its swtpm died: a new QEMU powers a restarted one on)."""
    paths = d.hosts[label].paths(instance, vtpcm_id)
    if running:
        try:
            return tpmtools.read_guest_state(paths, with_key=True), False
        except Exception:  # noqa: BLE001 - TPM not initialized: restarted swtpm
            tpmtools.power_on(paths)
            return tpmtools.read_guest_state(paths, with_key=True), True
    # the operator's hard reboot: stop/start through the engine, QEMU powers on
    d.at[label].stop_vtpcm(instance)
    d.at[label].start_vtpcm(instance)
    tpmtools.power_on(paths)
    return tpmtools.read_guest_state(paths, with_key=True), True


def run_cell(d: Deployment, part: str, step: str, mode: str) -> None:
    """One cell, checked and recorded (``results``); raises if it is lost."""
    cell = "%s/%s/%s" % (part, step, mode)
    with contextlib.ExitStack() as unchecked:
        if step == "inside_commit":
            unchecked.enter_context(_without_post_import_check(d))
        _run_cell(d, cell, part, step, mode)


def _run_cell(d: Deployment, cell: str, part: str, step: str, mode: str) -> None:
    started = time.monotonic()
    files = files_now(d)
    instance, vtpcm_id = running_vtpcm(d, "a")
    before = tpmtools.read_guest_state(d.hosts["a"].paths(instance, vtpcm_id), with_key=True)
    mid = str(uuid.uuid4())
    fault = Fault(d, part, mode, instance)
    outcome, notes = results.SURVIVED, []
    try:
        try:
            switched = _drive(d, fault, step, instance, mid)
        finally:
            fault.heal()
        final: str | None = None
        try:
            # a begin the engine never took expires in the broker (the
            # call's TTL) and leaves no record; the agents must agree below
            wait_for("migration %s recorded" % mid, lambda: _known(d, mid), 3)
        except TimeoutError:
            pass
        else:
            final = wait_state(d, mid, {"COMMITTED", "ABORTED", "REFUSED", "IN_DOUBT"},
                               CONVERGE_WITHIN)
        if final == "IN_DOUBT":
            # a human decision by design: the operator sees where the guest runs
            to = "destination" if switched else "source"
            try:
                assert d.operator.resolve_migration(mid, to, execute=True).done
                notes.append("IN_DOUBT, migration resolve --to %s" % to)
            except exception.ResolutionRefused as err:
                # the destination's agent went away after the import: its
                # capture cannot vouch for it, the resolve's own post-import
                # check says so, and the operator, who knows the cause,
                # overrides it (operator guide, "A commit refused by the
                # post-import check"); a mismatch would never be overridden
                assert to == "destination" and "cannot be checked" in str(err), err
                assert d.operator.resolve_migration(mid, to, execute=True,
                                                    despite_import_check=True).done
                notes.append("IN_DOUBT, post-import check cannot be checked (the "
                             "destination's agent restarted), migration resolve --to "
                             "destination --despite-import-check")
            outcome = results.OPERATOR
            final = wait_state(d, mid, {"COMMITTED", "ABORTED"}, CONVERGE_WITHIN)
        label, live_id, running = assert_one_place(d, instance, files)
        # the vTPCM follows the guest: B once the switchover happened
        assert label == ("b" if switched else "a"), (label, switched, final)
        now, rebooted = _guest_tpm(d, label, instance, live_id, running)
        if rebooted:
            assert permanent(now) == permanent(before)
            outcome = results.OPERATOR
            notes.append("swtpm died: nova reboot --hard; NV, keys kept, PCRs fresh")
        else:
            assert now == before
        notes.insert(0, "%s on %s" % (final or "never begun", "B" if label == "b" else "A"))
        # the next migration of that VM succeeds
        src, dst = label, other(label)
        mid2 = str(uuid.uuid4())
        at = d.at[src]
        livemigration.begin(at, mid2, instance, d.hosts[src].name, d.hosts[dst].name)
        switchover(d, instance, src, dst)
        # the answer may come before the source's shred (shred_later)
        assert livemigration.commit(at, mid2).state in livemigration.DONE_STATES
        wait_state(d, mid2, {"COMMITTED"}, CONVERGE_WITHIN)
        label2, id2, _ = assert_one_place(d, instance, files)
        assert label2 == dst
        assert permanent(tpmtools.read_guest_state(d.hosts[dst].paths(instance, id2),
                                                   with_key=True)) == permanent(before)
        d.at[dst].destroy_vtpcm(instance)
    except BaseException as err:
        results.record(cell, results.LOST, "%s: %s" % (type(err).__name__, err),
                       time.monotonic() - started)
        raise
    results.record(cell, outcome, "; ".join(notes), time.monotonic() - started)
