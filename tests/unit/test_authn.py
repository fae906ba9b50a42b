"""Engine-signed agent commands (vtpcm_common/authn.py) and the signed
endpoints: every way a command can be wrong is refused before it runs."""

import base64
import copy
import os
import stat
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from oslo_messaging.rpc.dispatcher import ExpectedException

from tests.refusal import refused
from vtpcm_agent.manager import AgentManager
from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.agent import messages as m
from vtpcm_common.api.agent import rpcapi as agent_rpcapi
from vtpcm_common.rpc import endpoint

HOST = "host-a"
FIELDS = "auth must have exactly the fields expires_at, issued_at, nonce, server, signature"
PAYLOAD = {"instance_uuid": "6b1c8f46-3c2e-4d4e-9a0e-1c1c5b6f9d10"}


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keyfile(tmp_path):
    return tmp_path / "keys" / "engine-signing.key"


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def signer(keyfile, clock):
    made = authn.load_or_create_signing_key(keyfile)
    return authn.CommandSigner(made._key, clock=clock)


@pytest.fixture
def verifier(keyfile, signer, clock):
    return authn.CommandVerifier(authn.public_key_path(keyfile), HOST, clock=clock)


def _refused(verifier, method, payload, auth, reason, call=None, stale=False):
    """``stale``: a refusal decided by the clock, which an agent never signs."""
    with pytest.raises(exception.CommandRefused) as err:
        (call or (lambda v, *a: v.verify(*a)))(verifier, method, payload, auth)
    # the reason is pinned from its first word (the mutation-tested wording)
    assert str(err.value).startswith("Command %s refused: %s" % (method, reason)), \
        str(err.value)
    assert isinstance(err.value, exception.CommandStale) is stale, type(err.value)


def test_key_files_are_created_private_and_reloaded(keyfile):
    first = authn.load_or_create_signing_key(keyfile)
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    pub = authn.public_key_path(keyfile)
    assert pub.name == "engine-signing.key.pub"
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert authn.fingerprint(authn.load_public_key(pub)) == first.fingerprint
    pub.unlink()  # the public half is rewritten from the private key
    again = authn.load_or_create_signing_key(keyfile)
    assert again.fingerprint == first.fingerprint and pub.exists()
    assert [p.name for p in keyfile.parent.iterdir() if p.name.startswith(".")] == []


def test_a_readable_or_foreign_private_key_is_refused(keyfile, tmp_path):
    authn.load_or_create_signing_key(keyfile)
    os.chmod(keyfile, 0o644)
    with pytest.raises(exception.InvalidInput, match="chmod 600"):
        authn.load_or_create_signing_key(keyfile)
    other = tmp_path / "ec.key"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(other, 0o600)
    with pytest.raises(exception.InvalidInput, match="not an Ed25519 key"):
        authn.load_signing_key(other)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    os.chmod(garbage, 0o600)
    with pytest.raises(exception.InvalidInput) as err:
        authn.load_signing_key(garbage)
    assert "c2VjcmV0" not in str(err.value)


def test_public_key_errors_name_the_file(tmp_path):
    with pytest.raises(exception.InvalidInput, match="missing.pub"):
        authn.CommandVerifier(tmp_path / "missing.pub", HOST)
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    with pytest.raises(exception.InvalidInput, match="not a PEM public key"):
        authn.CommandVerifier(bad, HOST)


def test_concurrent_creators_agree_on_one_key(keyfile):
    fingerprints, errors = [], []

    def make():
        try:
            fingerprints.append(authn.load_or_create_signing_key(keyfile).fingerprint)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and len(set(fingerprints)) == 1 and len(fingerprints) == 8


def test_signed_command_is_accepted_once(signer, verifier):
    auth = signer.sign("destroy", HOST, PAYLOAD)
    assert set(auth) == authn.AUTH_FIELDS and auth["server"] == HOST
    assert auth["expires_at"] - auth["issued_at"] == authn.DEFAULT_TTL
    verifier.verify("destroy", dict(PAYLOAD), copy.deepcopy(auth))
    _refused(verifier, "destroy", dict(PAYLOAD), auth, "replayed")
    verifier.verify("destroy", PAYLOAD, signer.sign("destroy", HOST, PAYLOAD))  # new nonce


def test_payload_survives_json_normalisation(signer, verifier):
    payload = {"pcrs": (0, 1, 2), "nested": {"b": 1, "a": [True, None, 2.5]}, "s": "ü"}
    auth = signer.sign("import_state", HOST, payload)
    wire = {"s": "ü", "nested": {"a": [True, None, 2.5], "b": 1}, "pcrs": [0, 1, 2]}
    verifier.verify("import_state", wire, auth)


@pytest.mark.parametrize("change", ["payload", "method", "issued_at", "expires_at", "nonce"])
def test_tampering_with_any_signed_part_is_refused(signer, verifier, change):
    auth = signer.sign("seal_migration_key", HOST, PAYLOAD)
    payload, method = dict(PAYLOAD), "seal_migration_key"
    if change == "payload":
        payload["instance_uuid"] = "0" + payload["instance_uuid"][1:]
    elif change == "method":
        method = "destroy"
    elif change == "nonce":
        auth["nonce"] = ("0" if auth["nonce"][0] != "0" else "1") + auth["nonce"][1:]
    else:
        auth[change] += 1.0
    _refused(verifier, method, payload, auth, "signature does not verify")


def test_command_for_another_host_is_refused(signer, verifier):
    auth = signer.sign("export_state", "host-b", PAYLOAD)
    _refused(verifier, "export_state", PAYLOAD, auth, "misdirected")
    auth["server"] = HOST  # claiming to be for us does not help: the signature says host-b
    _refused(verifier, "export_state", PAYLOAD, auth, "signature does not verify")


def test_expired_future_and_pre_start_commands_are_refused(signer, verifier, clock):
    start = clock.now
    auth = signer.sign("stop", HOST, PAYLOAD)
    clock.now = start + authn.DEFAULT_TTL + 0.5
    _refused(verifier, "stop", PAYLOAD, auth, "expired", stale=True)

    clock.now = start + 31
    future = signer.sign("stop", HOST, PAYLOAD)
    clock.now = start
    _refused(verifier, "stop", PAYLOAD, future, "issued in the future", stale=True)
    clock.now = start + 29
    slightly = signer.sign("stop", HOST, PAYLOAD)
    clock.now = start
    verifier.verify("stop", PAYLOAD, slightly)  # within max_skew

    clock.now = start - 31
    old = signer.sign("stop", HOST, PAYLOAD)
    clock.now = start - 30.5 + 60  # still within its ttl
    _refused(verifier, "stop", PAYLOAD, old, "issued before this agent started",
             stale=True)


def test_overlong_validity_is_refused(keyfile, verifier, clock):
    long_signer = authn.CommandSigner(authn.load_signing_key(keyfile)._key, ttl=3600,
                                      clock=clock)
    _refused(verifier, "create", PAYLOAD, long_signer.sign("create", HOST, PAYLOAD),
             "validity period")


def test_foreign_key_is_refused(verifier, clock):
    foreign = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate(), clock=clock)
    _refused(verifier, "destroy", PAYLOAD, foreign.sign("destroy", HOST, PAYLOAD),
             "signature does not verify")


@pytest.mark.parametrize("mangle,reason", [
    (lambda a: None, "no engine signature"),
    (lambda a: "token", "auth must be an object"),
    (lambda a: {k: v for k, v in a.items() if k != "nonce"}, FIELDS),
    (lambda a: dict(a, extra=1), FIELDS),
    (lambda a: dict(a, issued_at="now"), "auth issued_at must be a finite number"),
    (lambda a: dict(a, expires_at=float("inf")), "auth expires_at must be a finite number"),
    (lambda a: dict(a, issued_at=True), "auth issued_at must be a finite number"),
    (lambda a: dict(a, nonce="XYZ"), "auth nonce must be 32 lowercase hex digits"),
    (lambda a: dict(a, nonce=a["nonce"].upper()), "auth nonce must be 32 lowercase hex digits"),
    (lambda a: dict(a, signature="%%%"), "auth signature must be base64"),
    (lambda a: dict(a, signature=12), "auth signature must be base64"),
    (lambda a: dict(a, signature=base64.b64encode(b"x" * 10).decode()),
     "auth signature must be 64 bytes"),
    (lambda a: dict(a, server=["x"]), "auth server must be a host name"),
])
def test_malformed_auth_is_refused(signer, verifier, mangle, reason):
    auth = mangle(signer.sign("destroy", HOST, PAYLOAD))
    _refused(verifier, "destroy", PAYLOAD, auth, reason)


def test_refusals_do_not_use_up_the_nonce(signer, verifier):
    auth = signer.sign("destroy", HOST, PAYLOAD)
    _refused(verifier, "destroy", {"instance_uuid": "x"}, auth, "signature")
    verifier.verify("destroy", PAYLOAD, auth)


def test_used_nonces_are_forgotten_after_expiry(signer, verifier, clock):
    for _ in range(5):
        verifier.verify("stop", PAYLOAD, signer.sign("stop", HOST, PAYLOAD))
    assert len(verifier.nonces._seen) == 5
    clock.now += authn.DEFAULT_TTL + verifier.max_skew + 1
    verifier.verify("stop", PAYLOAD, signer.sign("stop", HOST, PAYLOAD))
    assert len(verifier.nonces._seen) == 1


class CountingStore(authn.MemoryNonceStore):
    def __init__(self):
        super().__init__()
        self.claims = 0

    def claim_nonce(self, nonce, keep_until, now):
        self.claims += 1
        return super().claim_nonce(nonce, keep_until, now)


def test_stale_commands_are_refused_unsigned_without_a_nonce_write(signer, keyfile, clock):
    """Review finding 5: a captured command replayed after its expiry cost
    the agent a durable nonce write on every delivery (claimed, then
    refused as "expired"). Refusals decided by the clock now come first,
    write nothing, and are ``CommandStale`` (never signed)."""
    store = CountingStore()
    verifier = authn.CommandVerifier(authn.public_key_path(keyfile), HOST, clock=clock)
    verifier.remember_nonces_in(store)
    start = clock.now
    captured = signer.sign("quote", HOST, PAYLOAD)
    verifier.verify("quote", PAYLOAD, captured)
    assert store.claims == 1
    clock.now = start + 3600
    for _ in range(3):
        with refused(exception.CommandStale, "Command quote refused: expired"):
            verifier.verify("quote", PAYLOAD, captured)
    clock.now = start + authn.DEFAULT_TTL + 0.5  # expired, its nonce still kept
    with refused(exception.CommandStale, "Command quote refused: expired"):
        verifier.verify("quote", PAYLOAD, captured)
    clock.now = start - 31
    old = signer.sign("quote", HOST, PAYLOAD)
    clock.now = start - 30.5 + 60  # within its ttl, from before the verifier started
    with refused(exception.CommandStale,
                 "Command quote refused: issued before this agent started"):
        verifier.verify("quote", PAYLOAD, old)
    assert store.claims == 1


def test_verifiers_sharing_a_store_refuse_each_others_replays(signer, keyfile, clock):
    """Two engine workers (or an agent before and after a restart) with one
    store: a command accepted by one is a replay for the other."""
    store = authn.MemoryNonceStore()
    first, second = (authn.CommandVerifier(authn.public_key_path(keyfile), HOST, clock=clock)
                     for _ in range(2))
    for verifier in (first, second):
        verifier.remember_nonces_in(store)
    auth = signer.sign("destroy", HOST, PAYLOAD)
    first.verify("destroy", PAYLOAD, auth)
    _refused(second, "destroy", PAYLOAD, auth, "replayed")
    alone = authn.CommandVerifier(authn.public_key_path(keyfile), HOST, clock=clock)
    alone.verify("destroy", PAYLOAD, auth)  # the control: its own memory knew nothing


def test_no_key_bytes_in_reprs(keyfile, signer, verifier):
    raw = signer._key.private_bytes(serialization.Encoding.Raw,
                                    serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
    pem = keyfile.read_text()
    body = "".join(pem.strip().splitlines()[1:-1])
    for text in (repr(signer), str(signer), repr(verifier)):
        assert raw.hex() not in text and body not in text
        assert base64.b64encode(raw).decode() not in text
        assert signer.fingerprint in text


# The endpoint decorator ------------------------------------------------------

class FakeInstances:
    def __init__(self):
        self.calls = []

    def destroy(self, instance_uuid):
        self.calls.append(("destroy", instance_uuid))
        raise exception.NotFound(what="vTPCM of instance", key=instance_uuid)

    def get(self, instance_uuid):
        self.calls.append(("get", instance_uuid))
        raise exception.NotFound(what="vTPCM of instance", key=instance_uuid)


def _raises(exc_type, func, *args, match=None, **kwargs):
    """Endpoints wrap vTPCM errors in oslo.messaging's ExpectedException."""
    with refused(ExpectedException, '') as err:
        func(*args, **kwargs)
    inner = err.value.exc_info[1]
    assert isinstance(inner, exc_type), repr(inner)
    assert match is None or match in str(inner), str(inner)


def test_agent_state_changing_endpoints_are_exactly_the_signed_ones():
    signed = {name for name in dir(AgentManager)
              if getattr(getattr(AgentManager, name), "signed", False)}
    assert signed == agent_rpcapi.SIGNED_METHODS == {
        "create", "start", "stop", "destroy", "export_state", "import_state",
        "seal_migration_key", "prepare_incoming", "commit_incoming",
        "commit_outgoing", "abort_incoming", "abort_outgoing", "reclaim_outgoing"}
    unsigned = {name for name in dir(AgentManager)
                if getattr(getattr(AgentManager, name), "signed", None) is False}
    assert unsigned == {"get", "list", "health", "get_identity", "quote", "activate_credential",
                        "incoming_state",  # read-only (1.7)
                        "state_digest"}  # read-only (1.12), signed reply


def test_signed_endpoint_checks_before_acting(signer, verifier):
    instances = FakeInstances()
    agent = AgentManager(HOST, instances, verifier=verifier)  # type: ignore[arg-type]
    _raises(exception.CommandRefused, agent.destroy, {}, PAYLOAD, match="no engine signature")
    # a malformed command is named precisely, signed or not
    _raises(exception.InvalidPayload, agent.destroy, {}, {"garbage": 1}, match="garbage")
    assert instances.calls == []
    _raises(exception.NotFound, agent.destroy, {}, PAYLOAD,  # signed: it runs
            auth=signer.sign("destroy", HOST, PAYLOAD))
    assert instances.calls == [("destroy", PAYLOAD["instance_uuid"])]
    # unsigned methods ignore auth
    _raises(exception.NotFound, agent.get, {}, PAYLOAD, auth={"anything": 1})
    _raises(exception.NotFound, agent.get, {}, PAYLOAD)


def test_agent_without_verifier_refuses_every_signed_command(signer):
    instances = FakeInstances()
    agent = AgentManager(HOST, instances)  # type: ignore[arg-type]
    _raises(exception.CommandRefused, agent.destroy, {}, PAYLOAD,
            auth=signer.sign("destroy", HOST, PAYLOAD), match="no engine public key")
    assert instances.calls == []


def test_endpoint_defaults_to_unsigned():
    class Thing:
        verifier = None

        @endpoint(m.Empty)
        def ping(self, req):
            return m.Empty()
    assert Thing().ping({}, {}) == {} and Thing.ping.signed is False


# Operator-signed engine admin calls ---------------------------------------------

TOPIC = "vtpcm-engine"
HOSTREF = {"host": "cmp1"}


@pytest.fixture
def operators(tmp_path, clock):
    """Two operators' signers and the engine's verifier trusting both."""
    signers = []
    for name in ("alice", "bob"):
        made = authn.load_or_create_signing_key(tmp_path / "ops" / (name + ".key"))
        signers.append(authn.CommandSigner(made._key, clock=clock).for_server(TOPIC))
    verifier = authn.CommandVerifier(
        [authn.public_key_path(tmp_path / "ops" / (n + ".key")) for n in ("alice", "bob")],
        TOPIC, clock=clock, signer_role="operator", service_role="engine",
        server_kind="engine topic")
    return signers, verifier


def test_any_configured_operator_key_is_accepted_and_named(operators):
    (alice, bob), verifier = operators
    assert verifier.fingerprints == (alice.fingerprint, bob.fingerprint)
    assert verifier.verify("approve_host", HOSTREF,
                           alice.sign("approve_host", "", HOSTREF)) == alice.fingerprint
    assert verifier.verify("approve_host", HOSTREF,
                           bob.sign("approve_host", "", HOSTREF)) == bob.fingerprint


def test_operator_refusals_name_the_operator_keys(operators, clock):
    (alice, _), verifier = operators
    stranger = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate(),
                                   clock=clock).for_server(TOPIC)
    _refused(verifier, "put_policy", HOSTREF, stranger.sign("put_policy", "", HOSTREF),
             "signature does not verify with any of the 2 operator keys")
    _refused(verifier, "enroll", HOSTREF, None, "no operator signature")
    auth = alice.sign("revoke_host", "", HOSTREF)
    verifier.verify("revoke_host", HOSTREF, auth)
    _refused(verifier, "revoke_host", HOSTREF, auth, "replayed")
    # signed for another deployment's topic
    other = authn.CommandSigner(alice._key, clock=clock).for_server("vtpcm-engine-other")
    _refused(verifier, "enroll", HOSTREF, other.sign("enroll", "", HOSTREF),
             "misdirected: signed for engine topic")
    # a signature for one method is not one for another
    _refused(verifier, "approve_host", HOSTREF, alice.sign("show_host", "", HOSTREF),
             "signature does not verify")
    clock.now -= 100
    old = alice.sign("enroll", "", HOSTREF)
    clock.now += 100
    verifier.created_at = clock.now + 31
    _refused(verifier, "enroll", HOSTREF, old, "issued before this engine started",
             stale=True)


def test_one_key_verifier_keeps_its_single_key_api(keyfile, signer):
    verifier = authn.CommandVerifier(authn.public_key_path(keyfile), HOST)
    assert verifier.fingerprint == signer.fingerprint == verifier.fingerprints[0]
    twice = authn.CommandVerifier([authn.public_key_path(keyfile)] * 2, HOST)
    assert twice.fingerprints == (signer.fingerprint,)
    assert authn.CommandVerifier(str(authn.public_key_path(keyfile)), HOST).fingerprint \
        == signer.fingerprint
    with refused(exception.InvalidInput, 'Invalid input: no operator public key given'):
        authn.CommandVerifier([], TOPIC, signer_role="operator")
    with pytest.raises(exception.InvalidInput, match="operator public key .*missing.pub"):
        authn.CommandVerifier([authn.public_key_path(keyfile), keyfile.parent / "missing.pub"],
                              TOPIC, signer_role="operator")


def test_bound_signer_signs_for_its_server_only(signer):
    bound = signer.for_server(TOPIC)
    assert bound.sign("enroll", "", HOSTREF)["server"] == TOPIC
    assert bound.sign("enroll", TOPIC, HOSTREF)["server"] == TOPIC
    with refused(exception.InvalidInput,
                 'Invalid input: this signer signs for vtpcm-engine only, not host-b'):
        bound.sign("enroll", "host-b", HOSTREF)
    assert signer.sign("destroy", HOST, PAYLOAD)["server"] == HOST  # unbound: unchanged
    assert "server=vtpcm-engine" in repr(bound) and bound.fingerprint == signer.fingerprint


def test_refuse_all_refuses_with_its_reason():
    refuse = authn.RefuseAll("no operator keys configured: set [engine] admin_public_keys")
    with refused(exception.CommandRefused,
                 'Command approve_host refused: no operator keys configured: set [engine] '
                 'admin_public_keys'):
        refuse.verify("approve_host", HOSTREF, None)


class FakeDB:
    def __init__(self):
        self.audits = []

    def audit(self, event, outcome, *, host=None, detail="", **kw):
        self.audits.append((event, outcome, host, detail))


class FakeAttestor:
    def __init__(self):
        self.calls = []

    def approve(self, host):
        self.calls.append(("approve", host))
        raise exception.NotFound(what="host", key=host)


def _engine_manager(verifier=None):
    from vtpcm_nova.engine.manager import EngineManager
    db, attestor = FakeDB(), FakeAttestor()
    return EngineManager(db, attestor, None, admin_verifier=verifier), db, attestor


def test_engine_admin_methods_are_exactly_the_signed_ones():
    from vtpcm_common.api.engine import rpcapi
    from vtpcm_nova.engine.manager import EngineManager
    signed = {name for name in dir(EngineManager)
              if getattr(getattr(EngineManager, name), "signed", False)}
    assert signed == rpcapi.ADMIN_METHODS == {
        "enroll", "approve_host", "revoke_host", "assign_policy", "put_policy",
        "record_policy", "resolve_migration", "forget_host", "destroy_shelved_vtpcm"}
    host_signed = {name for name in dir(EngineManager)
                   if getattr(getattr(EngineManager, name), "host_signed", False)}
    assert host_signed == rpcapi.HOST_METHODS == {
        "create_vtpcm", "destroy_vtpcm", "start_vtpcm", "stop_vtpcm", "check_destination",
        "begin", "commit", "abort", "transfer_state", "replace_vtpcm",
        "shelve_vtpcm", "unshelve_vtpcm", "report_swtpm_restart", "start_incoming"}
    witness_signed = {name for name in dir(EngineManager)
                      if getattr(getattr(EngineManager, name), "witness_signed", False)}
    assert witness_signed == rpcapi.WITNESS_METHODS == {"record_api_witness"}
    unsigned = {name for name in dir(EngineManager)
                if getattr(getattr(EngineManager, name), "signed", None) is False} \
        - host_signed - witness_signed
    assert unsigned == {"list_hosts", "show_host", "list_policies", "attest", "verdicts",
                        "trusted_hosts",  # the scheduler's paged read, as verdicts
                        "list_audit", "get_vtpcm", "get_migration", "host_command_key",
                        "signed_host_command_key",  # its answer is signed, not the call
                        "list_vtpcms"}


def test_engine_without_operator_keys_refuses_admin_calls(operators):
    (alice, _), _ = operators
    manager, db, attestor = _engine_manager()
    _raises(exception.CommandRefused, manager.approve_host, {}, HOSTREF,
            auth=alice.sign("approve_host", "", HOSTREF),
            match="no operator keys configured: set [engine] admin_public_keys")
    assert attestor.calls == []
    assert db.audits[0][:3] == ("admin", "refused", "cmp1")


def test_engine_admin_call_runs_only_when_operator_signed_and_is_audited(operators):
    (alice, _), verifier = operators
    manager, db, attestor = _engine_manager(verifier)
    _raises(exception.CommandRefused, manager.approve_host, {}, HOSTREF,
            match="no operator signature")
    _raises(exception.InvalidPayload, manager.approve_host, {}, {"host": "bad host/"},
            auth=alice.sign("approve_host", "", {"host": "bad host/"}))
    assert attestor.calls == []
    assert [a[:3] for a in db.audits] == [("admin", "refused", "cmp1")]
    _raises(exception.NotFound, manager.approve_host, {}, HOSTREF,  # signed: it runs
            auth=alice.sign("approve_host", "", HOSTREF))
    assert attestor.calls == [("approve", "cmp1")]
    assert db.audits[-1] == ("admin", "accepted", "cmp1",
                             "approve_host signed by operator key %s" % alice.fingerprint)


def test_engine_api_signs_for_the_engine_topic(tmp_path):
    from oslo_config import cfg

    from vtpcm_common.api.engine import rpcapi
    from vtpcm_nova import conf as engine_conf
    conf = cfg.ConfigOpts()
    engine_conf.register_opts(conf)
    conf([], project="vtpcm", default_config_files=[])
    rpc.get_transport(conf).cleanup()  # registers the transport options
    conf.set_override("transport_url", "fake:/")
    conf.set_override("engine_topic", "vtpcm-engine-x", group="vtpcm_rpc")
    transport = rpc.get_transport(conf)
    try:
        # no key: admin calls go unsigned (and the engine refuses them)
        assert rpcapi.EngineAPI(conf, transport).signer is None
        key = tmp_path / "op.key"
        made = authn.load_or_create_signing_key(key)
        conf.set_override("admin_key", str(key), group="manage")
        api = rpcapi.EngineAPI(conf, transport)
        assert api.signer.server == "vtpcm-engine-x"
        assert api.signer.fingerprint == made.fingerprint
        conf.set_override("admin_key", str(tmp_path / "gone.key"), group="manage")
        with pytest.raises(exception.InvalidInput,
                           match="\\[manage\\] admin_key: .*gone.key"):
            rpcapi.EngineAPI(conf, transport)
    finally:
        transport.cleanup()


def test_engine_admin_verifier_from_config(tmp_path):
    from oslo_config import cfg

    from vtpcm_nova import conf as engine_conf
    from vtpcm_nova.engine import service
    conf = cfg.ConfigOpts()
    engine_conf.register_opts(conf)
    conf([], project="vtpcm", default_config_files=[])
    assert isinstance(service.admin_verifier_from(conf), authn.RefuseAll)
    pubs = []
    for name in ("a", "b"):
        authn.load_or_create_signing_key(tmp_path / (name + ".key"))
        pubs.append(str(authn.public_key_path(tmp_path / (name + ".key"))))
    conf.set_override("admin_public_keys", pubs, group="engine")
    verifier = service.admin_verifier_from(conf)
    assert verifier.server == "vtpcm-engine" and len(verifier.fingerprints) == 2
    conf.set_override("admin_public_keys", pubs + [str(tmp_path / "c.pub")], group="engine")
    with pytest.raises(exception.InvalidInput,
                       match="\\[engine\\] admin_public_keys: operator public key .*c.pub"):
        service.admin_verifier_from(conf)


def test_verify_with_takes_the_keys_of_this_call_and_names_the_signer(clock):
    """The engine checks compute-node calls against the keys of the hosts the
    call concerns, looked up per call."""
    keys = {name: authn.CommandSigner(ed25519.Ed25519PrivateKey.generate(), clock=clock)
            for name in ("host-a", "host-b", "host-c")}
    verifier = authn.CommandVerifier(None, TOPIC, clock=clock, signer_role="host command",
                                     service_role="engine", server_kind="engine topic")
    public = {name: s.public_key for name, s in keys.items()}
    auth = keys["host-b"].for_server(TOPIC).sign("begin", "", PAYLOAD)
    assert verifier.verify_with("begin", PAYLOAD, auth,
                                {h: public[h] for h in ("host-a", "host-b")}) == "host-b"
    auth = keys["host-c"].for_server(TOPIC).sign("begin", "", PAYLOAD)
    _refused(verifier, "begin", PAYLOAD, auth, "signature does not verify with the host "
             "command key of host-a or host-b for engine topic vtpcm-engine",
             lambda v, *a: v.verify_with(*a, {h: public[h] for h in ("host-a", "host-b")}))
    _refused(verifier, "begin", PAYLOAD, auth, "no host command key may sign it",
             lambda v, *a: v.verify_with(*a, {}))
    _refused(verifier, "begin", PAYLOAD, auth, "no host command key is pinned",
             lambda v, *a: v.verify(*a))


def test_host_key_binding_depends_on_nonce_key_and_host_name():
    a, b = os.urandom(32), os.urandom(32)
    nonce = os.urandom(32)
    assert authn.host_key_binding(nonce, a, "h1") == authn.host_key_binding(nonce, a, "h1")
    assert authn.host_key_binding(nonce, a, "h1") != authn.host_key_binding(nonce, b, "h1")
    assert authn.host_key_binding(nonce, a, "h1") != authn.host_key_binding(os.urandom(32), a,
                                                                             "h1")
    assert authn.host_key_binding(nonce, a, "h1") != authn.host_key_binding(nonce, a, "h2")
    # length-prefixed: moving bytes between the parts changes the binding
    assert authn.host_key_binding(nonce, a + b"x", "h") != \
        authn.host_key_binding(nonce, a, "xh")
    assert len(authn.host_key_binding(nonce, a, "h1")) == 32
    raw = authn.public_raw(ed25519.Ed25519PrivateKey.generate().public_key())
    assert authn.public_raw(authn.load_public_raw(raw)) == raw
    with refused(exception.InvalidInput, 'Invalid input: host key is not a raw Ed25519 public key'):
        authn.load_public_raw(b"short", what="host key")


def test_parent_binding_depends_on_qualifying_data_hierarchy_and_pinned_name():
    q, name = os.urandom(32), b"\x00\x0b" + os.urandom(32)
    bound = authn.parent_binding(q, "owner", name)
    assert bound == authn.parent_binding(q, "owner", name) and len(bound) == 32
    assert bound not in (q, authn.parent_binding(os.urandom(32), "owner", name),
                         authn.parent_binding(q, "endorsement", name),
                         authn.parent_binding(q, "owner", b"\x00\x0b" + os.urandom(32)),
                         # length-prefixed: moving bytes between the parts changes it
                         authn.parent_binding(q + b"o", "wner", name))


def test_host_command_key_is_group_readable_only(tmp_path):
    path = tmp_path / "hk" / "host-command.key"
    signer = authn.load_or_create_host_key(path, gid=os.getgid())
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    assert authn.load_host_key(path).fingerprint == signer.fingerprint
    assert authn.load_or_create_host_key(path).fingerprint == signer.fingerprint  # kept
    os.chmod(path, 0o644)
    with pytest.raises(exception.InvalidInput, match="chmod 640"):
        authn.load_host_key(path)
    with pytest.raises(exception.InvalidInput, match="host command key .*missing"):
        authn.load_host_key(tmp_path / "missing")


def test_canonical_bytes_known_answer():
    """Signer and verifier share canonical_bytes, so a change to it (a key
    renamed, other separators) keeps them agreeing with each other and
    breaks every signature an older peer makes: pinned byte for byte."""
    data = authn.canonical_bytes("stop", HOST, {"b": 1, "a": [1.5, "x"]}, 10.0, 130.5, "ab" * 16)
    assert data == (b'{"expires_at":130.5,"issued_at":10.0,"method":"stop",'
                    b'"nonce":"abababababababababababababababab",'
                    b'"payload":{"a":[1.5,"x"],"b":1},"server":"host-a","v":1}')
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        authn.canonical_bytes("stop", HOST, {"a": float("nan")}, 10.0, 130.5, "ab" * 16)


def test_validity_boundaries_are_inclusive(keyfile, verifier, clock):
    """Exactly at each limit a command is still accepted: the limits are
    the documented maxima, not one tick less."""
    start = clock.now
    exact = authn.CommandSigner(authn.load_signing_key(keyfile)._key,
                                ttl=verifier.max_ttl, clock=clock)
    verifier.verify("create", PAYLOAD, exact.sign("create", HOST, PAYLOAD))  # ttl == max
    auth = exact.sign("stop", HOST, PAYLOAD)
    clock.now = auth["expires_at"]
    verifier.verify("stop", PAYLOAD, auth)  # now == expires_at
    clock.now = start + verifier.max_skew
    future = exact.sign("start", HOST, PAYLOAD)
    clock.now = start
    verifier.verify("start", PAYLOAD, future)  # issued exactly max_skew ahead
    clock.now = verifier.created_at - verifier.max_skew
    early = exact.sign("destroy", HOST, PAYLOAD)
    clock.now = start
    verifier.verify("destroy", PAYLOAD, early)  # issued exactly max_skew before start


# -- found by mutation testing (tools/mutation.sh authn) -----------------------

def test_signer_arguments_are_checked_by_name(keyfile):
    key = authn.load_or_create_signing_key(keyfile)._key
    with refused(exception.InvalidInput,
                 "Invalid input: command signing key must be Ed25519"):
        authn.CommandSigner(ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]
    for ttl in (0, -1, float("inf"), float("nan")):
        with refused(exception.InvalidInput, "Invalid input: command signature ttl must be > 0"):
            authn.CommandSigner(key, ttl=ttl)
    assert authn.CommandSigner(key, ttl=0.5).ttl == 0.5


def test_ttl_and_reprs_are_kept(keyfile, tmp_path):
    signer = authn.load_or_create_signing_key(keyfile, ttl=7)
    assert signer.ttl == 7 and authn.load_signing_key(keyfile, ttl=8).ttl == 8
    assert len(signer.fingerprint) == 16
    assert repr(signer) == "<CommandSigner key=%s ttl=7.0>" % signer.fingerprint
    bound = signer.for_server(TOPIC)
    assert bound.ttl == 7
    assert repr(bound) == "<CommandSigner key=%s ttl=7.0 server=%s>" % (signer.fingerprint,
                                                                         TOPIC)
    host = authn.load_or_create_host_key(tmp_path / "h" / "host-command.key", ttl=9)
    assert host.ttl == 9
    assert authn.load_host_key(tmp_path / "h" / "host-command.key", ttl=11).ttl == 11
    verifier = authn.CommandVerifier(authn.public_key_path(keyfile), HOST)
    assert repr(verifier) == "<CommandVerifier server=%s key=%s>" % (HOST, signer.fingerprint)
    assert authn.CommandVerifier(None, TOPIC, signer_role="host command",
                                 server_kind="engine topic").fingerprint == "(per call)"


def test_key_directories_are_made_private_with_their_parents(tmp_path):
    authn.load_or_create_signing_key(tmp_path / "a" / "b" / "engine.key")
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    authn.load_or_create_host_key(tmp_path / "c" / "d" / "host.key")
    assert stat.S_IMODE((tmp_path / "c" / "d").stat().st_mode) == 0o700
    authn.load_or_create_host_key(tmp_path / "e" / "f" / "host.key", gid=os.getgid())
    assert stat.S_IMODE((tmp_path / "e" / "f").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "e" / "f" / "host.key").stat().st_mode) == 0o640


def test_a_group_readable_engine_key_is_refused_by_name(keyfile):
    authn.load_or_create_signing_key(keyfile)
    os.chmod(keyfile, 0o640)
    with refused(exception.InvalidInput, "Invalid input: command signing key %s must be a "
                 "regular file readable by its owner only (chmod 600)" % keyfile):
        authn.load_signing_key(keyfile)
    assert authn.load_host_key(keyfile).fingerprint  # a host key may be 0640


def test_key_file_refusals_are_exact(tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    with refused(exception.InvalidInput,
                 "Invalid input: engine public key %s is not a PEM public key" % bad):
        authn.load_public_key(bad)
    ecpub = tmp_path / "ec.pub"
    ecpub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with refused(exception.InvalidInput,
                 "Invalid input: operator public key %s is not an Ed25519 key" % ecpub):
        authn.load_public_key(ecpub, role="operator")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    os.chmod(garbage, 0o600)
    with refused(exception.InvalidInput, "Invalid input: command signing key %s is not an "
                 "unencrypted PEM private key" % garbage):
        authn.load_signing_key(garbage)
    with refused(exception.InvalidInput, "Invalid input: host command key %s: No such file "
                 "or directory" % (tmp_path / "none.key")):
        authn.load_host_key(tmp_path / "none.key")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with refused(exception.InvalidInput, "Invalid input: command signing key %s: File "
                 "exists" % (blocker / "k.key")):
        authn.load_or_create_signing_key(blocker / "k.key")
    with refused(exception.InvalidInput, "Invalid input: host command key %s: File "
                 "exists" % (blocker / "h.key")):
        authn.load_or_create_host_key(blocker / "h.key")


@pytest.mark.parametrize("nonce", [12345, "X" * 32, "0123456789abcdef" * 2 + "0"])
def test_malformed_nonces_are_refused_by_name(signer, verifier, nonce):
    auth = dict(signer.sign("stop", HOST, PAYLOAD), nonce=nonce)
    _refused(verifier, "stop", PAYLOAD, auth, "auth nonce must be 32 lowercase hex digits")


def test_a_payload_that_is_not_json_is_refused_by_name(signer, verifier):
    auth = signer.sign("stop", HOST, PAYLOAD)
    with refused(exception.CommandRefused,
                 "Command stop refused: payload is not canonical JSON"):
        verifier.verify("stop", {"x": float("nan")}, auth)
