"""What each RPC client method puts on the wire: the version it prepares
(the one that introduced the method in the form the client sends it, so an
older server that cannot serve it refuses it instead of misreading it),
where it goes, and whether it carries a signature. No broker: the oslo
client is replaced by a recorder."""

import base64
import uuid
from typing import Any

import oslo_messaging as messaging
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_config import cfg

from tests.refusal import refused
from vtpcm_agent import conf as agent_conf
from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.agent import rpcapi as agent_rpcapi
from vtpcm_common.api.engine import messages as em
from vtpcm_common.api.engine import rpcapi as engine_rpcapi
from vtpcm_nova import conf as engine_conf

HOST = "cmp1"
INSTANCE = str(uuid.uuid4())
MIGRATION = str(uuid.uuid4())
NONCE = b"n" * 32
CONTEXT = am.MigrationContext(MIGRATION, INSTANCE, 3, "cmp1", "cmp2")
BLOBS = am.StateBlobs(INSTANCE, MIGRATION, 3, b"p" * 64, 0, b"", 0)
POLICY = em.PolicyInfo("golden", "sha256", {0: b"\0" * 32})


class Sent(Exception):
    """Raised by the recorder instead of a reply: the call went out."""


class RecordingClient:
    """Stands in for the oslo.messaging RPC client of an API object."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def prepare(self, **kwargs: Any) -> "RecordingClient._Prepared":
        return self._Prepared(self, kwargs)

    class _Prepared:
        def __init__(self, owner: "RecordingClient", kwargs: dict[str, Any]) -> None:
            self.owner, self.kwargs = owner, kwargs

        def call(self, ctxt: Any, method: str, **args: Any) -> Any:
            self.owner.sent.append({"method": method, "args": args, **self.kwargs})
            raise Sent(method)

        def cast(self, ctxt: Any, method: str, **args: Any) -> None:
            self.owner.sent.append({"method": method, "args": args, **self.kwargs})


def _conf() -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    agent_conf.register_opts(conf)
    engine_conf.register_opts(conf)
    conf([], default_config_files=[])
    rpc.get_transport(conf).cleanup()  # registers the transport options
    conf.set_override("transport_url", "fake:/")
    return conf


def _signer() -> authn.CommandSigner:
    return authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())


def _sent(api: Any, call: Any) -> dict[str, Any]:
    recorder = RecordingClient()
    api.client = recorder
    try:
        call(api)
    except Sent:
        pass
    assert len(recorder.sent) == 1
    return recorder.sent[0]


def _signed_by(signer: Any, sent: dict[str, Any]) -> bool:
    auth = sent["args"].get("auth")
    if auth is None:
        return False
    data = authn.canonical_bytes(sent["method"], auth["server"], sent["args"]["payload"],
                                 auth["issued_at"], auth["expires_at"], auth["nonce"])
    try:
        signer.public_key.verify(base64.b64decode(auth["signature"]), data)
    except InvalidSignature:
        return False
    return True


def _public_methods(cls: type, base: type) -> set[str]:
    return {name for name, value in vars(cls).items()
            if callable(value) and not name.startswith("_")} - set(vars(base))


def test_get_identity_asks_for_the_parents_only_from_agents_that_know_it():
    """1.10 adds ``parents`` to the request: an agent capped below must get
    the 1.5 form (no ``parents`` on the wire), which it accepts."""
    for cap, version, parents in ((None, "1.10", True), ("1.9", "1.5", False)):
        api = agent_rpcapi.AgentAPI(_conf(), signer=_signer(), version_cap=cap)
        recorder = RecordingClient()
        api.client = recorder
        with pytest.raises(Sent):
            api.get_identity(HOST, NONCE)
        sent = recorder.sent[0]
        assert sent["version"] == rpc._later(version, agent_rpcapi.VOUCHED_SINCE)
        assert ("parents" in sent["args"]["payload"]) is parents


def test_get_asks_for_the_vm_ids_as_1_11_and_never_below():
    """1.11 adds ``ids`` to get's request: sent only as 1.11; a client
    capped below sends nothing (an agent of 1.10 would not know the field)."""
    api = agent_rpcapi.AgentAPI(_conf(), signer=_signer(), version_cap=None)
    sent = _sent(api, lambda a: a.get(HOST, INSTANCE, ids=True))
    assert (sent["method"], sent["version"]) == ("get", "1.11")
    assert am.InstanceRef.from_wire(sent["args"]["payload"]).ids is True
    plain = _sent(api, lambda a: a.get(HOST, INSTANCE))
    assert plain["version"] == "1.0" and "ids" not in plain["args"]["payload"]
    capped = agent_rpcapi.AgentAPI(_conf(), signer=_signer(), version_cap="1.10")
    recorder = RecordingClient()
    capped.client = recorder
    with refused(exception.RPCVersionCapped,
                 "Not sent: get needs vtpcm-agent RPC API 1.11, but [upgrade_levels] "
                 "vtpcm_agent caps this client at 1.10 (some vtpcm-agent may still run an "
                 "older release)"):
        capped.get(HOST, INSTANCE, ids=True)
    assert recorder.sent == []


# method -> (version it must be prepared with, how to call it)
AGENT_CALLS: dict[str, tuple[str, Any]] = {
    # 1.0, unsigned
    "get": ("1.0", lambda api: api.get(HOST, INSTANCE)),
    "list": ("1.0", lambda api: api.list(HOST)),
    "health": ("1.0", lambda api: api.health(HOST)),
    # 1.0 methods in their signed form (1.3)
    "create": ("1.3", lambda api: api.create(HOST, INSTANCE)),
    "start": ("1.3", lambda api: api.start(HOST, INSTANCE)),
    "stop": ("1.3", lambda api: api.stop(HOST, INSTANCE)),
    "destroy": ("1.3", lambda api: api.destroy(HOST, INSTANCE)),
    "export_state": ("1.3", lambda api: api.export_state(HOST, INSTANCE)),
    "import_state": ("1.3", lambda api: api.import_state(HOST, BLOBS)),
    # 1.1, with the KEM report since 1.9 (asked as 1.1 without it when capped)
    "quote": ("1.9", lambda api: api.quote(HOST, NONCE, (0, 1))),
    # get_identity: 1.1, with command_public since 1.4, ek_public since 1.5 and
    # the parents' certifications since 1.10 (asked as 1.5 without when capped)
    "get_identity": ("1.10", lambda api: api.get_identity(HOST, NONCE)),
    "activate_credential": ("1.5", lambda api: api.activate_credential(HOST, b"c", b"s")),
    # 1.2 methods in their signed form (1.3)
    "seal_migration_key": ("1.3", lambda api: api.seal_migration_key(HOST, CONTEXT, b"k")),
    "prepare_incoming": ("1.3", lambda api: api.prepare_incoming(HOST, CONTEXT, b"e")),
    "commit_incoming": ("1.3", lambda api: api.commit_incoming(HOST, CONTEXT)),
    "commit_outgoing": ("1.3", lambda api: api.commit_outgoing(HOST, CONTEXT)),
    "abort_incoming": ("1.3", lambda api: api.abort_incoming(HOST, CONTEXT, True)),
    "abort_outgoing": ("1.3", lambda api: api.abort_outgoing(HOST, CONTEXT)),
    # 1.7, unsigned request (the reply is signed when the client verifies)
    "incoming_state": ("1.7", lambda api: api.incoming_state(HOST, CONTEXT)),
    # 1.8, signed
    "reclaim_outgoing": ("1.8", lambda api: api.reclaim_outgoing(HOST, CONTEXT, 6)),
    # 1.12, unsigned request (read-only; the reply is signed, bound to it)
    "state_digest": ("1.13", lambda api: api.state_digest(HOST, CONTEXT, "source",
                                                          b"n" * 32)),
}
AGENT_SIGNED = {"create", "start", "stop", "destroy", "export_state", "import_state",
                "seal_migration_key", "prepare_incoming", "commit_incoming",
                "commit_outgoing", "abort_incoming", "abort_outgoing", "reclaim_outgoing"}

ENGINE_CALLS: dict[str, tuple[str, Any]] = {
    # 1.0, unsigned
    "register_agent": ("1.0", lambda api: api.register_agent(HOST)),
    "list_hosts": ("1.0", lambda api: api.list_hosts()),
    "show_host": ("1.0", lambda api: api.show_host(HOST)),
    "list_policies": ("1.0", lambda api: api.list_policies()),
    "attest": ("1.0", lambda api: api.attest(HOST)),
    "verdicts": ("1.0", lambda api: api.verdicts()),
    "list_audit": ("1.0", lambda api: api.list_audit(10, HOST)),
    "get_vtpcm": ("1.0", lambda api: api.get_vtpcm(INSTANCE)),
    "get_migration": ("1.0", lambda api: api.get_migration(MIGRATION)),
    # 1.0 methods in their operator-signed form (1.1)
    "enroll": ("1.1", lambda api: api.enroll(HOST)),
    "approve_host": ("1.1", lambda api: api.approve_host(HOST)),
    "revoke_host": ("1.1", lambda api: api.revoke_host(HOST)),
    "assign_policy": ("1.1", lambda api: api.assign_policy(HOST, "golden")),
    "put_policy": ("1.1", lambda api: api.put_policy(POLICY)),
    "record_policy": ("1.1", lambda api: api.record_policy("golden", HOST, (0,))),
    # 1.0 methods in their host-signed form (1.2)
    "create_vtpcm": ("1.2", lambda api: api.create_vtpcm(INSTANCE, HOST)),
    "destroy_vtpcm": ("1.2", lambda api: api.destroy_vtpcm(INSTANCE)),
    "check_destination": ("1.2", lambda api: api.check_destination(INSTANCE, HOST)),
    "begin": ("1.2", lambda api: api.begin(MIGRATION, INSTANCE, HOST, "cmp2")),
    "commit": ("1.2", lambda api: api.commit(MIGRATION)),
    "abort": ("1.2", lambda api: api.abort(MIGRATION, "why")),
    # 1.3, host-signed
    "start_vtpcm": ("1.3", lambda api: api.start_vtpcm(INSTANCE)),
    "stop_vtpcm": ("1.3", lambda api: api.stop_vtpcm(INSTANCE)),
    "host_command_key": ("1.4", lambda api: api.host_command_key(HOST)),
    # 1.5, host-signed
    "transfer_state": ("1.5", lambda api: api.transfer_state(MIGRATION)),
    "replace_vtpcm": ("1.5", lambda api: api.replace_vtpcm(INSTANCE, HOST)),
    "shelve_vtpcm": ("1.5", lambda api: api.shelve_vtpcm(INSTANCE)),
    "unshelve_vtpcm": ("1.5", lambda api: api.unshelve_vtpcm(INSTANCE, HOST)),
    "signed_host_command_key": ("1.6", lambda api: api.signed_host_command_key(
        HOST, b"\x07" * 16)),
    # 1.7, operator-signed and host-signed
    "resolve_migration": ("1.7", lambda api: api.resolve_migration(MIGRATION, "source")),
    "forget_host": ("1.7", lambda api: api.forget_host(HOST)),
    "report_swtpm_restart": ("1.7", lambda api: api.report_swtpm_restart(
        em.SwtpmRestartReport(HOST, INSTANCE, INSTANCE, "ACTIVE", "restarted", "died"))),
    # 1.8
    "start_incoming": ("1.8", lambda api: api.start_incoming(MIGRATION)),
    "list_vtpcms": ("1.8", lambda api: api.list_vtpcms("SHELVED")),
    "destroy_shelved_vtpcm": ("1.8", lambda api: api.destroy_shelved_vtpcm(INSTANCE)),
    # 1.9, unsigned
    "trusted_hosts": ("1.9", lambda api: api.trusted_hosts("host-a", 5)),
    # 1.12, signed with nova-api's witness key
    "record_api_witness": ("1.12", lambda api: api.record_api_witness(INSTANCE, "unshelve",
                                                                      HOST)),
}


def _agent_api() -> agent_rpcapi.AgentAPI:
    return agent_rpcapi.AgentAPI(_conf(), signer=_signer())


def _engine_api() -> engine_rpcapi.EngineAPI:
    return engine_rpcapi.EngineAPI(_conf(), admin_signer=_signer(), host_signer=_signer(),
                                   witness_signer=_signer())


def test_every_agent_client_method_has_its_version_here():
    assert _public_methods(agent_rpcapi.AgentAPI, rpc.Client) == set(AGENT_CALLS)


def test_every_engine_client_method_has_its_version_here():
    assert _public_methods(engine_rpcapi.EngineAPI, rpc.Client) == \
        set(ENGINE_CALLS)


@pytest.mark.parametrize("method", sorted(AGENT_CALLS))
def test_agent_client_prepares_the_version_of_the_method(method):
    version, call = AGENT_CALLS[method]
    sent = _sent(_agent_api(), call)
    vouched = method in agent_rpcapi.VOUCHED_METHODS
    if vouched:  # asked at least as 1.3, the first version taking ``auth``
        version = rpc._later(version, agent_rpcapi.VOUCHED_SINCE)
    assert (sent["method"], sent["version"], sent["server"]) == (method, version, HOST)
    # the state-changing methods carry the engine's signature, and the
    # engine vouches for its attestation calls (not rate-limited); the
    # others are sent as 1.0/1.1 servers (which take no ``auth``) accept them
    assert ("auth" in sent["args"]) == (method in AGENT_SIGNED or vouched)


@pytest.mark.parametrize("method", sorted(ENGINE_CALLS))
def test_engine_client_prepares_the_version_of_the_method(method):
    version, call = ENGINE_CALLS[method]
    api = _engine_api()
    sent = _sent(api, call)
    assert (sent["method"], sent["version"]) == (method, version)
    assert "server" not in sent  # any engine worker answers
    if method in engine_rpcapi.HOST_METHODS:
        assert _signed_by(api.host_signer, sent)
    elif method in engine_rpcapi.ADMIN_METHODS:
        assert _signed_by(api.signer, sent)
    elif method in engine_rpcapi.WITNESS_METHODS:
        assert _signed_by(api.witness_signer, sent)
        assert not _signed_by(api.host_signer, sent)
    else:
        assert "auth" not in sent["args"]


def test_versions_here_are_versions_the_apis_have():
    for table, current in ((AGENT_CALLS, agent_rpcapi.RPC_API_VERSION),
                           (ENGINE_CALLS, engine_rpcapi.RPC_API_VERSION)):
        for version, _ in table.values():
            major, minor = (int(x) for x in version.split("."))
            cur_major, cur_minor = (int(x) for x in current.split("."))
            assert major == cur_major and minor <= cur_minor


# --- [upgrade_levels] -----------------------------------------------------------------

def _older(version: str, cap: str) -> bool:
    return tuple(map(int, version.split("."))) <= tuple(map(int, cap.split(".")))


@pytest.mark.parametrize("method", sorted(AGENT_CALLS))
def test_agent_client_capped_at_the_previous_minor_refuses_only_newer_methods(method):
    cap = "1.4"
    version, call = AGENT_CALLS[method]
    api = agent_rpcapi.AgentAPI(_conf(), signer=_signer(), version_cap=cap)
    recorder = RecordingClient()
    api.client = recorder
    if method == "get_identity":  # asked in its 1.4 form: without ek_public
        version = "1.4"
    if method == "quote":  # asked in its 1.1 form: without the KEM report
        version = "1.1"
    if method == "state_digest":  # asked in its 1.12 form: without the stream digest
        version = "1.12"
    if method in agent_rpcapi.VOUCHED_METHODS:  # the engine vouches: 1.3 at least
        version = rpc._later(version, agent_rpcapi.VOUCHED_SINCE)
    if _older(version, cap):
        with pytest.raises(Sent):
            call(api)
        assert recorder.sent[0]["version"] == version
        return
    with pytest.raises(exception.RPCVersionCapped) as err:
        call(api)
    assert recorder.sent == []  # refused before sending
    assert str(err.value) == (
        "Not sent: %s needs vtpcm-agent RPC API %s, but [upgrade_levels] vtpcm_agent "
        "caps this client at 1.4 (some vtpcm-agent may still run an older release)"
        % (method, version))


def test_state_digest_capped_at_1_12_is_asked_without_the_stream_digest():
    api = agent_rpcapi.AgentAPI(_conf(), signer=_signer(), version_cap="1.12")
    sent = _sent(api, AGENT_CALLS["state_digest"][1])
    assert sent["version"] == "1.12" and "streams" not in sent["args"]["payload"]
    uncapped = _sent(_agent_api(), AGENT_CALLS["state_digest"][1])
    assert uncapped["version"] == "1.13" and uncapped["args"]["payload"]["streams"] is True
    # asked without streams, an uncapped client sends the 1.12 form
    plain = _sent(_agent_api(), lambda api: api.state_digest(HOST, CONTEXT, "source",
                                                             b"n" * 32, streams=False))
    assert plain["version"] == "1.12" and "streams" not in plain["args"]["payload"]


@pytest.mark.parametrize("method", sorted(ENGINE_CALLS))
def test_engine_client_cap_comes_from_upgrade_levels(method):
    conf = _conf()
    conf.set_override("vtpcm_engine", "1.1", group="upgrade_levels")
    api = engine_rpcapi.EngineAPI(conf, admin_signer=_signer(), host_signer=_signer())
    assert api.version_cap == "1.1"
    version, call = ENGINE_CALLS[method]
    recorder = RecordingClient()
    api.client = recorder
    if _older(version, "1.1"):
        try:
            call(api)
        except Sent:
            pass
        assert recorder.sent[0]["version"] == version
    else:
        with pytest.raises(exception.RPCVersionCapped, match="needs vtpcm-engine RPC API"):
            call(api)
        assert recorder.sent == []


def test_uncapped_clients_send_up_to_their_own_version():
    assert _agent_api().version_cap is None and _engine_api().version_cap is None
    assert _agent_api().can_send_version(agent_rpcapi.RPC_API_VERSION)


@pytest.mark.parametrize("cap, reason", [
    ("2.0", "[upgrade_levels] vtpcm_agent = 2.0: this client speaks vtpcm-agent API "
            "versions 1.x (up to %s)" % agent_rpcapi.RPC_API_VERSION),
    ("1", "[upgrade_levels] vtpcm_agent = 1: '1' is not an RPC API version (N.N)"),
    ("one.two", "is not an RPC API version"),
])
def test_a_cap_that_would_refuse_every_call_is_refused_at_once(cap, reason):
    with pytest.raises(exception.InvalidInput) as err:
        agent_rpcapi.AgentAPI(_conf(), version_cap=cap)
    assert reason in str(err.value)


def test_a_malformed_cap_in_the_config_is_refused_by_oslo_config():
    conf = _conf()
    with pytest.raises(ValueError):
        conf.set_override("vtpcm_agent", "latest", group="upgrade_levels")


def test_a_server_too_old_for_the_call_is_a_clear_project_error():
    api = _engine_api()

    class OldServer(RecordingClient):
        class _Prepared(RecordingClient._Prepared):
            def call(self, ctxt: Any, method: str, **args: Any) -> Any:
                raise messaging.RemoteError(
                    "UnsupportedVersion", "Endpoint does not support RPC version 1.2. "
                    "Attempted method: %s" % method)
    api.client = OldServer()
    with pytest.raises(exception.RPCVersionUnsupported) as err:
        api.begin(MIGRATION, INSTANCE, HOST, "cmp2")
    assert str(err.value) == (
        "vtpcm-engine cannot serve begin (RPC API 1.2): it runs an older API version; "
        "upgrade it first, or cap this client with [upgrade_levels] vtpcm_engine meanwhile")


@pytest.mark.parametrize("call, flag", [
    (lambda api: api.resolve_migration(MIGRATION, "source", past_commit=True),
     "past_commit"),
    (lambda api: api.forget_host(HOST, despite_unverified_answers=True),
     "despite_unverified_answers"),
])
def test_the_1_8_decisions_go_as_1_8_only_when_asked(call, flag):
    """Review fix3: an engine of 1.7 still gets the plain resolve and forget
    it accepts (no unknown field); the new decisions go as 1.8, and a client
    capped at 1.7 refuses them before sending."""
    sent = _sent(_engine_api(), call)
    assert sent["version"] == "1.8" and sent["args"]["payload"][flag] is True
    for plain in (lambda api: api.resolve_migration(MIGRATION, "source"),
                  lambda api: api.forget_host(HOST)):
        sent = _sent(_engine_api(), plain)
        assert sent["version"] == "1.7" and flag not in sent["args"]["payload"]
    capped = engine_rpcapi.EngineAPI(_conf(), admin_signer=_signer(), version_cap="1.7")
    recorder = RecordingClient()
    capped.client = recorder
    with pytest.raises(exception.RPCVersionCapped):
        call(capped)
    assert recorder.sent == []


def test_resolve_despite_import_check_goes_as_1_13_only_when_asked():
    """Engine API 1.13: the override goes only when true, as 1.13; a plain
    resolve stays 1.7, and a client capped at 1.12 refuses the override."""
    def override(api):
        return api.resolve_migration(MIGRATION, "destination", execute=True,
                                     despite_import_check=True)
    sent = _sent(_engine_api(), override)
    assert sent["version"] == "1.13"
    assert sent["args"]["payload"]["despite_import_check"] is True
    sent = _sent(_engine_api(), lambda api: api.resolve_migration(MIGRATION, "destination"))
    assert sent["version"] == "1.7"
    assert "despite_import_check" not in sent["args"]["payload"]
    capped = engine_rpcapi.EngineAPI(_conf(), admin_signer=_signer(), version_cap="1.12")
    recorder = RecordingClient()
    capped.client = recorder
    with pytest.raises(exception.RPCVersionCapped):
        override(capped)
    assert recorder.sent == []


def test_commit_shred_later_goes_as_1_11_only_when_asked_and_servable():
    """Engine API 1.11: the flag goes only when true, as 1.11; capped at 1.10
    (or answered UnsupportedVersion by an older engine) the client sends the
    1.2 commit an older engine accepts, whose answer waits for the shred."""
    api = _engine_api()
    sent = _sent(api, lambda api: api.commit(MIGRATION, shred_later=True))
    assert sent["version"] == "1.11" and sent["args"]["payload"] == {
        "migration_id": MIGRATION, "shred_later": True}
    assert _signed_by(api.host_signer, sent)
    sent = _sent(_engine_api(), lambda api: api.commit(MIGRATION))
    assert sent["version"] == "1.2" and sent["args"]["payload"] == {"migration_id": MIGRATION}
    capped = engine_rpcapi.EngineAPI(_conf(), host_signer=_signer(), version_cap="1.10")
    sent = _sent(capped, lambda api: api.commit(MIGRATION, shred_later=True))
    assert sent["version"] == "1.2" and sent["args"]["payload"] == {"migration_id": MIGRATION}

    class OldEngine(RecordingClient):
        class _Prepared(RecordingClient._Prepared):
            def call(self, ctxt: Any, method: str, **args: Any) -> Any:
                if self.kwargs["version"] == "1.11":
                    self.owner.sent.append({"method": method, "args": args, **self.kwargs})
                    raise messaging.RemoteError(
                        "UnsupportedVersion", "Endpoint does not support RPC version 1.11")
                return super().call(ctxt, method, **args)
    old = _engine_api()
    old.client = recorder = OldEngine()
    with pytest.raises(Sent):
        old.commit(MIGRATION, shred_later=True)
    assert [s["version"] for s in recorder.sent] == ["1.11", "1.2"]


def test_abort_names_the_instance_only_as_1_10():
    """An engine of 1.9 gets the abort it accepts (no unknown field); a
    client capped at 1.9 sends it so too, without the tombstone."""
    api = _engine_api()
    sent = _sent(api, lambda api: api.abort(MIGRATION, "why", INSTANCE))
    assert sent["version"] == "1.10" and sent["args"]["payload"]["instance_uuid"] == INSTANCE
    assert _signed_by(api.host_signer, sent)
    sent = _sent(_engine_api(), lambda api: api.abort(MIGRATION, "why"))
    assert sent["version"] == "1.2" and "instance_uuid" not in sent["args"]["payload"]
    capped = engine_rpcapi.EngineAPI(_conf(), host_signer=_signer(), version_cap="1.9")
    sent = _sent(capped, lambda api: api.abort(MIGRATION, "why", INSTANCE))
    assert sent["version"] == "1.2" and "instance_uuid" not in sent["args"]["payload"]
    assert "auth" in sent["args"]


def test_an_abort_waits_at_most_the_shorter_of_its_timeout_and_the_clients():
    """Review of issue 10: the driver's abort attempts are bounded each
    (``livemigration.ABORT_ATTEMPT_TIMEOUT``), never longer than the client's
    own timeout ([vtpcm] engine_timeout)."""
    api = engine_rpcapi.EngineAPI(_conf(), host_signer=_signer(), timeout=120.0)
    for call in (lambda api: api.abort(MIGRATION, "why", INSTANCE, timeout=30.0),
                 lambda api: api.abort(MIGRATION, "why", timeout=30.0)):
        assert _sent(api, call)["timeout"] == 30.0
    short = engine_rpcapi.EngineAPI(_conf(), host_signer=_signer(), timeout=6.0)
    assert _sent(short, lambda api: api.abort(MIGRATION, "why", INSTANCE,
                                              timeout=30.0))["timeout"] == 6.0
    assert "timeout" not in _sent(api, lambda api: api.abort(MIGRATION, "why"))


def test_quote_asks_for_the_kem_report_only_from_agents_that_know_it():
    """1.9 adds ``kem`` to the request: an agent capped below must get the
    1.1 form (no ``kem`` on the wire), which it accepts."""
    for cap, version, kem in ((None, "1.9", True), ("1.8", "1.1", False)):
        api = agent_rpcapi.AgentAPI(_conf(), signer=_signer(), version_cap=cap)
        recorder = RecordingClient()
        api.client = recorder
        with pytest.raises(Sent):
            api.quote(HOST, NONCE, (0, 1))
        sent = recorder.sent[0]
        assert sent["version"] == rpc._later(version, agent_rpcapi.VOUCHED_SINCE)
        assert ("kem" in sent["args"]["payload"]) is kem
