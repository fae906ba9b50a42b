"""A two-host deployment whose every part can be killed and brought back:
a real engine daemon (reconcile every second, short RPC timeouts, as the
fault cases need), two real agent daemons with swtpm host-TPM stand-ins,
RabbitMQ. The QEMU stream is stood in for by the agents' state collector
(export_state on the source, import_state on the destination)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tests.functional import deploy
from tests.functional.faults.relay import BrokerRelay
from tests.functional.harness import ClusterHost, wait_for
from vtpcm_common import exception

# The engine's agent RPC timeout in these tests: "down past the RPC
# timeout" means down longer than this.
ENGINE_RPC_TIMEOUT = 5
# The old step bound (the RPC timeout + BEGIN_STEP_SLACK), which now applies
# only to begins that recorded no engine run.
BEGIN_STEP_BOUND = ENGINE_RPC_TIMEOUT + 30
# [engine] worker_lease_ttl: a begin of a killed engine run is aborted once
# its lease lapsed, at the next reconcile (coordinator.begin_abandoned).
WORKER_LEASE_TTL = 5
# [migration] timeout: a caller's lost abort is settled by the deadline.
MIGRATION_TIMEOUT = 40
ENGINE_EXTRA = {"engine": {"rpc_timeout": ENGINE_RPC_TIMEOUT,
                           "worker_lease_ttl": WORKER_LEASE_TTL},
                "migration": {"reconcile_interval": 1, "timeout": MIGRATION_TIMEOUT},
                "attestation": {"verdict_ttl": 3600}}
PCRS = (0, 7)


@dataclasses.dataclass
class Deployment(deploy.Deployment):
    """The builder's deployment, and the relay its daemons reach RabbitMQ
    through (``None``: directly)."""

    relay: BrokerRelay | None = None


def wait_state(d: Deployment, migration_id: str, states: set[str], timeout: float) -> str:
    """Wait until the engine reports the migration in one of ``states``."""
    def reached() -> str | None:
        try:
            state = d.operator.get_migration(migration_id).state
        except (exception.NotFound, exception.ServiceUnreachable):
            return None
        return state if state in states else None
    return str(wait_for("migration %s in %s" % (migration_id, sorted(states)), reached,
                        timeout))


def instance_processes(instance: str) -> list[int]:
    """Pids of every process whose command line names ``instance`` (a
    swtpm's socket and pid file carry it): what an orphan would be."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            status = (proc / "stat").read_text()
        except OSError:
            continue
        if instance.encode() in cmdline and ") Z " not in status:
            found.append(int(proc.name))
    return found


def vtpcm_files(host: ClusterHost) -> set[str]:
    """The vTPCM ids that have a state directory or a key file on ``host``."""
    ids = {p.name for p in (host.state_root / "vtpcms").glob("*")}
    ids |= {p.name.removesuffix(".keys") for p in (host.state_root / "keys").glob("*.keys")}
    return ids


def other(label: str) -> str:
    return "b" if label == "a" else "a"


def files_now(d: Deployment) -> dict[str, set[str]]:
    return {label: vtpcm_files(host) for label, host in d.hosts.items()}


def assert_one_place(d: Deployment, instance: str, files_before: dict[str, set[str]]
                     ) -> tuple[str, str, bool]:
    # files_before: taken before the instance's vTPCM was created
    """The vTPCM of ``instance`` is in exactly one place, and the engine and
    both agents agree on it: the engine's record (ACTIVE, no migration),
    that host's agent (ACTIVE, same id and generation), the other agent
    without it (none or DESTROYED), no state directory or key file of it
    elsewhere, no swtpm of it but the live one. Returns (label, vtpcm id,
    running)."""
    rec = d.operator.get_vtpcm(instance)
    # the engine's record keeps the agent's state at creation (STOPPED) until
    # a migration ends; whether the swtpm runs is the agent's to say
    assert rec.state in ("ACTIVE", "STOPPED") and rec.migration_id is None, rec
    label = next(lb for lb, h in d.hosts.items() if h.name == rec.host)
    live = d.agents.get(rec.host, instance)
    # (an incoming vTPCM keeps the id of the migration that brought it)
    assert live.state in ("ACTIVE", "STOPPED"), live
    assert (live.vtpcm_id, live.generation) == (rec.vtpcm_id, rec.generation), live
    try:
        gone = d.agents.get(d.hosts[other(label)].name, instance)
        assert gone.state == "DESTROYED", gone
    except exception.NotFound:
        pass
    listed = {lb: {v.instance_uuid for v in d.agents.list(h.name).vtpcms
                   if v.state != "DESTROYED"} for lb, h in d.hosts.items()}
    assert instance in listed[label] and instance not in listed[other(label)], listed
    now = files_now(d)
    assert now[label] - files_before[label] == {rec.vtpcm_id}, now
    assert now[other(label)] - files_before[other(label)] == set(), now
    assert instance_processes(instance) == ([live.pid] if live.running else []), (
        instance_processes(instance), live)
    return label, rec.vtpcm_id, live.running
