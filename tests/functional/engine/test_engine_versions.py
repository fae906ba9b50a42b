"""A rolling upgrade between the previous release's engine API (1.8) and
this one's (1.9: the scheduler's paged trusted_hosts) over the local RabbitMQ.

- A compute node or scheduler pinned with ``[upgrade_levels] vtpcm_engine
  = 1.8`` (what an old agent, Nova driver or filter can send) against the
  current engine daemon: the old host calls, host_command_key,
  signed_host_command_key, report_swtpm_restart (1.7) and start_incoming
  (1.8) work, the 1.9 trusted_hosts is refused before sending.
- An engine of the previous release (an in-process engine whose Target is
  1.8) answering a current client: old methods are served, the new one
  comes back as a clear ``RPCVersionUnsupported``.
"""

import shutil
import uuid

import oslo_messaging as messaging
import pytest

from tests.functional.deploy import Spec, build
from tests.functional.harness import client_conf, short_dir
from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.engine import messages as em
from vtpcm_common.api.engine.rpcapi import RPC_API_VERSION, EngineAPI
from vtpcm_lab import daemons
from vtpcm_nova.engine.db import migration
from vtpcm_nova.engine.db.api import Database
from vtpcm_nova.engine.manager import EngineManager

pytestmark = pytest.mark.functional

# the engine API of the previous release (it moves once per release, not
# with each new method: compare against the release operators upgrade from)
PREVIOUS = "1.8"


class PreviousEngine(EngineManager):
    """Today's code behind the previous version's Target."""

    target = messaging.Target(version=PREVIOUS)


def _serve_engine_in_process(conf, manager, server):
    transport = rpc.get_transport(conf)
    rpc_server = messaging.get_rpc_server(
        transport, messaging.Target(topic=rpc.topic(conf, "engine_topic"), server=server),
        [manager], access_policy=messaging.DefaultRPCAccessPolicy)
    rpc_server.start()

    def stop():
        rpc_server.stop()
        rpc_server.wait()
        transport.cleanup()
    return stop


@pytest.fixture(scope="module")
def upgrade():
    work = short_dir("vtengold")
    old_exchange = "vtpcm-engold-" + uuid.uuid4().hex[:8]
    old_conf = client_conf(old_exchange)
    migration.db_sync("sqlite:///%s/old-engine.sqlite" % work)
    old_db = Database("sqlite:///%s/old-engine.sqlite" % work)
    stop_old = _serve_engine_in_process(old_conf, PreviousEngine(old_db, None, None),
                                        "old-engine")
    on_old = EngineAPI(old_conf, timeout=30)  # unsigned: that engine checks no keys
    # create_vtpcm needs a TRUSTED host
    spec = Spec("engver", labels=("a",), engine={"attestation": {"auto_approve": "true"}})
    try:
        with build(spec) as d:
            name, agents = d.names["a"], d.agents
            key = authn.load_host_key(d.hosts["a"].agent.command_key)
            current = d.at["a"]
            # an old compute node: the cap comes from its [upgrade_levels]
            pinned_conf = client_conf(d.exchange)
            pinned_conf.set_override("vtpcm_engine", PREVIOUS, group="upgrade_levels")
            pinned = EngineAPI(pinned_conf, agents.transport, timeout=60, host_signer=key)
            # what the Nova driver pins as [vtpcm] engine_public_key
            engine_key = authn.load_public_key(authn.public_key_path(
                daemons.signing_key_path(d.exchange)))
            yield current, pinned, on_old, agents, name, engine_key
    finally:
        on_old.transport.cleanup()
        stop_old()
        old_db.dispose()
        shutil.rmtree(daemons.signing_key_path(old_exchange).parent, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def test_the_versions_compared_here_are_the_previous_release_and_a_newer_current():
    major, minor = RPC_API_VERSION.split(".")
    old_major, old_minor = PREVIOUS.split(".")
    assert major == old_major and int(minor) > int(old_minor)


def test_a_pinned_compute_node_runs_the_old_host_calls_on_the_current_engine(upgrade):
    _, pinned, _, agents, host, *_ = upgrade
    assert pinned.version_cap == PREVIOUS
    instance = str(uuid.uuid4())
    rec = pinned.create_vtpcm(instance, host)
    assert pinned.get_vtpcm(instance) == rec
    assert host in {h.name for h in pinned.list_hosts().hosts}
    pinned.destroy_vtpcm(instance)
    assert agents.get(host, instance).state == "DESTROYED"


def test_a_pinned_compute_node_refuses_the_newer_method_before_sending(upgrade):
    current, pinned, _, agents, host, engine_key = upgrade
    instance = str(uuid.uuid4())
    pinned.create_vtpcm(instance, host)
    try:
        assert pinned.start_vtpcm(instance).running  # 1.3
        assert pinned.stop_vtpcm(instance).state == "STOPPED"
        assert pinned.host_command_key(host).status == "APPROVED"  # 1.4
        nonce = b"\x05" * 16
        answer = pinned.signed_host_command_key(host, nonce)  # 1.6
        assert answer.status == "APPROVED"
        assert authn.verify_host_key(engine_key, answer.signature, host, answer.status,
                                     answer.command_public, nonce)
        assert not authn.verify_host_key(engine_key, answer.signature, host, answer.status,
                                         answer.command_public, b"\x06" * 16)
        report = em.SwtpmRestartReport(host, instance, agents.get(host, instance).vtpcm_id,
                                       "ACTIVE", "restarted", "died")
        pinned.report_swtpm_restart(report)  # 1.7
        with pytest.raises(exception.NotFound):
            pinned.start_incoming(str(uuid.uuid4()))  # 1.8: served, no such migration
        with pytest.raises(exception.RPCVersionCapped) as err:
            pinned.trusted_hosts()
        assert str(err.value) == (
            "Not sent: trusted_hosts needs %s RPC API 1.9, but [upgrade_levels] "
            "vtpcm_engine caps this client at 1.8 (some %s may still run an older "
            "release)" % (pinned.topic, pinned.topic))
    finally:
        current.destroy_vtpcm(instance)


def test_an_engine_of_the_previous_version_serves_old_methods(upgrade):
    _, _, on_old, _, host, *_ = upgrade
    assert on_old.list_hosts().hosts == ()
    with pytest.raises(exception.NotFound):
        on_old.get_vtpcm(str(uuid.uuid4()))
    # a 1.2 host call reaches it (this one checks no host keys, so refuses)
    with pytest.raises(exception.CommandRefused, match="checks no host command keys"):
        on_old.create_vtpcm(str(uuid.uuid4()), host)


def test_an_engine_of_the_previous_version_refuses_new_methods_clearly(upgrade):
    _, _, on_old, _, host, *_ = upgrade
    with pytest.raises(exception.RPCVersionUnsupported) as err:
        on_old.trusted_hosts()
    assert str(err.value) == (
        "%s cannot serve trusted_hosts (RPC API 1.9): it runs an older API "
        "version; "
        "upgrade it first, or cap this client with [upgrade_levels] vtpcm_engine meanwhile"
        % on_old.topic)
