"""A rolling upgrade between agent API 1.4 and 1.5 over the local RabbitMQ.

- A new engine pinned with ``[upgrade_levels] vtpcm_agent = 1.4`` against a
  current agent daemon: every 1.4 method works (get_identity in its 1.4
  form), the 1.5 method is refused by the client before it is sent.
- An agent of the previous version (an in-process agent whose Target is
  1.4) answering a current, unpinned client: the old methods work, the new
  one comes back as a clear ``RPCVersionUnsupported``.
"""

import os
import uuid

import oslo_messaging as messaging
import pytest

from tests.functional.harness import (
    agent_cluster,
    client_conf,
    random_command_public,
    serve_agent_in_process,
    short_dir,
)
from vtpcm_agent.manager import AgentManager
from vtpcm_common import exception
from vtpcm_common.api.agent.rpcapi import RPC_API_VERSION, AgentAPI

pytestmark = pytest.mark.functional

PREVIOUS = "1.4"


class EmptyInstances:
    """The instance manager of an agent without vTPCMs."""

    def list_vtpcms(self):
        return []

    def crashed(self):
        return []

    def get(self, instance_uuid):
        raise exception.NotFound(what="vTPCM of instance", key=instance_uuid)


class PreviousAgent(AgentManager):
    """Today's code behind the previous version's Target: what the
    dispatcher of a 1.4 agent accepts is exactly what this one accepts."""

    target = messaging.Target(version=PREVIOUS)


@pytest.fixture(scope="module")
def upgrade():
    work = short_dir("vtver")
    exchange = "vtpcm-ver-" + uuid.uuid4().hex[:8]
    conf = client_conf(exchange)
    current = AgentAPI(conf, timeout=30)
    pinned = AgentAPI(conf, current.transport, timeout=30, version_cap=PREVIOUS)
    old_host = "old-" + uuid.uuid4().hex[:6]
    stop_old = serve_agent_in_process(conf, PreviousAgent(
        old_host, EmptyInstances(), command_public=random_command_public()))
    try:
        with agent_cluster(work, "ve", exchange, current, labels=("a",)) as hosts:
            yield current, pinned, hosts[0][0], old_host
    finally:
        stop_old()
        current.transport.cleanup()


def test_the_versions_compared_here_are_the_current_and_previous_minor():
    major, minor = RPC_API_VERSION.split(".")
    assert PREVIOUS == "%s.%d" % (major, int(minor) - 1)


def test_a_pinned_client_runs_every_old_method_on_a_current_agent(upgrade):
    _, pinned, host, _ = upgrade
    assert pinned.health(host).api_version == RPC_API_VERSION
    instance = str(uuid.uuid4())
    created = pinned.create(host, instance)  # signed: 1.3
    assert pinned.start(host, instance).running
    assert pinned.get(host, instance).vtpcm_id == created.vtpcm_id
    assert instance in {v.instance_uuid for v in pinned.list(host).vtpcms}
    assert pinned.stop(host, instance).state == "STOPPED"
    identity = pinned.get_identity(host, os.urandom(32))  # asked as 1.4
    assert identity.host == host and identity.command_public is not None
    assert pinned.quote(host, os.urandom(32), (0, 1)).host == host
    assert pinned.destroy(host, instance).state == "DESTROYED"


def test_a_pinned_client_refuses_a_newer_method_before_sending_it(upgrade):
    current, pinned, host, old_host = upgrade
    with pytest.raises(exception.RPCVersionCapped) as err:
        pinned.activate_credential(host, b"credential", b"secret")
    assert str(err.value) == (
        "Not sent: activate_credential needs %s RPC API 1.5, but [upgrade_levels] "
        "vtpcm_agent caps this client at 1.4 (some %s may still run an older "
        "release)" % (pinned.topic, pinned.topic))
    # not sent: the old agent would have answered that it cannot serve it
    with pytest.raises(exception.RPCVersionCapped):
        pinned.activate_credential(old_host, b"credential", b"secret")
    with pytest.raises(exception.RPCVersionUnsupported):
        current.activate_credential(old_host, b"credential", b"secret")


def test_an_agent_of_the_previous_version_serves_old_methods(upgrade):
    current, pinned, _, old_host = upgrade
    assert current.health(old_host).host == old_host
    with pytest.raises(exception.NotFound):
        current.get(old_host, str(uuid.uuid4()))
    assert current.list(old_host).vtpcms == ()
    # get_identity in its 1.4 form reaches it (this one has no host TPM)
    with pytest.raises(exception.HostTPMError, match="no host TPM configured"):
        pinned.get_identity(old_host, os.urandom(32))


def test_an_agent_of_the_previous_version_refuses_new_methods_clearly(upgrade):
    current, _, _, old_host = upgrade
    for call in (lambda: current.activate_credential(old_host, b"credential", b"secret"),
                 lambda: current.get_identity(old_host, os.urandom(32))):
        with pytest.raises(exception.RPCVersionUnsupported) as err:
            call()
        assert str(err.value).startswith("%s.%s cannot serve " % (current.topic, old_host))
        assert str(err.value).endswith(
            "(RPC API 1.5): it runs an older API version; upgrade it first, or cap this "
            "client with [upgrade_levels] vtpcm_agent meanwhile")
