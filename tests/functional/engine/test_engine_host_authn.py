"""The engine runs the Nova driver's calls (create/destroy/start/stop a vTPCM,
check_destination, begin, commit, abort) only when a host the call concerns
signed it with the command key the engine learnt when it enrolled that host,
bound into the host TPM's certify. A broker client without a host key, or a
compromised compute node C, cannot destroy host A's vTPCM nor start, commit
or abort a migration between A and B. Real agent daemons, engine daemon,
RabbitMQ and swtpm host TPMs."""

import uuid

import pytest

from tests.functional.deploy import Spec, Trust, build
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as m

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def deployment():
    """Hosts A, B, C enrolled (their keys known); A and C TRUSTED.
    create_vtpcm needs a TRUSTED host; B has no policy, so a migration to
    it is refused at begin."""
    spec = Spec("host", labels=("a", "b", "c"),
                engine={"attestation": {"auto_approve": "true"}},
                trust=Trust(labels=("a", "c")))
    with build(spec) as d:
        yield d


def _refused(call, reason):
    with pytest.raises(exception.CommandRefused) as err:
        call()
    assert reason in str(err.value), str(err.value)


def test_the_host_itself_may_create_and_destroy_its_vtpcm(deployment):
    d = deployment
    instance = str(uuid.uuid4())
    rec = d.at["a"].create_vtpcm(instance, d.names["a"])
    assert rec.host == d.names["a"] and rec.state != "CREATING"
    assert d.agents.get(d.names["a"], instance).vtpcm_id == rec.vtpcm_id
    d.at["a"].destroy_vtpcm(instance)
    with pytest.raises(exception.NotFound):
        d.operator.get_vtpcm(instance)


def _host_refusals(d):
    return [e for e in d.operator.list_audit(limit=500).entries
            if e.event == "host-call" and e.outcome == "refused"]


def test_calls_without_the_concerned_hosts_key_are_refused_and_change_nothing(deployment):
    d = deployment
    a, b = d.names["a"], d.names["b"]
    instance = str(uuid.uuid4())
    audited = len(_host_refusals(d))
    # create for host A: unsigned (any broker client), or signed by host C
    _refused(lambda: d.operator.create_vtpcm(instance, a), "no host command signature")
    _refused(lambda: d.at["c"].create_vtpcm(instance, a),
             "signature does not verify with the host command key of %s" % a)
    with pytest.raises(exception.NotFound):
        d.operator.get_vtpcm(instance)
    with pytest.raises(exception.NotFound):
        d.agents.get(a, instance)
    rec = d.at["a"].create_vtpcm(instance, a)
    before = d.agents.get(a, instance)
    # destroy and check_destination need A's key (or B's, for the check);
    # moving the vTPCM out of A (begin) needs A's: not C's, not the
    # destination's, and not a broker client's
    mismatch = "signature does not verify with the host command key of %s" % a
    for who, api in (("broker client", d.operator), ("host C", d.at["c"])):
        reason = "no host command signature" if who == "broker client" else mismatch
        _refused(lambda api=api: api.destroy_vtpcm(instance), reason)
        _refused(lambda api=api: api.check_destination(instance, b),
                 reason if who == "broker client" else
                 "host command key of %s or %s" % (a, b) if a < b else
                 "host command key of %s or %s" % (b, a))
    for who, api in (("broker client", d.operator), ("host C", d.at["c"]),
                     ("destination B", d.at["b"])):
        mid = str(uuid.uuid4())
        _refused(lambda api=api, mid=mid: api.begin(mid, instance, a, b),
                 "no host command signature" if who == "broker client" else mismatch)
        with pytest.raises(exception.NotFound):
            d.operator.get_migration(mid)
    assert d.operator.get_vtpcm(instance) == rec
    assert d.agents.get(a, instance) == before
    assert len(_host_refusals(d)) == audited + 9
    d.at["a"].destroy_vtpcm(instance)


def _power_audits(d, host, instance):
    return [(e.event, e.outcome) for e in d.operator.list_audit(limit=100, host=host).entries
            if e.instance == instance and e.event in ("vtpcm.start", "vtpcm.stop")]


def test_the_holder_starts_and_stops_its_vtpcm_through_the_engine(deployment):
    """What the Nova driver does at power on/off, with only its host key.
    Starting a running vTPCM and stopping a stopped one succeed unchanged."""
    d = deployment
    a = d.names["a"]
    instance = str(uuid.uuid4())
    rec = d.at["a"].create_vtpcm(instance, a)
    try:
        started = d.at["a"].start_vtpcm(instance)
        assert (started.instance_uuid, started.vtpcm_id, started.host, started.generation,
                started.state, started.running) == (instance, rec.vtpcm_id, a,
                                                    rec.generation, "ACTIVE", True)
        running = d.agents.get(a, instance)
        assert running.state == "ACTIVE" and running.running and running.pid
        assert started.ctrl_socket == running.ctrl_socket
        assert d.at["a"].start_vtpcm(instance) == started
        assert d.agents.get(a, instance).pid == running.pid  # the same swtpm

        stopped = d.at["a"].stop_vtpcm(instance)
        assert (stopped.state, stopped.running) == ("STOPPED", False)
        assert d.at["a"].stop_vtpcm(instance) == stopped
        after = d.agents.get(a, instance)
        assert after.state == "STOPPED" and not after.running and after.pid is None
        assert _power_audits(d, a, instance) == [  # newest first
            ("vtpcm.stop", "stopped"), ("vtpcm.stop", "stopped"),
            ("vtpcm.start", "running"), ("vtpcm.start", "running")]
    finally:
        d.at["a"].destroy_vtpcm(instance)


def test_only_the_holder_may_start_or_stop_a_vtpcm(deployment):
    d = deployment
    a = d.names["a"]
    instance = str(uuid.uuid4())
    d.at["a"].create_vtpcm(instance, a)
    try:
        d.at["a"].start_vtpcm(instance)
        before = d.agents.get(a, instance)
        audited = len(_host_refusals(d))
        mismatch = "signature does not verify with the host command key of %s" % a
        for api, reason in ((d.operator, "no host command signature"),  # any broker client
                            (d.at["b"], mismatch), (d.at["c"], mismatch)):  # other hosts
            _refused(lambda api=api: api.stop_vtpcm(instance), reason)
            _refused(lambda api=api: api.start_vtpcm(instance), reason)
        assert d.agents.get(a, instance) == before  # still running, the same swtpm
        assert len(_host_refusals(d)) == audited + 6
        details = [e.detail for e in _host_refusals(d)[:6]]  # newest first
        expected = [(method, reason) for reason in (mismatch, mismatch,
                                                    "no host command signature")
                    for method in ("start_vtpcm", "stop_vtpcm")]
        for detail, (method, reason) in zip(details, expected, strict=True):
            assert detail.startswith("Command %s refused: %s" % (method, reason)), detail
            assert detail.endswith("(for %s)" % a), detail
        assert _power_audits(d, a, instance) == [("vtpcm.start", "running")]
        with pytest.raises(exception.NotFound):
            d.at["a"].start_vtpcm(str(uuid.uuid4()))
    finally:
        d.at["a"].destroy_vtpcm(instance)


def test_the_two_hosts_may_commit_or_abort_and_no_third_host(deployment):
    """begin as the Nova driver on A would; then C tries to commit and to
    abort: refused before the coordinator sees it. A (post_live_migration)
    and B may sign a commit: their calls reach the coordinator, which
    refuses to commit this REFUSED migration. (Before the commit point the
    coordinator takes only A's commit; B's counts only to finish one past
    it: tests/unit/engine/test_coordinator.py.)"""
    d = deployment
    a, b = d.names["a"], d.names["b"]
    instance = str(uuid.uuid4())
    d.at["a"].create_vtpcm(instance, a)
    mid = str(uuid.uuid4())
    with pytest.raises(exception.HostNotTrusted):
        d.at["a"].begin(mid, instance, a, b)  # B has no PCR policy
    assert d.operator.get_migration(mid).state == "REFUSED"
    either = "host command key of %s or %s" % tuple(sorted((a, b)))
    audited = len(_host_refusals(d))
    for host in ("a", "b"):
        with pytest.raises(exception.InvalidTransition,
                           match="from REFUSED to CommitRequested"):
            d.at[host].commit(mid)
    assert len(_host_refusals(d)) == audited
    _refused(lambda: d.at["c"].commit(mid), "signature does not verify with the " + either)
    _refused(lambda: d.at["c"].abort(mid, "hostile"),
             "signature does not verify with the " + either)
    _refused(lambda: d.operator.commit(mid), "no host command signature")
    assert len(_host_refusals(d)) == audited + 3
    assert d.operator.get_migration(mid).state == "REFUSED"
    assert d.agents.get(a, instance).state in ("ACTIVE", "STOPPED")
    d.at["a"].destroy_vtpcm(instance)


def test_a_pending_or_revoked_hosts_key_does_not_count(deployment):
    d = deployment
    c = d.names["c"]
    instance = str(uuid.uuid4())
    d.operator.revoke_host(c)
    try:
        _refused(lambda: d.at["c"].create_vtpcm(instance, c),
                 "no approved host with an enrolled command key may sign it")
        # re-enrolled but (with auto-approve off) it would be PENDING: same refusal
    finally:
        assert d.operator.enroll(c).status == "APPROVED"
    with pytest.raises(exception.NotFound):
        d.operator.get_vtpcm(instance)


def test_a_captured_host_call_cannot_be_replayed(deployment):
    d = deployment
    a = d.names["a"]
    instance = str(uuid.uuid4())
    payload = m.VtpcmPlacement(instance, a).validated().to_wire()
    assert d.at["a"].host_signer is not None
    auth = d.at["a"].host_signer.sign("create_vtpcm", "", payload)
    cctxt = d.operator.client.prepare(version="1.0")  # anyone who saw the message
    assert cctxt.call({}, "create_vtpcm", payload=payload, auth=dict(auth))["host"] == a
    d.at["a"].destroy_vtpcm(instance)
    with pytest.raises(exception.CommandRefused, match="replayed"):
        cctxt.call({}, "create_vtpcm", payload=payload, auth=dict(auth))
    with pytest.raises(exception.NotFound):
        d.operator.get_vtpcm(instance)
    tombstone = d.agents.get(a, instance)  # not created again after the destroy
    assert tombstone.state == "DESTROYED" and not tombstone.running


def test_reenrolment_learns_a_rotated_key(deployment):
    """Key rotation: stop the agent, delete its key, start it (new key),
    revoke and re-enroll: the engine knows only the new key."""
    d = deployment
    c = d.names["c"]
    agent = d.hosts["c"].agent
    old = d.at["c"]
    agent.stop()
    agent.command_key.unlink()
    agent.start()
    agent.wait_ready(d.agents)
    d.operator.revoke_host(c)
    assert d.operator.enroll(c).status == "APPROVED"
    new = d.host_api("c", timeout=60)
    assert new.host_signer.fingerprint != old.host_signer.fingerprint
    instance = str(uuid.uuid4())
    _refused(lambda: old.create_vtpcm(instance, c),
             "signature does not verify with the host command key of %s" % c)
    assert new.create_vtpcm(instance, c).host == c
    new.destroy_vtpcm(instance)
    d.at["c"] = new


def test_a_prepared_migration_is_committed_by_the_source_only(deployment):
    """The danger the commit rule guards against: a PREPARED migration (key
    sealed, destination prepared and holding the state), where a commit
    would shred the source. The destination's signed commit is refused with
    its reason and moves nothing; the source's passes the commit point.
    (Last in this module: it gives the deployment a PCR policy.)"""
    d = deployment
    a, b = d.names["a"], d.names["b"]
    d.operator.record_policy("guards", a, (0, 1, 2, 3, 4, 5, 6, 7), "lab boot chain")
    for host in (a, b):
        d.operator.assign_policy(host, "guards")
    assert d.operator.attest(b).status == "TRUSTED"
    instance = str(uuid.uuid4())
    d.at["a"].create_vtpcm(instance, a)
    d.at["a"].start_vtpcm(instance)
    mid = str(uuid.uuid4())
    assert d.at["a"].begin(mid, instance, a, b).state == "PREPARED"
    # what QEMU does at the switchover: the destination receives the state
    d.agents.import_state(b, d.agents.export_state(a, instance))

    refused_before = [e for e in d.operator.list_audit(limit=500).entries
                      if e.event == "migration.commit" and e.outcome == "refused"]
    with pytest.raises(exception.MigrationError) as err:
        d.at["b"].commit(mid)
    assert "only the source may pass the commit point (migration is PREPARED)" \
        in str(err.value)
    refused = [e for e in d.operator.list_audit(limit=500).entries
               if e.event == "migration.commit" and e.outcome == "refused"]
    assert len(refused) == len(refused_before) + 1 and refused[0].host == b
    assert d.operator.get_migration(mid).state == "PREPARED"
    assert d.operator.get_vtpcm(instance).host == a
    source, incoming = d.agents.get(a, instance), d.agents.get(b, instance)
    assert (source.state, source.running) == ("MIGRATING_OUT", True)
    assert (incoming.state, incoming.running) == ("MIGRATING_IN", True)

    assert d.at["a"].commit(mid).state == "COMMITTED"
    assert d.operator.get_vtpcm(instance).host == b
    moved, gone = d.agents.get(b, instance), d.agents.get(a, instance)
    assert (moved.state, moved.generation) == ("ACTIVE", 1)
    assert gone.state == "DESTROYED" and not gone.running
    d.at["b"].destroy_vtpcm(instance)
