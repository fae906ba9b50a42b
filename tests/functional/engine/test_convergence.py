"""Convergence without an operator, and the operator's tools where a human
must decide (issue 10). Real engine daemon, two real agent daemons with
swtpm host-TPM stand-ins, RabbitMQ; the QEMU stream is stood in for by the
agents' state collector (export_state on the source, import_state on the
destination), which sets the state into the destination swtpm the way
QEMU's incoming side does."""

import os
import shutil
import signal
import uuid

import pytest

from tests.functional import tpmtools
from tests.functional.deploy import (
    Deployment,
    Spec,
    Trust,
    build,
    permanent,
    running_vtpcm,
    switchover,
)
from tests.functional.harness import wait_for
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em

pytestmark = pytest.mark.functional

PCRS = (0, 7)


@pytest.fixture(scope="module")
def deployment():
    spec = Spec("conv", engine={"attestation": {"verdict_ttl": 600}},
                trust=Trust(pcrs=PCRS, policy="golden"))
    with build(spec) as d:
        yield d


def test_destination_swtpm_dying_after_the_switchover_is_restarted_and_commits(deployment):
    """Issue 10's first case: it stayed COMMITTING forever, with the guest's
    TPM dead on the destination. Now the destination agent restarts its
    swtpm from the state it received and the source's commit lands."""
    d = deployment
    a, b = d.hosts["a"], d.hosts["b"]
    instance, vtpcm_id = running_vtpcm(d, "a")
    before = tpmtools.read_guest_state(a.paths(instance, vtpcm_id), with_key=True)
    mid = str(uuid.uuid4())
    assert d.at["a"].begin(mid, instance, a.name, b.name).state == "PREPARED"
    switchover(d, instance, "a", "b")
    incoming = d.agents.get(b.name, instance)
    os.kill(incoming.pid, signal.SIGKILL)
    done = d.at["a"].commit(mid)  # Nova's post_live_migration, at once
    assert done.state == "COMMITTED", done
    rec = d.operator.get_vtpcm(instance)
    assert (rec.host, rec.generation, rec.vtpcm_id) == (b.name, 1, incoming.vtpcm_id)
    now = d.agents.get(b.name, instance)
    assert (now.state, now.running, now.generation) == ("ACTIVE", True, 1)
    assert now.pid != incoming.pid
    assert d.agents.get(a.name, instance).state == "DESTROYED"  # shredded only now
    paths = b.paths(instance, incoming.vtpcm_id)
    tpmtools.power_on(paths)  # QEMU after the hard reboot the operator is told to do
    assert permanent(tpmtools.read_guest_state(paths, with_key=True)) == permanent(before)
    assert "AUDIT swtpm of instance %s (vTPCM %s, MIGRATING_IN) died" % (
        instance, incoming.vtpcm_id) in b.agent.log_text()
    # and in the engine's audit, reported by B's agent with B's host key
    wait_for("the restart in the engine's audit", lambda: [
        e for e in d.operator.list_audit(limit=100, host=b.name).entries
        if (e.event, e.outcome, e.instance) == ("vtpcm.swtpm", "restarted", instance)], 20)
    # a host reports on its own vTPCMs only: A no longer holds this one
    report = em.SwtpmRestartReport(a.name, instance, incoming.vtpcm_id, "ACTIVE",
                                   "restarted", "forged")
    with pytest.raises(exception.VTPCMNotHere, match="reports on its own vTPCMs only"):
        d.at["a"].report_swtpm_restart(report)
    d.at["b"].destroy_vtpcm(instance)


def _audits(d: Deployment, event: str, migration_id: str | None = None) -> list[str]:
    return [e.outcome for e in d.operator.list_audit(limit=500).entries
            if e.event == event and (migration_id is None or e.migration_id == migration_id)]


def test_operator_resolves_a_migration_its_source_never_committed(deployment):
    """The source's Nova never sends its commit (its host died after the
    switchover): the operator, who sees the guest on B, resolves to the
    destination. Without --yes (execute) only the plan comes back; a choice
    that would bring back an older generation is refused; all is audited."""
    d = deployment
    a, b = d.hosts["a"], d.hosts["b"]
    instance, _ = running_vtpcm(d, "a")
    mid = str(uuid.uuid4())
    d.at["a"].begin(mid, instance, a.name, b.name)
    switchover(d, instance, "a", "b")

    plan = d.operator.resolve_migration(mid, "destination")
    assert (plan.done, plan.state) == (False, "PREPARED")
    # the resolve ran the post-import check itself, on the real agents
    assert plan.plan.startswith(
        "Post-import check passed: the destination imported the source's permanent state. "
        "Commit migration %s of instance %s: the vTPCM on %s becomes the authority at "
        "generation 1" % (mid, instance, b.name))
    assert d.operator.get_migration(mid).state == "PREPARED"  # nothing done
    assert d.agents.get(a.name, instance).state == "MIGRATING_OUT"

    done = d.operator.resolve_migration(mid, "destination", execute=True)
    assert (done.done, done.state) == (True, "COMMITTED")
    assert d.operator.get_vtpcm(instance).host == b.name
    assert d.agents.get(a.name, instance).state == "DESTROYED"
    assert d.agents.get(b.name, instance).state == "ACTIVE"
    with pytest.raises(exception.ResolutionRefused, match="already COMMITTED"):
        d.operator.resolve_migration(mid, "source", execute=True)
    assert _audits(d, "migration.resolve", mid) == ["refused", "resolved", "planned"]
    d.at["b"].destroy_vtpcm(instance)


def test_operator_resolve_refuses_to_shred_the_only_good_copy(deployment):
    """Before the switchover the destination holds no state: resolving to it
    would shred the source's copy. Refused, audited, nothing changes; back to
    the source is allowed and restores it."""
    d = deployment
    a, b = d.hosts["a"], d.hosts["b"]
    instance, _ = running_vtpcm(d, "a")
    mid = str(uuid.uuid4())
    d.at["a"].begin(mid, instance, a.name, b.name)
    incoming = d.agents.get(b.name, instance)
    # the incoming swtpm dies and its (empty) state dir goes: nothing to commit
    os.kill(incoming.pid, signal.SIGKILL)
    shutil.rmtree(b.paths(instance, incoming.vtpcm_id).state_dir)
    with pytest.raises(exception.ResolutionRefused,
                       match="the only good one"):
        d.operator.resolve_migration(mid, "destination", execute=True)
    assert d.operator.get_migration(mid).state == "PREPARED"
    assert d.agents.get(a.name, instance).state == "MIGRATING_OUT"
    done = d.operator.resolve_migration(mid, "source", execute=True)
    assert done.state == "ABORTED"
    back = d.agents.get(a.name, instance)
    assert (back.state, back.generation) == ("ACTIVE", 0)
    d.at["a"].destroy_vtpcm(instance)


@pytest.fixture(scope="module")
def unchecked_deployment():
    """[engine] post_import_check off: the forget case needs a migration
    past its commit point whose destination then died, set up by killing
    the destination's agent before the source's commit; with the check on,
    that commit stops before the point (the destination cannot answer its
    digest), which tests/unit/engine/test_post_import_check.py covers."""
    spec = Spec("convu", engine={"attestation": {"verdict_ttl": 600},
                                 "engine": {"post_import_check": "false"}},
                trust=Trust(pcrs=PCRS, policy="golden"))
    with build(spec) as d:
        yield d


def test_operator_forgets_a_host_gone_for_good(unchecked_deployment):
    """Last in this module: host B's agent goes away for good. Forget is
    refused while B is approved, then shows and drops B's records."""
    d = unchecked_deployment
    a, b = d.hosts["a"], d.hosts["b"]
    instance, _ = running_vtpcm(d, "b")
    # review fix3: B also dies right after the source's commit of a migration
    # A -> B (COMMITTING, B's commit_incoming never answered)
    moving, vtpcm_id = running_vtpcm(d, "a")
    before = tpmtools.read_guest_state(a.paths(moving, vtpcm_id), with_key=True)
    mid = str(uuid.uuid4())
    d.at["a"].begin(mid, moving, a.name, b.name)
    switchover(d, moving, "a", "b")
    b.agent.kill9()
    with pytest.raises(exception.ServiceUnreachable):
        d.at["a"].commit(mid)
    assert d.operator.get_migration(mid).state == "COMMITTING"
    with pytest.raises(exception.ResolutionRefused, match="revoke it first"):
        d.operator.forget_host(b.name, execute=True)
    with pytest.raises(exception.ResolutionRefused, match="not REVOKED"):
        d.operator.resolve_migration(mid, "source", execute=True, past_commit=True)
    d.operator.revoke_host(b.name)
    with pytest.raises(exception.ResolutionRefused, match="past its commit point"):
        d.operator.resolve_migration(mid, "source", execute=True)
    done = d.operator.resolve_migration(mid, "source", execute=True, past_commit=True)
    assert (done.done, done.state) == (True, "ABORTED")
    assert "state at the switchover moment" in done.plan
    assert (d.operator.get_vtpcm(moving).host, d.operator.get_vtpcm(moving).generation) \
        == (a.name, 2)
    back = d.agents.get(a.name, moving)
    assert (back.state, back.generation, back.migration_id) == ("ACTIVE", 2, None)
    assert permanent(tpmtools.read_guest_state(a.paths(moving, vtpcm_id),
                                               with_key=True)) == permanent(before)
    d.at["a"].destroy_vtpcm(moving)
    plan = d.operator.forget_host(b.name)
    assert not plan.done and instance in plan.plan and "lost with it" in plan.plan
    assert d.operator.show_host(b.name).status == "REVOKED"
    assert d.operator.forget_host(b.name, execute=True).done
    with pytest.raises(exception.NotFound):
        d.operator.show_host(b.name)
    with pytest.raises(exception.NotFound):
        d.operator.get_vtpcm(instance)
    assert _audits(d, "host.forget") == ["forgotten", "planned", "refused"]
