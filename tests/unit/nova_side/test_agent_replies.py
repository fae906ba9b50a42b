"""The Nova driver's reads from agents verify the reply's signature: its own
agent's with its own host command key, another host's with the key the
engine reports for it (APPROVED only). The destination's socket path goes
through ``livemigration.destination_socket`` as in the driver. The agent is
a real AgentManager behind the loopback of tests/unit/common."""

import json
import os
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_messaging.rpc.dispatcher import ExpectedException

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
from vtpcm_nova import clients
from vtpcm_nova.agentkeys import EngineReportedKeys
from vtpcm_nova.conf import compute as compute_conf
from vtpcm_nova.engine.db import migration
from vtpcm_nova.engine.db.api import Database
from vtpcm_nova.engine.manager import EngineManager
from vtpcm_nova.virt import livemigration as lm

# two dirs, as in the lab: with one, destination_socket asks no agent
DIRS = ["/run/vtpcm", "/run/vtpcm-other"]


class Directory:
    """The engine's ``signed_host_command_key`` as the driver sees it: signed
    with the engine's command key (``engine``); ``forge`` plays a broker
    client answering in the engine's place."""

    def __init__(self, keys: dict[str, authn.CommandSigner]) -> None:
        self.status = dict.fromkeys(keys, "APPROVED")
        self.keys = keys
        self.asked: list[str] = []
        self.engine = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
        self.forge: Any = None

    def signed_host_command_key(self, host: str, nonce: bytes) -> em.SignedHostCommandKey:
        self.asked.append(host)
        if self.forge is not None:
            return self.forge(host, nonce)
        if host not in self.keys:
            raise exception.NotFound(what="host", key=host)
        key = authn.public_raw(self.keys[host].public_key)
        return em.SignedHostCommandKey(
            host, self.status[host], key,
            self.engine.sign_host_key(host, self.status[host], key, nonce))


@pytest.fixture
def driver(world: Any) -> Any:  # noqa: F811 - the fixture imported above
    """The agent reader of the driver on SRC."""
    directory = Directory(world.host_keys)
    keys = EngineReportedKeys(SRC, world.host_keys[SRC].public_key, directory,
                              directory.engine.public_key)
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


def _forged_key_answer(signer: authn.CommandSigner, attacker: bytes,
                       nonce_of: Any = None) -> Any:
    """A broker client answers the driver's key question for DST with a key
    of its own, signed with ``signer`` (for ``nonce_of(nonce)``)."""
    def forge(host: str, nonce: bytes) -> em.SignedHostCommandKey:
        used = nonce if nonce_of is None else nonce_of(nonce)
        return em.SignedHostCommandKey(host, "APPROVED", attacker,
                                       signer.sign_host_key(host, "APPROVED", attacker, used))
    return forge


def test_a_forged_engine_key_answer_is_refused(driver: Any) -> None:
    """Property 6: the destination's key comes only from an answer signed by
    the pinned engine key, for this call's nonce. A broker client that
    answers the engine's part with a key of its own, and the agent's part
    with a reply signed by that key, gets nothing into the migration XML."""
    attacker = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
    raw = authn.public_raw(attacker.public_key)
    driver.loop.hook = _forged_path(attacker)
    for signer, nonce_of, reason in (
            (attacker, None, "does not verify with [vtpcm] engine_public_key"),
            # a real engine answer, recorded for another call's nonce
            (driver.directory.engine, lambda nonce: b"\x00" * 16,
             "does not verify with [vtpcm] engine_public_key")):
        driver.directory.forge = _forged_key_answer(signer, raw, nonce_of)
        _not_authenticated(lambda: lm.destination_socket(driver.reader, DST, INSTANCE,
                                                         DIRS + ["/run/vtpcm-b"]), reason)
    assert driver.loop.sent == []  # refused before anything went to the "destination"
    # control: the engine's own signature over that key would have passed
    driver.directory.forge = _forged_key_answer(driver.directory.engine, raw)
    assert lm.destination_socket(driver.reader, DST, INSTANCE,
                                 DIRS + ["/run/vtpcm-b"]) == "/run/vtpcm-b/%s.ctrl" % INSTANCE


def test_without_a_pinned_engine_key_no_other_host_counts(driver: Any) -> None:
    driver.reader.reply_keys.engine_key = None
    _not_authenticated(lambda: lm.destination_socket(driver.reader, DST, INSTANCE, DIRS),
                       "[vtpcm] engine_public_key is not set")
    assert driver.directory.asked == [] and driver.loop.sent == []
    assert driver.reader.health(SRC).host == SRC  # its own agent still counts


def test_a_health_answer_for_the_trait_must_be_the_hosts_own(driver: Any) -> None:
    driver.loop.hook = lambda method, args, deliver: deliver(reply_nonce=None)
    _not_authenticated(lambda: driver.reader.health(SRC), "not a signed reply")



def _write_key(path: Any, key: ed25519.Ed25519PrivateKey) -> None:
    """As a rotation leaves it: a new file (new inode) in place of the old."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    tmp.chmod(0o600)
    os.replace(tmp, path)


def test_a_rotated_host_key_counts_without_restarting_nova_compute(
        world: Any, tmp_path: Any) -> None:  # noqa: F811
    """The driver's reader (clients.agent_reader, as the driver builds it)
    takes its own agent's replies signed with the key now in the file."""
    path = tmp_path / "host-command.key"
    first, second = (ed25519.Ed25519PrivateKey.generate() for _ in range(2))
    _write_key(path, first)
    compute_conf.register_opts(world.conf)
    world.conf.set_override("host_command_key", str(path), group="vtpcm")
    reader = clients.agent_reader(world.conf, SRC)
    reader.client = world.loop
    manager = world.loop.managers[SRC]
    manager.reply_signer = authn.CommandSigner(first)
    assert reader.health(SRC).host == SRC
    _write_key(path, second)  # rotated; the agent restarts with the new key
    manager.reply_signer = authn.CommandSigner(second)
    assert reader.health(SRC).host == SRC
    manager.reply_signer = authn.CommandSigner(first)  # the old key counts no more
    _not_authenticated(lambda: reader.health(SRC), "signature does not verify")
    path.unlink()
    _not_authenticated(lambda: reader.health(SRC), "No such file")


def test_the_engine_client_signs_with_the_rotated_key(world: Any, tmp_path: Any) -> None:  # noqa: F811
    """The driver's engine client (clients.EngineForHost) is made again
    when the key file is replaced, and only then."""
    path = tmp_path / "host-command.key"
    first, second = (ed25519.Ed25519PrivateKey.generate() for _ in range(2))
    _write_key(path, first)
    compute_conf.register_opts(world.conf)
    world.conf.set_override("host_command_key", str(path), group="vtpcm")
    engine = clients.EngineForHost(world.conf)
    before = engine()
    assert engine() is before
    assert before.host_signer.public_key == first.public_key()
    _write_key(path, second)
    assert engine().host_signer.public_key == second.public_key()


class EngineEndpoint:
    """The driver's engine client reduced to a loopback to a real
    EngineManager endpoint, through JSON as on the wire."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def signed_host_command_key(self, host: str, nonce: bytes) -> em.SignedHostCommandKey:
        payload = json.loads(json.dumps(em.HostKeyQuery(host, nonce).to_wire()))
        try:
            reply = self.manager.signed_host_command_key({}, payload=payload)
        except ExpectedException as err:
            raise err.exc_info[1] from None
        return em.SignedHostCommandKey.from_wire(json.loads(json.dumps(reply)))


def test_the_engines_key_answer_verifies_with_the_key_agents_pin(
        world: Any, tmp_path: Any) -> None:  # noqa: F811
    """The real engine endpoint signs with its command key: the driver
    checks the destination's replies with the key it answers, and an engine
    without its signing key refuses rather than answer unsigned."""
    url = "sqlite:///%s" % (tmp_path / "engine.sqlite")
    migration.db_sync(url)
    db = Database(url)
    try:
        db.enroll_host(DST, ak_public=b"ak", ak_name=b"n", kem_public=b"kem", kem_name=b"k",
                       command_public=authn.public_raw(world.host_keys[DST].public_key),
                       ek_certificate=None, approved=True)
        engine = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
        keys = EngineReportedKeys(SRC, world.host_keys[SRC].public_key,
                                  EngineEndpoint(EngineManager(db, None, None, signer=engine)),
                                  engine.public_key)
        reader = agent_rpcapi.AgentAPI(world.conf, reply_keys=keys, version_cap=None)
        reader.client = world.loop
        assert lm.destination_socket(reader, DST, INSTANCE, DIRS) == \
            "/run/vtpcm/%s.ctrl" % INSTANCE
        keys.engine = EngineEndpoint(EngineManager(db, None, None))
        with pytest.raises(exception.CommandRefused, match="no command signing key"):
            lm.destination_socket(reader, DST, INSTANCE, DIRS)
    finally:
        db.dispose()
