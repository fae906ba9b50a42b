"""A rolling upgrade from the previous release's agent API (1.5) to the
current one (signed replies since 1.6) over the local RabbitMQ.

- An engine of the previous release (a 1.5 client, no reply keys) against
  a current agent daemon: every method works as before, replies unsigned
  (so agents may be upgraded first).
- A current engine (reply keys) pinned with ``[upgrade_levels] vtpcm_agent
  = 1.5``: it sends nothing whose reply it would have to take unsigned
  (``RPCVersionCapped``), only the TPM-signed attestation calls.
- An agent of the previous version (an in-process agent whose Target is
  1.5) answering a current client: attestation works, every other call
  is an unauthenticated reply naming the likely cause (an old agent),
  never an unsigned answer taken for true.
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
from vtpcm_common import authn, exception
from vtpcm_common.api.agent.rpcapi import RPC_API_VERSION, AgentAPI

pytestmark = pytest.mark.functional

# The agent API of the previous release (c383b19): the last one without
# signed replies, which is what a rolling upgrade of this release meets.
PREVIOUS = "1.5"


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
    dispatcher of a 1.5 agent accepts is exactly what this one accepts."""

    target = messaging.Target(version=PREVIOUS)


class StaticKeys:
    """The engine's view of the hosts' command keys."""

    def __init__(self, keys):
        self.keys = keys
        self.refusals = []

    def reply_key(self, host, method):
        return self.keys[host]

    def refused(self, host, method, reason):
        self.refusals.append((host, method, reason))


@pytest.fixture(scope="module")
def upgrade():
    work = short_dir("vtver")
    exchange = "vtpcm-ver-" + uuid.uuid4().hex[:8]
    conf = client_conf(exchange)
    tool = AgentAPI(conf, timeout=30)
    old_engine = AgentAPI(conf, tool.transport, timeout=30, version_cap=PREVIOUS)
    old_host = "old-" + uuid.uuid4().hex[:6]
    old_public = random_command_public()
    stop_old = serve_agent_in_process(conf, PreviousAgent(
        old_host, EmptyInstances(), command_public=old_public))
    try:
        with agent_cluster(work, "ve", exchange, tool, labels=("a",)) as hosts:
            host, _, agent, _ = hosts[0]
            keys = StaticKeys({
                host: authn.load_host_key(agent.command_key).public_key,
                old_host: authn.load_public_raw(old_public)})
            current = AgentAPI(conf, tool.transport, timeout=30, reply_keys=keys)
            pinned = AgentAPI(conf, tool.transport, timeout=30, reply_keys=keys,
                              version_cap=PREVIOUS)
            yield current, pinned, old_engine, host, old_host, keys
    finally:
        stop_old()
        tool.transport.cleanup()


def test_the_previous_release_is_older_than_the_current_api():
    def as_tuple(version):
        return tuple(int(part) for part in version.split("."))

    assert as_tuple(PREVIOUS) < as_tuple("1.6") <= as_tuple(RPC_API_VERSION)


def test_an_engine_of_the_previous_release_runs_every_method_on_a_current_agent(upgrade):
    current, _, old_engine, host, _, keys = upgrade
    assert old_engine.health(host).api_version == RPC_API_VERSION
    instance = str(uuid.uuid4())
    created = old_engine.create(host, instance)  # signed: 1.3
    assert old_engine.start(host, instance).running
    assert old_engine.get(host, instance).vtpcm_id == created.vtpcm_id
    assert instance in {v.instance_uuid for v in old_engine.list(host).vtpcms}
    assert old_engine.stop(host, instance).state == "STOPPED"
    identity = old_engine.get_identity(host, os.urandom(32))  # asked as 1.5
    assert identity.host == host and identity.command_public is not None
    assert identity.parent_certs == ()  # 1.10's field, not sent to a 1.5 client
    certified = current.get_identity(host, os.urandom(32))
    assert [c.hierarchy for c in certified.parent_certs] == ["endorsement", "owner"]
    assert old_engine.quote(host, os.urandom(32), (0, 1)).host == host
    # the current engine reads the same agent, replies signed
    assert current.get(host, instance).vtpcm_id == created.vtpcm_id
    assert old_engine.destroy(host, instance).state == "DESTROYED"
    assert keys.refusals == []


def test_a_pinned_engine_sends_nothing_whose_reply_it_would_take_unsigned(upgrade):
    _, pinned, _, host, _, _ = upgrade
    instance = str(uuid.uuid4())
    for method, call in (("create", lambda: pinned.create(host, instance)),
                         ("get", lambda: pinned.get(host, instance)),
                         ("health", lambda: pinned.health(host))):
        with pytest.raises(exception.RPCVersionCapped) as err:
            call()
        assert str(err.value) == (
            "Not sent: %s needs %s RPC API 1.6, but [upgrade_levels] vtpcm_agent caps "
            "this client at 1.5 (some %s may still run an older release)"
            % (method, pinned.topic, pinned.topic))
    # attestation goes on (TPM-signed answers)
    assert pinned.quote(host, os.urandom(32), (0, 1)).host == host
    assert pinned.get_identity(host, os.urandom(32)).host == host


def test_an_agent_of_the_previous_version_serves_attestation_only(upgrade):
    current, pinned, _, _, old_host, keys = upgrade
    # get_identity is asked as 1.10 (the parents' certifications): an
    # uncapped engine is told to upgrade the agent or cap itself; capped,
    # it gets the old agent's answer (here: it has no TPM)
    with pytest.raises(exception.RPCVersionUnsupported, match=(
            r"cannot serve get_identity \(RPC API 1\.10\): it runs an older API version")):
        current.get_identity(old_host, os.urandom(32))
    with pytest.raises(exception.HostTPMError, match="no host TPM configured"):
        pinned.get_identity(old_host, os.urandom(32))
    for method, call in (("health", lambda: current.health(old_host)),
                         ("get", lambda: current.get(old_host, str(uuid.uuid4()))),
                         ("list", lambda: current.list(old_host))):
        # unsigned, so no answer (a forged "cannot serve" must not pass for
        # a refusal either); the reason names the likely cause
        with pytest.raises(exception.ReplyNotAuthenticated) as err:
            call()
        assert str(err.value) == (
            "Reply of %s to %s not authenticated: an unsigned error reply "
            "(UnsupportedVersion) (an agent older than API 1.6, or a forgery)"
            % (old_host, method))
    assert [r[:2] for r in keys.refusals] == [(old_host, "health"), (old_host, "get"),
                                             (old_host, "list")]


def test_the_kem_report_goes_only_to_clients_that_ask_for_it(upgrade):
    """1.9: the current engine's quote carries the KEM key's binding; an
    engine of the previous release or one pinned below 1.9 gets the quote
    it knows (no unknown fields it would refuse)."""
    current, pinned, old_engine, host, _, _ = upgrade
    quote = current.quote(host, os.urandom(32), (0, 1))
    assert (quote.kem_pcrs, quote.kem_current) == ((), True)  # unbound, as configured
    for api in (pinned, old_engine):
        quote = api.quote(host, os.urandom(32), (0, 1))
        assert (quote.kem_pcrs, quote.kem_current) == (None, None)
