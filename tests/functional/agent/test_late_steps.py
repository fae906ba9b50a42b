"""Property 4/5 against late migration steps, with two real agents, their
swtpm host TPMs and RabbitMQ: a step of a migration delivered after the
vTPCM moved on (a call the engine gave up on under load and that runs
later, or a retry by reconcile) never touches the current holder's vTPCM.

Issue note "key-loss": the protocol benchmark once saw the holder's key
store entry missing at ``begin``. These tests drive the candidate
interleavings deterministically (a late step is sent exactly when it would
do harm) and check the holder's key store entry, record and next seal.
A late delivery is the same command sent again: a signed command is
refused only as a replay of its own nonce, so the first (late) delivery of
a step runs exactly like this."""

import os
import uuid

import pytest

from tests.functional.harness import ClusterHost, agent_cluster, client_conf, short_dir
from tests.refusal import refused
from vtpcm_agent import instances
from vtpcm_agent.association import VTPCMState
from vtpcm_agent.keystore import InstanceKeys
from vtpcm_common import exception
from vtpcm_common.api.agent import messages as m
from vtpcm_common.api.agent.rpcapi import AgentAPI

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def cluster():
    work = short_dir("vtlate")
    exchange = "vtpcm-test-" + uuid.uuid4().hex[:8]
    api = AgentAPI(client_conf(exchange), timeout=30)
    try:
        with agent_cluster(work, "l", exchange, api) as hosts:
            a, b = (ClusterHost(*h) for h in hosts)
            yield api, a, b
    finally:
        api.transport.cleanup()


def _entry(host: ClusterHost, vtpcm_id: str):
    return host.state_root / "keys" / (vtpcm_id + ".keys")


def _prepare(api: AgentAPI, src: ClusterHost, dst: ClusterHost, instance: str,
             generation: int) -> m.MigrationContext:
    ctx = m.MigrationContext(str(uuid.uuid4()), instance, generation, src.name, dst.name)
    kem = api.get_identity(dst.name, os.urandom(32)).kem_public
    sealed = api.seal_migration_key(src.name, ctx, kem)
    api.prepare_incoming(dst.name, ctx, sealed.envelope)
    return ctx


def _migrate(api: AgentAPI, src: ClusterHost, dst: ClusterHost, instance: str,
             generation: int) -> m.MigrationContext:
    """begin, the state handed over, commit: as benchmarks/protocol.py does."""
    ctx = _prepare(api, src, dst, instance, generation)
    api.import_state(dst.name, api.export_state(src.name, instance))
    api.commit_incoming(dst.name, ctx)
    api.commit_outgoing(src.name, ctx)
    return ctx


def _holds(api: AgentAPI, host: ClusterHost, instance: str, generation: int) -> m.VTPCMInfo:
    """``host`` holds the live vTPCM at ``generation`` with its key entry,
    and can seal its migration key again (the next ``begin``'s first step)."""
    info = api.get(host.name, instance)
    assert (info.state, info.generation) in (("ACTIVE", generation), ("STOPPED", generation))
    assert _entry(host, info.vtpcm_id).exists()
    return info


def _seal_and_abort(api: AgentAPI, src: ClusterHost, dst: ClusterHost, instance: str,
                    generation: int) -> None:
    ctx = _prepare(api, src, dst, instance, generation)
    api.abort_incoming(dst.name, ctx)
    api.abort_outgoing(src.name, ctx)


def test_a_late_abort_incoming_after_the_commit_keeps_the_holders_keys(cluster):
    api, a, b = cluster
    instance = str(uuid.uuid4())
    api.create(a.name, instance)
    api.start(a.name, instance)
    # planted positive control: an abort_incoming that lands while the
    # incoming vTPCM is still prepared does remove its key store entry, so
    # the check below can see a removal
    prepared = _prepare(api, a, b, instance, 0)
    doomed = api.get(b.name, instance).vtpcm_id
    assert _entry(b, doomed).exists()
    api.abort_incoming(b.name, prepared)
    assert not _entry(b, doomed).exists()
    api.abort_outgoing(a.name, prepared)

    ctx = _migrate(api, a, b, instance, 0)
    holder = _holds(api, b, instance, 1)
    # the abort the engine gave up on arrives now, twice, also as a
    # deadline abort (only_if_unused)
    api.abort_incoming(b.name, ctx)
    api.abort_incoming(b.name, ctx, only_if_unused=True)
    assert _holds(api, b, instance, 1).vtpcm_id == holder.vtpcm_id
    # the holder's swtpm restarts (a key epoch) and seals for the next begin
    api.stop(b.name, instance)
    api.start(b.name, instance)
    _seal_and_abort(api, b, a, instance, 1)
    _holds(api, b, instance, 1)


def test_late_steps_of_an_old_migration_leave_the_vtpcm_back_on_its_host_alone(cluster):
    api, a, b = cluster
    instance = str(uuid.uuid4())
    api.create(a.name, instance)
    api.start(a.name, instance)
    first = _migrate(api, a, b, instance, 0)  # A -> B, generation 1 on B
    second = _migrate(api, b, a, instance, 1)  # B -> A, generation 2 on A
    holder = _holds(api, a, instance, 2)

    # every step of the first migration, late, at the host that holds the
    # vTPCM again (A was its source) and at B (its destination)
    with pytest.raises(exception.MigrationError) as err:
        api.commit_outgoing(a.name, first)
    assert "expected MIGRATING_OUT" in str(err.value)
    api.abort_outgoing(a.name, first)  # a live vTPCM is left as it is
    kem = api.get_identity(b.name, os.urandom(32)).kem_public
    with pytest.raises(exception.MigrationError) as err:
        api.seal_migration_key(a.name, first, kem)
    assert "aborted" in str(err.value)  # the late abort_outgoing above recorded it
    api.abort_incoming(b.name, first)
    api.abort_incoming(a.name, second)  # the second one's, late, at its destination
    with pytest.raises(exception.MigrationError):
        api.commit_incoming(b.name, first)
    assert _holds(api, a, instance, 2).vtpcm_id == holder.vtpcm_id
    assert api.get(b.name, instance).state == "DESTROYED"

    api.stop(a.name, instance)
    api.start(a.name, instance)
    _seal_and_abort(api, a, b, instance, 2)
    _holds(api, a, instance, 2)


def _recorded(made: instances.InstanceManager, state: VTPCMState) -> tuple[str, str]:
    instance, vtpcm_id = str(uuid.uuid4()), str(uuid.uuid4())
    paths = made.paths(instance, vtpcm_id)
    made.associations.add(instance_uuid=instance, vtpcm_id=vtpcm_id, state=VTPCMState.CREATING,
                          generation=0, state_dir=str(paths.state_dir),
                          ctrl_socket=str(made.public_ctrl_socket(instance)))
    made.keystore.put(vtpcm_id, InstanceKeys.generate())
    paths.state_dir.mkdir(parents=True)
    if state is not VTPCMState.CREATING:
        made.associations.transition(instance, state)
    return instance, vtpcm_id


def test_a_discard_never_shreds_a_live_vtpcm(manager):
    """The last line behind every caller's own check: a discard of a vTPCM
    whose record is live (here STOPPED; an incoming one committed is
    ACTIVE) is refused and shreds nothing. Without it such a discard
    destroys the keys and the state and leaves the record live, the exact
    state the benchmark saw (``forget`` keeps live rows)."""
    # planted positive control: an unfinished create is discarded whole
    instance, vtpcm_id = _recorded(manager, VTPCMState.CREATING)
    manager._discard(instance, vtpcm_id, manager.paths(instance, vtpcm_id))
    assert not manager.keystore.exists(vtpcm_id)
    assert manager.associations.find(instance) is None

    instance, vtpcm_id = _recorded(manager, VTPCMState.STOPPED)
    paths = manager.paths(instance, vtpcm_id)
    with refused(exception.InvalidTransition,
                 "Illegal transition of vTPCM of instance %s from STOPPED to discarded" % instance):
        manager._discard(instance, vtpcm_id, paths)
    assert manager.keystore.exists(vtpcm_id) and paths.state_dir.is_dir()
    assert manager.associations.get(instance).state is VTPCMState.STOPPED
