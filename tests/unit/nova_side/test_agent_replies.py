"""The Nova driver's reads from agents verify the reply's signature: its own
agent's with its own host command key, another host's with the key the
engine reports for it (APPROVED only). The destination's socket path goes
through ``livemigration.destination_socket`` as in the driver. The agent is
a real AgentManager behind the loopback of tests/unit/common."""

import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.unit.common.test_signed_replies import (
    DST,
    INSTANCE,
    SRC,
    _not_authenticated,
)
from tests.unit.common.test_signed_replies import world as world  # noqa: F401 - fixture
from vtpcm_common import authn, exception
from vtpcm_common.api.agent import rpcapi as agent_rpcapi
from vtpcm_common.api.engine import messages as em
from vtpcm_nova.agentkeys import EngineReportedKeys
from vtpcm_nova.virt import livemigration as lm

DIRS = ["/run/vtpcm"]


class Directory:
    """The engine's ``host_command_key`` as the driver sees it."""

    def __init__(self, keys: dict[str, authn.CommandSigner]) -> None:
        self.status = dict.fromkeys(keys, "APPROVED")
        self.keys = keys
        self.asked: list[str] = []

    def host_command_key(self, host: str) -> em.HostCommandKey:
        self.asked.append(host)
        if host not in self.keys:
            raise exception.NotFound(what="host", key=host)
        return em.HostCommandKey(host, self.status[host],
                                 authn.public_raw(self.keys[host].public_key))


@pytest.fixture
def driver(world: Any) -> Any:  # noqa: F811 - the fixture imported above
    """The agent reader of the driver on SRC."""
    directory = Directory(world.host_keys)
    keys = EngineReportedKeys(SRC, world.host_keys[SRC].public_key, directory)
    api = agent_rpcapi.AgentAPI(world.conf, reply_keys=keys, version_cap=None)
    api.client = world.loop  # type: ignore[assignment]
    world.directory, world.reader = directory, api
    return world


def test_the_destinations_socket_path_verifies_with_its_enrolled_key(driver: Any) -> None:
    """Positive control; the driver's own agent needs no engine call."""
    path = lm.destination_socket(driver.reader, DST, INSTANCE, DIRS)
    assert path == "/run/vtpcm/%s.ctrl" % INSTANCE
    assert driver.directory.asked == [DST, DST]  # before sending, and at the reply
    assert driver.reader.health(SRC).host == SRC
    assert driver.directory.asked == [DST, DST]


def _forged_path(key: authn.CommandSigner) -> Any:
    """A broker client answering the destination's get with a path of its
    choice (another configured socket directory passes the path check)."""
    def forge(method: str, args: dict[str, Any], deliver: Any) -> Any:
        outcome = deliver()["outcome"]
        outcome["ok"]["ctrl_socket"] = "/run/vtpcm-b/%s.ctrl" % INSTANCE
        return key.sign_reply("1.6", method, DST, args["reply_nonce"],
                              authn.request_digest(args["payload"], args.get("auth")),
                              outcome)
    return forge


@pytest.mark.parametrize("signer", ["nobody", "source", "third"])
def test_a_forged_socket_path_never_reaches_the_migration_xml(driver: Any,
                                                             signer: str) -> None:
    """Signed by a key of nobody, by the driver's own host (it holds that
    key, but it is not the destination's), by another enrolled host."""
    key = {"nobody": authn.CommandSigner(ed25519.Ed25519PrivateKey.generate()),
           "source": driver.host_keys[SRC], "third": driver.host_keys["cmp3"]}[signer]
    driver.loop.hook = _forged_path(key)
    _not_authenticated(lambda: lm.destination_socket(driver.reader, DST, INSTANCE,
                                                     DIRS + ["/run/vtpcm-b"]),
                       "Reply of %s to get not authenticated: signature does not verify"
                       % DST)
    driver.loop.hook = lambda method, args, deliver: {  # as agents before 1.6
        **deliver(reply_nonce=None), "ctrl_socket": "/run/vtpcm-b/%s.ctrl" % INSTANCE}
    _not_authenticated(lambda: lm.destination_socket(driver.reader, DST, INSTANCE,
                                                     DIRS + ["/run/vtpcm-b"]),
                       "not a signed reply")


def test_a_destination_that_is_not_approved_is_not_asked(driver: Any) -> None:
    driver.directory.status[DST] = "REVOKED"
    _not_authenticated(lambda: lm.destination_socket(driver.reader, DST, INSTANCE, DIRS),
                       "host is REVOKED; only an approved host's replies count")
    unknown = "cmp9-" + uuid.uuid4().hex[:4]
    _not_authenticated(lambda: driver.reader.get(unknown, INSTANCE),
                       "the engine knows no such host")
    assert driver.loop.sent == []


def test_a_health_answer_for_the_trait_must_be_the_hosts_own(driver: Any) -> None:
    driver.loop.hook = lambda method, args, deliver: deliver(reply_nonce=None)
    _not_authenticated(lambda: driver.reader.health(SRC), "not a signed reply")

