"""Signed agent replies (agent API 1.6), client and endpoint together, no
broker: the oslo client is replaced by a loopback to a real AgentManager
(fake instance manager), through JSON as on the wire; a ``hook`` plays the
broker client that answers instead of the agent or alters its answer."""

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import oslo_messaging as messaging
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_config import cfg
from oslo_messaging.rpc.dispatcher import ExpectedException

from vtpcm_agent import conf as agent_conf
from vtpcm_agent.association import Association, VTPCMState
from vtpcm_agent.manager import AgentManager
from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.agent import rpcapi as agent_rpcapi

SRC, DST = "cmp1", "cmp2"
INSTANCE = str(uuid.uuid4())
CONTEXT = am.MigrationContext(str(uuid.uuid4()), INSTANCE, 3, SRC, DST)


class FakeInstances:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.in_use = False

    def _assoc(self) -> Association:
        return Association(INSTANCE, str(uuid.uuid5(uuid.NAMESPACE_URL, INSTANCE)),
                           VTPCMState.MIGRATING_IN, 3, CONTEXT.migration_id, "/s",
                           "/run/vtpcm/%s.ctrl" % INSTANCE, 42, "t0", "t1")

    def get(self, instance_uuid: str) -> Association:
        if instance_uuid != INSTANCE:
            raise exception.NotFound(what="vTPCM of instance", key=instance_uuid)
        return self._assoc()

    def list_vtpcms(self) -> list[Association]:
        return [self._assoc()]

    def is_running(self, assoc: Association) -> bool:
        return True

    def crashed(self) -> list[str]:
        return []

    def commit_outgoing(self, ctx: Any) -> None:
        self.calls.append("commit_outgoing")

    def abort_incoming(self, ctx: Any, only_if_unused: bool = False) -> None:
        self.calls.append("abort_incoming")
        if self.in_use and only_if_unused:
            raise exception.DestinationInUse(migration_id=ctx.migration_id,
                                             reason="the incoming vTPCM received its state")


Hook = Callable[[str, dict[str, Any], Callable[[], Any]], Any]


class Loopback:
    """The oslo client of an AgentAPI: each call goes to the manager of the
    host it names, or to ``hook(method, args, deliver)`` if one is set."""

    def __init__(self, managers: dict[str, AgentManager]) -> None:
        self.managers = managers
        self.hook: Hook | None = None
        self.sent: list[dict[str, Any]] = []

    def prepare(self, **kwargs: Any) -> "Loopback._Prepared":
        return self._Prepared(self, kwargs)

    class _Prepared:
        def __init__(self, owner: "Loopback", kwargs: dict[str, Any]) -> None:
            self.owner, self.kwargs = owner, kwargs

        def call(self, ctxt: Any, method: str, **args: Any) -> Any:
            args = json.loads(json.dumps(args))
            self.owner.sent.append({"method": method, "args": args, **self.kwargs})
            manager = self.owner.managers[self.kwargs["server"]]

            def deliver(**override: Any) -> Any:
                # a refusal comes out as oslo.messaging rebuilds it
                # (allowed_remote_exmods): the exception itself
                reply = _unwrapped(getattr(manager, method), {**args, **override})
                return json.loads(json.dumps(reply))
            if self.owner.hook is not None:
                return self.owner.hook(method, args, deliver)
            return deliver()


def _unwrapped(endpoint: Callable[..., Any], args: dict[str, Any]) -> Any:
    """Call an endpoint as oslo's dispatcher does: an expected exception
    comes out as itself."""
    try:
        return endpoint({}, **args)
    except ExpectedException as err:
        raise err.exc_info[1] from None


class Keys:
    """``authn.ReplyKeys`` of a tiny engine: host -> key, refusals kept."""

    def __init__(self, keys: dict[str, ed25519.Ed25519PublicKey]) -> None:
        self.keys = keys
        self.refusals: list[tuple[str, str, str]] = []

    def reply_key(self, host: str, method: str) -> ed25519.Ed25519PublicKey:
        if host not in self.keys:
            raise exception.ReplyNotAuthenticated(host=host, method=method,
                                                  reason="host is REVOKED")
        return self.keys[host]

    def refused(self, host: str, method: str, reason: str) -> None:
        self.refusals.append((host, method, reason))


@pytest.fixture
def world(tmp_path: Path) -> Any:
    conf = cfg.ConfigOpts()
    agent_conf.register_opts(conf)
    conf([], default_config_files=[])
    rpc.get_transport(conf).cleanup()
    conf.set_override("transport_url", "fake:/")
    engine = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
    (tmp_path / "engine.pub").write_bytes(engine.public_key_pem())
    host_keys = {h: authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
                 for h in (SRC, DST, "cmp3")}
    instances = {h: FakeInstances() for h in host_keys}
    managers = {h: AgentManager(h, instances[h],  # type: ignore[arg-type]
                                verifier=authn.CommandVerifier(tmp_path / "engine.pub", h),
                                reply_signer=host_keys[h]) for h in host_keys}
    keys = Keys({h: k.public_key for h, k in host_keys.items()})
    api = agent_rpcapi.AgentAPI(conf, signer=engine, reply_keys=keys, version_cap=None)
    loop = Loopback(managers)
    api.client = loop  # type: ignore[assignment]

    class World:
        pass
    w = World()
    w.api, w.loop, w.keys, w.instances, w.host_keys, w.conf = (  # type: ignore[attr-defined]
        api, loop, keys, instances, host_keys, conf)
    return w


def _not_authenticated(call: Callable[[], Any], reason: str) -> exception.ReplyNotAuthenticated:
    with pytest.raises(exception.ReplyNotAuthenticated) as err:
        call()
    assert reason in str(err.value), str(err.value)
    return err.value


def test_honest_replies_are_accepted(world: Any) -> None:
    """Positive control: signed answers of the real endpoint verify."""
    assert world.api.commit_outgoing(SRC, CONTEXT) == am.Empty()
    assert world.instances[SRC].calls == ["commit_outgoing"]
    info = world.api.get(DST, INSTANCE)
    assert (info.instance_uuid, info.generation) == (INSTANCE, 3)
    assert world.api.health(DST).host == DST
    assert len(world.api.list(DST).vtpcms) == 1
    sent = world.loop.sent
    assert [s["version"] for s in sent] == ["1.6"] * 4
    # a signed command's reply is bound to the command's own nonce
    assert sent[0]["args"]["reply_nonce"] == sent[0]["args"]["auth"]["nonce"]
    assert sent[1]["args"]["reply_nonce"] != sent[2]["args"]["reply_nonce"]
    assert world.keys.refusals == []


def test_a_signed_refusal_is_the_agents_word(world: Any) -> None:
    """DestinationInUse (the engine then holds the migration IN_DOUBT) and
    NotFound come back as their own classes when the agent signed them."""
    world.instances[DST].in_use = True
    with pytest.raises(exception.DestinationInUse, match="received its state"):
        world.api.abort_incoming(DST, CONTEXT, only_if_unused=True)
    with pytest.raises(exception.NotFound) as err:
        world.api.get(DST, str(uuid.uuid4()))
    assert type(err.value) is exception.NotFound  # its class, with its named values
    assert err.value.kwargs["what"] == "vTPCM of instance"
    assert world.keys.refusals == []


def test_a_stolen_command_answered_with_success_is_not_success(world: Any) -> None:
    """A broker client takes commit_outgoing off the source's queue and
    answers as agents before 1.6 did: nothing was shredded, and the engine
    must not think so."""
    world.loop.hook = lambda method, args, deliver: {}
    _not_authenticated(lambda: world.api.commit_outgoing(SRC, CONTEXT),
                       "not a signed reply")
    assert world.instances[SRC].calls == []
    assert world.keys.refusals[-1][:2] == (SRC, "commit_outgoing")


def test_a_forged_abort_success_is_not_success(world: Any) -> None:
    world.loop.hook = lambda method, args, deliver: {}
    _not_authenticated(lambda: world.api.abort_incoming(DST, CONTEXT), "not a signed reply")
    assert world.instances[DST].calls == []


def test_a_forged_destination_in_use_is_no_answer(world: Any) -> None:
    """An unsigned DestinationInUse must not put the migration IN_DOUBT."""
    def forge(method: str, args: dict[str, Any], deliver: Any) -> Any:
        # what oslo.messaging rebuilds from a broker client's error reply
        raise exception.DestinationInUse(migration_id=CONTEXT.migration_id, reason="forged")
    world.loop.hook = forge
    err = _not_authenticated(
        lambda: world.api.abort_incoming(DST, CONTEXT, only_if_unused=True),
        "an unsigned error reply (DestinationInUse)")
    assert not isinstance(err, exception.DestinationInUse)
    assert world.instances[DST].calls == []


def test_a_forged_socket_path_does_not_verify(world: Any) -> None:
    """The reply the Nova driver reads the destination's socket from,
    altered in transit (signature kept), or re-signed by another host."""
    def tamper(method: str, args: dict[str, Any], deliver: Any) -> Any:
        reply = deliver()
        reply["outcome"]["ok"]["ctrl_socket"] = "/tmp/attacker.ctrl"
        return reply
    world.loop.hook = tamper
    _not_authenticated(lambda: world.api.get(DST, INSTANCE),
                       "signature does not verify with the command key of %s" % DST)

    def other_host(method: str, args: dict[str, Any], deliver: Any) -> Any:
        outcome = deliver()["outcome"]
        outcome["ok"]["ctrl_socket"] = "/tmp/attacker.ctrl"
        return world.host_keys["cmp3"].sign_reply(
            "1.6", method, DST, args["reply_nonce"],
            authn.request_digest(args["payload"], args.get("auth")), outcome)
    world.loop.hook = other_host
    _not_authenticated(lambda: world.api.get(DST, INSTANCE),
                       "signature does not verify with the command key of %s" % DST)
    assert len(world.keys.refusals) == 2


def test_a_replayed_reply_of_an_earlier_call_does_not_verify(world: Any) -> None:
    captured: list[Any] = []

    def record(method: str, args: dict[str, Any], deliver: Any) -> Any:
        captured.append(deliver())
        return captured[-1]
    world.loop.hook = record
    world.api.get(DST, INSTANCE)
    world.api.commit_outgoing(SRC, CONTEXT)
    world.loop.hook = lambda method, args, deliver: captured[0]
    _not_authenticated(lambda: world.api.get(DST, INSTANCE), "signature does not verify")
    world.loop.hook = lambda method, args, deliver: captured[1]
    _not_authenticated(lambda: world.api.commit_outgoing(SRC, CONTEXT),
                       "signature does not verify")
    assert world.instances[SRC].calls == ["commit_outgoing"]


def test_a_reply_for_another_method_host_or_request_does_not_verify(world: Any) -> None:
    """The source's honest commit_outgoing answer (an Empty, like abort's)
    passed off as the destination's abort_incoming answer; the source's own
    answer to another request passed off as this one's."""
    def cross(method: str, args: dict[str, Any], deliver: Any) -> Any:
        return world.loop.managers[SRC].commit_outgoing(
            {}, payload=args["payload"], auth=world.api.signer.sign(
                "commit_outgoing", SRC, args["payload"]),
            reply_nonce=args["reply_nonce"])
    world.loop.hook = cross
    _not_authenticated(lambda: world.api.abort_incoming(DST, CONTEXT),
                       "signature does not verify")

    def twin(method: str, args: dict[str, Any], deliver: Any) -> Any:
        # the same payload under a command the broker client holds back
        # (another nonce): the agent answers that command, not this one
        auth = world.api.signer.sign(method, SRC, args["payload"])
        return deliver(auth=auth, reply_nonce=auth["nonce"])
    world.loop.hook = twin
    _not_authenticated(lambda: world.api.commit_outgoing(SRC, CONTEXT),
                       "signature does not verify")


def test_the_agent_signs_no_reply_to_a_signed_command_for_another_nonce(world: Any) -> None:
    """A broker client holding a command cannot get the agent to sign an
    answer to it under the nonce of another call."""
    def swap(method: str, args: dict[str, Any], deliver: Any) -> Any:
        return deliver(reply_nonce=authn.new_nonce())
    world.loop.hook = swap
    _not_authenticated(lambda: world.api.commit_outgoing(SRC, CONTEXT),
                       "signature does not verify")
    assert world.instances[SRC].calls == []  # refused before it ran


def test_no_call_goes_to_a_host_whose_replies_cannot_count(world: Any) -> None:
    del world.keys.keys[SRC]
    _not_authenticated(lambda: world.api.commit_outgoing(SRC, CONTEXT), "host is REVOKED")
    assert world.loop.sent == [] and world.instances[SRC].calls == []
    assert world.keys.refusals == [(SRC, "commit_outgoing", "host is REVOKED")]


def test_capped_below_1_6_the_engine_acts_on_no_unsigned_reply(world: Any) -> None:
    """Rolling upgrade: an engine pinned to 1.5 agents does not send the
    calls whose answers it would have to take unsigned; TPM-signed ones
    (attestation) still go."""
    api = agent_rpcapi.AgentAPI(world.conf, signer=world.api.signer,
                                reply_keys=world.keys, version_cap="1.5")
    api.client = world.loop  # type: ignore[assignment]
    for call in (lambda: api.commit_outgoing(SRC, CONTEXT), lambda: api.get(DST, INSTANCE),
                 lambda: api.health(DST)):
        with pytest.raises(exception.RPCVersionCapped, match="needs .* RPC API 1.6"):
            call()
    assert world.loop.sent == []
    with pytest.raises(exception.HostTPMError):  # sent as 1.5, unverified
        api.quote(DST, b"n" * 32, (0,))
    assert [s["version"] for s in world.loop.sent] == ["1.3"]  # 1.1, vouched for
    assert "reply_nonce" not in world.loop.sent[0]["args"]


def test_every_agent_endpoint_signs_its_reply_by_construction(world: Any) -> None:
    """Drift guard: each method the agent serves answers a 1.6 caller with
    a signed envelope, refusals included (here: a malformed payload)."""
    manager = world.loop.managers[DST]
    methods = [n for n in dir(AgentManager)
               if hasattr(getattr(AgentManager, n), "signed")]
    assert set(methods) >= agent_rpcapi.SIGNED_METHODS | {"get", "list", "health"}
    for name in methods:
        nonce = authn.new_nonce()
        auth = {"nonce": nonce} if getattr(AgentManager, name).signed else None
        reply = getattr(manager, name)({}, payload={"bogus": 1}, auth=auth, reply_nonce=nonce)
        outcome = authn.verify_reply(
            world.host_keys[DST].public_key, reply, min_api="1.6", method=name, server=DST,
            nonce=nonce, request=authn.request_digest({"bogus": 1}, auth))
        assert outcome["error"]["type"] == "InvalidPayload", (name, outcome)


def test_unsigned_callers_get_what_they_got_before(world: Any) -> None:
    """An engine before 1.6 sends no reply_nonce: the bare reply, errors
    raised as before."""
    manager = world.loop.managers[DST]
    payload = am.InstanceRef(INSTANCE).to_wire()
    assert am.VTPCMInfo.from_wire(manager.get({}, payload=payload)).instance_uuid == INSTANCE
    with pytest.raises(exception.NotFound):
        _unwrapped(manager.get, {"payload": am.InstanceRef(str(uuid.uuid4())).to_wire()})


def test_a_reply_signature_is_never_a_command_signature(world: Any) -> None:
    """Domain separation: the signed reply document has a tag a command's
    has not, so neither can stand for the other."""
    reply = authn.reply_bytes("1.6", "get", DST, "0" * 32, "x", {"ok": {}})
    command = authn.canonical_bytes("get", DST, {}, 1.0, 2.0, "0" * 32)
    assert json.loads(reply)["tag"] == authn.REPLY_TAG and "tag" not in json.loads(command)


def test_the_agents_answer_to_another_request_does_not_verify(world: Any) -> None:
    """The reply is bound to the request as received: a broker client
    that forwards another payload (another instance's socket path) under
    the caller's nonce, or the engine's command with its signature broken
    (the agent then signs a refusal the engine would act on: a refused
    create frees its reservation), gets nothing the caller accepts."""
    other = str(uuid.uuid4())

    def other_payload(method: str, args: dict[str, Any], deliver: Any) -> Any:
        return deliver(payload=am.InstanceRef(other).to_wire())
    world.loop.hook = other_payload
    _not_authenticated(lambda: world.api.get(DST, INSTANCE), "signature does not verify")

    def broken_auth(method: str, args: dict[str, Any], deliver: Any) -> Any:
        return deliver(auth={**args["auth"], "signature": "A" * 88})
    world.loop.hook = broken_auth
    _not_authenticated(lambda: world.api.commit_outgoing(SRC, CONTEXT),
                       "signature does not verify")
    assert world.instances[SRC].calls == []


def test_an_unsigned_cannot_serve_is_no_answer_either(world: Any) -> None:
    """A forged "UnsupportedVersion" must not pass for a refusal (a refused
    create frees its reservation while the stolen command still waits)."""
    def forge(method: str, args: dict[str, Any], deliver: Any) -> Any:
        raise messaging.RemoteError("UnsupportedVersion", "forged", "")
    world.loop.hook = forge
    err = _not_authenticated(lambda: world.api.create(SRC, INSTANCE),
                             "an unsigned error reply (UnsupportedVersion) (an agent older "
                             "than API 1.6, or a forgery)")
    assert isinstance(err, exception.ServiceUnreachable)
