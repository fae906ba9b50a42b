"""Engine-run leases and ABORTED tombstones (issue 10, review of point 1).
Real engine daemons (two, on one SQLite database, reconcile every second,
short leases), two real agent daemons with swtpm host-TPM stand-ins,
RabbitMQ.

Found by review, each failing on the code before leases: two live workers
sharing ``[engine] host`` aborted each other's begins; a begin of a worker
killed for good waited for the step bound (RPC timeout + 30 s) with
another worker alive; a begin whose caller gave up before the engine
recorded it ended PREPARED with nobody waiting, until the deadline."""

import threading
import time
import uuid

import pytest

from tests.functional.deploy import Deployment, Spec, build, frozen
from tests.functional.harness import wait_for
from vtpcm_common import exception
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_nova.virt import livemigration

pytestmark = pytest.mark.functional

LEASE_TTL = 4.0
RECONCILE = 1
RPC_TIMEOUT = 20  # the engine's agent timeout: the old step bound was this + 30 s
# a begin of a run without a live lease is aborted by then (the lease, two
# reconcile passes, and the load of a shared machine)
LEASE_BOUND = LEASE_TTL + 2 * RECONCILE + 8
SHARED_HOST = "engine-shared"


@pytest.fixture(scope="module")
def deployment():
    spec = Spec("lease", workers=2, engine={
        "engine": {"host": SHARED_HOST, "rpc_timeout": RPC_TIMEOUT,
                   "worker_lease_ttl": LEASE_TTL},
        "migration": {"reconcile_interval": RECONCILE},
        "attestation": {"verdict_ttl": 600}})
    with build(spec) as d:
        yield d


def _vtpcm(d: Deployment, label: str) -> str:
    instance = str(uuid.uuid4())
    d.at[label].create_vtpcm(instance, d.hosts[label].name)
    d.at[label].start_vtpcm(instance)
    return instance


def _begin_in_thread(d: Deployment, mid: str, instance: str, at: EngineAPI
                     ) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    a, b = d.hosts["a"], d.hosts["b"]

    def run() -> None:
        try:
            out.append(at.begin(mid, instance, a.name, b.name))
        except exception.VTPCMException as err:
            out.append(err)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _state(d: Deployment, mid: str) -> str | None:
    try:
        return d.operator.get_migration(mid).state
    except exception.NotFound:
        return None


def test_two_live_workers_sharing_a_host_name_leave_each_others_begins_alone(deployment):
    """Both workers run as ``[engine] host = engine-shared`` and reconcile
    every second. A begin held in PREPARING (the destination's prepare
    waits) for several reconcile passes of both must end PREPARED; before
    leases the other worker aborted it at its first pass."""
    d = deployment
    instance = _vtpcm(d, "a")
    mid = str(uuid.uuid4())
    b = d.hosts["b"]
    assert b.agent.pid is not None
    with frozen(b.agent.pid):
        thread, out = _begin_in_thread(d, mid, instance, d.at["a"])
        wait_for("begin in PREPARING", lambda: _state(d, mid) == "PREPARING", 20)
        time.sleep(3 * RECONCILE + 2)  # passes of both workers
        assert _state(d, mid) == "PREPARING"
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert getattr(out[0], "state", out[0]) == "PREPARED", out
    assert livemigration.abort(d.at["a"], mid, "test done").state == "ABORTED"
    d.at["a"].destroy_vtpcm(instance)


def test_a_begin_of_a_killed_worker_is_aborted_once_its_lease_lapses(deployment):
    """One worker runs the begin and is killed (-9) inside it; the other,
    with another host name and alive all along, aborts the begin once the
    killed run's lease lapsed: within the lease, not the old step bound
    (RPC timeout + 30 s = 50 s here), and without any restart."""
    d = deployment
    first, second = d.engines
    second.stop()  # the begin goes to ``first``
    second.config["engine"]["host"] = "engine-other"
    instance = _vtpcm(d, "a")
    mid = str(uuid.uuid4())
    b = d.hosts["b"]
    assert b.agent.pid is not None
    try:
        with frozen(b.agent.pid):
            thread, _ = _begin_in_thread(d, mid, instance, d.host_api("a", timeout=8))
            wait_for("begin in PREPARING", lambda: _state(d, mid) == "PREPARING", 20)
            second.start()
            second.wait_ready(d.operator)
            first.kill9()
            killed = time.monotonic()
        thread.join(timeout=90)
        final = wait_for("the abandoned begin aborted", lambda: _state(d, mid) == "ABORTED",
                         LEASE_BOUND)
        took = time.monotonic() - killed
        assert final
        assert took < RPC_TIMEOUT + 30 - 10, took
        info = d.operator.get_migration(mid)
        assert "holds no live lease" in (info.error or ""), info
        assert d.agents.get(d.hosts["a"].name, instance).state == "ACTIVE"
        try:
            assert d.agents.get(b.name, instance).state == "DESTROYED"
        except exception.NotFound:
            pass  # the prepare came after the abort, and was refused
    finally:
        if first.proc is None:
            first.start()
            first.wait_ready(d.operator)
    d.at["a"].destroy_vtpcm(instance)


def test_an_abort_before_the_begin_was_recorded_refuses_the_late_begin(deployment):
    """The caller's begin times out while the engine still attests the
    destination (its agent holds the quote); the driver's abort, naming
    the instance, finds no record and leaves an ABORTED tombstone; the
    begin, going on after the quote, is refused, and nothing is prepared.
    Before: the abort was a no-op (NotFound), the begin ended PREPARED with
    nobody waiting, holding the vTPCM until the deadline."""
    d = deployment
    a, b = d.hosts["a"], d.hosts["b"]
    instance = _vtpcm(d, "a")
    # the destination's verdict expires (a policy assignment does that), so
    # begin attests it again
    d.operator.assign_policy(b.name, d.policy)
    impatient = d.host_api("a", timeout=4)
    mid = str(uuid.uuid4())
    assert b.agent.pid is not None
    with frozen(b.agent.pid):  # the quote waits
        with pytest.raises(exception.ServiceUnreachable):
            livemigration.begin(impatient, mid, instance, a.name, b.name)
        tomb = d.operator.get_migration(mid)
        assert (tomb.state, tomb.error) == ("ABORTED",
                                            "aborted before its begin was recorded"), tomb
        time.sleep(2)
    # the quote is answered now; the begin runs on and must be refused
    wait_for("the late begin refused", lambda: any(
        e.outcome == "refused" and e.migration_id == mid
        for e in d.operator.list_audit(limit=50).entries
        if e.event == "migration.begin"), RPC_TIMEOUT + 10)
    assert d.operator.get_migration(mid).state == "ABORTED"
    assert d.operator.get_vtpcm(instance).migration_id is None
    with pytest.raises(exception.NotFound):
        d.agents.get(b.name, instance)
    # a retried begin of that id is refused clearly too
    with pytest.raises(exception.MigrationError, match="aborted it before the engine "
                                                       "recorded its begin"):
        d.at["a"].begin(mid, instance, a.name, b.name)
    # and the next migration, with a new id, goes through
    mid2 = str(uuid.uuid4())
    assert d.at["a"].begin(mid2, instance, a.name, b.name).state == "PREPARED"
    assert livemigration.abort(d.at["a"], mid2, "test done").state == "ABORTED"
    d.at["a"].destroy_vtpcm(instance)
