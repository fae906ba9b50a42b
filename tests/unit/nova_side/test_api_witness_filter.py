"""nova-api's vtpcm_witness paste filter on webob requests: only a 2xx
answer to an unshelve (or forceDelete) action or a DELETE of a server
produces a witness; Nova's answer and body are never changed, also when
the engine fails; a missing or bad key stops nova-api with an error naming
the option."""

import json
import logging
import os
import re
from pathlib import Path

import pytest
import webob
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_config import cfg

from vtpcm_common import authn, exception
from vtpcm_nova.api import witness

SERVER = "6f1c8c1e-2f43-4b8e-9f73-0d2b5a1e0c11"


class FakeNova:
    """Answers like nova-api: ``status`` for every request; keeps the
    body it got, so the test sees the filter put it back."""

    def __init__(self, status="202 Accepted"):
        self.status = status
        self.bodies = []

    def __call__(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        self.bodies.append(environ["wsgi.input"].read(length) if length else b"")
        start_response(self.status, [("Content-Type", "application/json")])
        return [b'{"answer": "nova"}']


# what keystonemiddleware's auth_token puts in a project member's request
# (at microversion 2.91: an unshelve may name its host)
USER = {"X-Project-Id": "8c1e6f1c2f434b8e9f730d2b5a1e0c11", "X-User-Id": "u-1",
        "X-Roles": "member,reader", "OpenStack-API-Version": "compute 2.91"}


def _run(app, method, path, body=None, prefix="/v2.1", headers=None, who=None):
    """Nova behind the filter; the witnesses sent as (instance, action,
    host), the requesters they named appended to ``who``."""
    req = webob.Request.blank(path, method=method, script_name=prefix,
                              headers=USER if headers is None else headers)
    if body is not None:
        req.body = json.dumps(body).encode()
        req.content_type = "application/json"
    sent = []

    def send(instance, action, host, requester):
        sent.append((instance, action, host))
        if who is not None:
            who.append(requester)
    filtered = witness.WitnessFilter(app, send)
    resp = req.get_response(filtered)
    return resp, sent


ACTION = "/servers/%s/action" % SERVER


@pytest.mark.parametrize("body, expected", [
    ({"unshelve": None}, (SERVER, "unshelve", None)),
    ({"unshelve": {"availability_zone": "az1"}}, (SERVER, "unshelve", None)),
    ({"unshelve": {"host": "compute-7"}}, (SERVER, "unshelve", "compute-7")),  # 2.91
    ({"forceDelete": None}, (SERVER, "delete", None)),
])
def test_an_accepted_unshelve_or_force_delete_is_witnessed(body, expected):
    nova = FakeNova()
    resp, sent = _run(nova, "POST", ACTION, body)
    assert sent == [expected]
    assert (resp.status, resp.body) == ("202 Accepted", b'{"answer": "nova"}')
    assert nova.bodies == [json.dumps(body).encode()]  # Nova got the body unchanged


@pytest.mark.parametrize("path", ["/servers/%s" % SERVER, "/servers/%s/" % SERVER,
                                  "/proj1/servers/%s" % SERVER,
                                  "/os-volumes_boot/%s" % SERVER,  # review finding 6
                                  "/servers/%s" % SERVER.replace("-", "")])
def test_an_accepted_delete_is_witnessed(path):
    resp, sent = _run(FakeNova("204 No Content"), "DELETE", path)
    assert sent == [(SERVER, "delete", None)] and resp.status_int == 204


@pytest.mark.parametrize("status", ["400 Bad Request", "403 Forbidden", "404 Not Found",
                                    "409 Conflict", "500 Internal Server Error",
                                    "300 Multiple Choices"])
def test_a_refused_request_is_not_witnessed(status):
    for method, path, body in (("POST", ACTION, {"unshelve": None}),
                               ("DELETE", "/servers/%s" % SERVER, None)):
        resp, sent = _run(FakeNova(status), method, path, body)
        assert sent == [] and resp.status == status


@pytest.mark.parametrize("method, path, body", [
    ("POST", ACTION, {"shelve": None}),
    ("POST", ACTION, {"os-start": None}),
    ("POST", ACTION, {"unshelve": None, "shelve": None}),  # Nova takes one action
    ("POST", ACTION, {"unshelve": {"host": "bad host name!"}}),
    ("POST", ACTION, ["unshelve"]),
    ("GET", "/servers/%s" % SERVER, None),
    ("PUT", "/servers/%s" % SERVER, {"server": {"name": "x"}}),
    ("POST", "/servers", {"server": {"name": "x"}}),
    ("DELETE", "/servers/%s/action" % SERVER, None),
    ("DELETE", "/os-keypairs/%s" % SERVER, None),
    ("DELETE", "/servers/%s/metadata/unshelve" % SERVER, None),
    ("POST", "/servers/not-a-uuid/action", {"unshelve": None}),
    ("POST", "/os-volumes_boot/%s/action" % SERVER, {"unshelve": None}),  # no such route
])
def test_other_requests_pass_unwitnessed(method, path, body):
    nova = FakeNova("200 OK")
    resp, sent = _run(nova, method, path, body)
    assert sent == [] and resp.status == "200 OK"
    if body is not None:
        assert nova.bodies == [json.dumps(body).encode()]


def test_a_body_too_large_or_not_json_passes_unwitnessed():
    nova = FakeNova()
    req = webob.Request.blank(ACTION, method="POST", script_name="/v2.1")
    req.body = b"{" + b" " * witness.MAX_BODY + b'"unshelve": null}'
    sent = []
    resp = req.get_response(witness.WitnessFilter(nova, lambda *a: sent.append(a)))
    assert sent == [] and resp.status_int == 202
    assert nova.bodies == [req.body]
    resp, sent = _run(nova, "POST", ACTION)
    assert sent == []


def test_an_engine_failure_never_changes_novas_answer(caplog):
    def fail(*args):
        raise exception.ServiceUnreachable(service="vtpcm-engine",
                                           method="record_api_witness", reason="timeout")
    caplog.set_level(logging.WARNING)
    req = webob.Request.blank(ACTION, method="POST", script_name="/v2.1")
    req.body = b'{"unshelve": null}'
    resp = req.get_response(witness.WitnessFilter(FakeNova(), fail))
    assert (resp.status_int, resp.body) == (202, b'{"answer": "nova"}')
    (record,) = [r for r in caplog.records if "did not record" in r.getMessage()]
    assert SERVER in record.getMessage() and "unshelve" in record.getMessage()


def test_a_lazily_started_answer_is_witnessed_after_it_started():
    sent = []

    def lazy(environ, start_response):
        start_response("202 Accepted", [])
        yield b"late"
    env = webob.Request.blank(ACTION, method="POST", script_name="/v2.1")
    env.body = b'{"unshelve": null}'
    resp = env.get_response(witness.WitnessFilter(lazy, lambda *a: sent.append(a[:3])))
    assert resp.body == b"late" and sent == [(SERVER, "unshelve", None)]


# --- the key: a clear error, nova-api does not start ----------------------------------

def _conf(key_file):
    conf = cfg.ConfigOpts()
    conf([], project="nova-test")
    witness.api_conf.register_opts(conf)
    if key_file is not None:
        conf.set_override("api_witness_key_file", str(key_file), group="vtpcm")
    return conf


def _write_key(path: Path, mode=0o600, key=None):
    key = key or ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("case, make, why", [
    ("unset", lambda tmp: None, "[vtpcm] api_witness_key_file is not set"),
    ("missing", lambda tmp: tmp / "absent.key", "[vtpcm] api_witness_key_file: "),
    ("world readable", lambda tmp: _write_key(tmp / "k", 0o644), "chmod 640"),
    ("not a key", lambda tmp: (tmp / "k").write_text("nope") and os.chmod(tmp / "k", 0o600)
     or tmp / "k", "not an unencrypted PEM private key"),
])
def test_a_bad_key_configuration_is_a_clear_error(tmp_path, case, make, why):
    conf = _conf(make(tmp_path))
    with pytest.raises(exception.InvalidInput, match=re.escape(why)) as err:
        witness.load_witness_key(conf)
    assert "BEGIN" not in str(err.value)


def test_a_good_key_signs(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    conf = _conf(_write_key(tmp_path / "k", 0o640, key))
    signer = witness.load_witness_key(conf)
    assert signer.fingerprint == authn.fingerprint(key.public_key())
    assert "PRIVATE" not in repr(witness.EngineWitness(conf, signer))


def test_the_filter_factory_refuses_to_start_without_a_key(monkeypatch):
    conf = _conf(None)
    monkeypatch.setattr(witness.cfg, "CONF", conf)
    with pytest.raises(exception.InvalidInput, match="api_witness_key_file is not set"):
        witness.filter_factory({})


# --- the witness review (issue 8): who asked, which microversion, a broker down -------

SERVICE_USER = {"X-Project-Id": "5e0c11", "X-User-Id": "nova", "X-Roles": "admin,service",
                "OpenStack-API-Version": "compute 2.91"}


@pytest.mark.parametrize("headers, why", [
    (SERVICE_USER, "role(s) service"),
    (dict(USER, **{"X-Roles": "admin,Service"}), "role(s) service"),
    (dict(USER, **{"X-Service-Roles": "service"}), "role(s) service"),
    (dict(USER, **{"X-Service-Token": "gAAAA-opaque"}), "service token"),
], ids=["service-user", "role-case", "service-roles", "service-token"])
def test_a_service_credential_gets_no_witness(caplog, headers, why):
    """Review finding 1 (a), proof P4: nova-compute's service credentials
    (what a compromised compute host holds) asking nova-api to unshelve a
    server onto it get no witness; Nova's answer is unchanged."""
    caplog.set_level(logging.WARNING)
    resp, sent = _run(FakeNova(), "POST", ACTION, {"unshelve": {"host": "host-c"}},
                      headers=headers)
    assert sent == [] and resp.status_int == 202
    (record,) = [r for r in caplog.records if "Not witnessing" in r.getMessage()]
    assert why in record.getMessage() and SERVER in record.getMessage()


def test_the_refused_roles_are_configurable():
    req = webob.Request.blank(ACTION, method="POST", script_name="/v2.1",
                              headers=dict(USER, **{"X-Roles": "member,compute-svc"}))
    req.body = b'{"unshelve": null}'
    sent = []
    req.get_response(witness.WitnessFilter(FakeNova(), lambda *a: sent.append(a),
                                           refused_roles=["Compute-Svc"]))
    assert sent == []


def test_the_witness_names_who_asked():
    who = []
    _run(FakeNova(), "POST", ACTION, {"unshelve": None}, who=who)
    assert who == [witness.Requester("8c1e6f1c2f434b8e9f730d2b5a1e0c11", "u-1",
                                     ("member", "reader"), (), False)]


@pytest.mark.parametrize("headers, host", [
    ({}, None),                                                     # 2.1 by default
    ({"OpenStack-API-Version": "compute 2.1"}, None),               # proof P5
    ({"OpenStack-API-Version": "compute 2.90"}, None),
    ({"X-OpenStack-Nova-API-Version": "2.77"}, None),
    ({"OpenStack-API-Version": "compute 2.91"}, "host-c"),
    ({"OpenStack-API-Version": "volume 3.0, compute 2.95"}, "host-c"),
    ({"X-OpenStack-Nova-API-Version": "2.91"}, "host-c"),
    ({"OpenStack-API-Version": "compute latest"}, "host-c"),
    ({"OpenStack-API-Version": "compute 3.0"}, "host-c"),
    ({"OpenStack-API-Version": "compute junk"}, None),
])
def test_the_host_is_named_only_at_291_or_later(headers, host):
    """Review finding 5: below 2.91 Nova ignores the body's host and
    schedules anywhere; the witness must not name a host Nova did not."""
    base = {k: v for k, v in USER.items() if k != "OpenStack-API-Version"}
    _, sent = _run(FakeNova(), "POST", ACTION, {"unshelve": {"host": "host-c"}},
                   headers=dict(base, **headers))
    assert sent == [(SERVER, "unshelve", host)]


def test_novas_request_context_names_who_asked():
    """Behind keystonecontext (or noauth2) Nova's own context says who
    asked; its service roles and service token count too."""
    class Context:  # oslo.context's fields
        project_id, user_id, roles = "p-ctx", "u-ctx", ["member"]
        service_roles, service_token, service_user_id = [], None, None
    environ = {"nova.context": Context()}
    assert witness.requester_of(environ) == witness.Requester("p-ctx", "u-ctx",
                                                              ("member",), (), False)
    Context.service_roles = ["service"]
    assert "service" in witness.requester_of(environ).refusal(frozenset({"service"}))
    Context.service_roles, Context.service_user_id = [], "nova"
    assert witness.requester_of(environ).service_token


@pytest.mark.parametrize("has_vtpcm, witnessed", [
    (False, False),   # a plain-flavor server: the engine never hears of it
    (True, True),
    (None, True),     # Nova could not say: witness (one engine call too many)
])
def test_only_a_server_with_a_vtpcm_or_an_unknown_one_is_witnessed(has_vtpcm, witnessed):
    nova = FakeNova("204 No Content")
    asked = []

    def lookup(environ, instance):
        # asked before the request reaches Nova (a deleted server is gone after)
        asked.append((instance, len(nova.bodies)))
        return has_vtpcm
    req = webob.Request.blank("/servers/%s" % SERVER, method="DELETE", script_name="/v2.1",
                              headers=USER)
    sent = []
    resp = req.get_response(witness.WitnessFilter(
        nova, lambda *a: sent.append(a[:3]), has_vtpcm=lookup))
    assert resp.status_int == 204 and len(nova.bodies) == 1
    assert asked == [(SERVER, 0)]
    assert sent == ([(SERVER, "delete", None)] if witnessed else [])


def test_the_flavor_lookup_says_none_without_a_nova_context_or_on_errors(monkeypatch):
    from vtpcm_nova.api import instances
    assert instances.has_vtpcm({}, SERVER) is None

    class Flavor:
        def __init__(self, specs):
            self.extra_specs = specs

    class Instance:
        def __init__(self, specs):
            self.flavor = Flavor(specs)

    class Context:
        def elevated(self):
            return self

    answers = {"plain": Instance({}), "vtpcm": Instance({"vtpcm:enabled": "true"}),
               "bad": Instance({"vtpcm:enabled": "maybe"})}

    class API:
        def get(self, context, uuid, expected_attrs=None):
            assert expected_attrs == ["flavor"]
            if uuid not in answers:
                raise LookupError("no such server")
            return answers[uuid]
    monkeypatch.setattr(instances, "_compute_api", API())
    env = {"nova.context": Context()}
    assert instances.has_vtpcm(env, "plain") is False
    assert instances.has_vtpcm(env, "vtpcm") is True
    assert instances.has_vtpcm(env, "bad") is None
    assert instances.has_vtpcm(env, "gone") is None


def test_concurrent_sends_to_a_hanging_engine_never_pile_up_threads(tmp_path):
    """Witness review round 2, F3: the check for a stuck send and the start of
    a new one were not one step, so N concurrent requests with the broker
    down left N threads that never end. Now at most MAX_IN_FLIGHT run, and
    once one outlived its bound, later sends fail at once."""
    import threading
    import time
    key = ed25519.Ed25519PrivateKey.generate()
    conf = _conf(_write_key(tmp_path / "k", 0o640, key))
    conf.set_override("api_witness_timeout", 0.5, group="vtpcm")
    send = witness.EngineWitness(conf, witness.load_witness_key(conf))
    release = threading.Event()

    class HangingEngine:
        def record_api_witness(self, *args, **kwargs):
            release.wait(30)
    send._api = HangingEngine()
    who = witness.Requester("p", "u", ("member",))
    errors = []

    def call():
        try:
            send(SERVER, "delete", None, who)
        except exception.ServiceUnreachable as err:
            errors.append(str(err))
    callers = [threading.Thread(target=call) for _ in range(3 * witness.MAX_IN_FLIGHT)]
    try:
        for t in callers:
            t.start()
        for t in callers:
            t.join(10)
        running = [t for t in threading.enumerate() if t.name == "vtpcm-witness"]
        assert len(running) <= witness.MAX_IN_FLIGHT
        assert len(errors) == len(callers)  # every one failed, none hung
        started = time.monotonic()
        with pytest.raises(exception.ServiceUnreachable, match="still being sent"):
            send(SERVER, "delete", None, who)
        assert time.monotonic() - started < 0.1
    finally:
        release.set()


def test_a_burst_to_a_healthy_engine_waits_for_a_slot_instead_of_dropping(tmp_path):
    """Owner review, F3: the ninth concurrent send failed at once although
    the engine answered in 200 ms, so that unshelve was later refused."""
    import threading
    import time
    key = ed25519.Ed25519PrivateKey.generate()
    conf = _conf(_write_key(tmp_path / "k", 0o640, key))
    send = witness.EngineWitness(conf, witness.load_witness_key(conf))
    recorded = []

    class SlowEngine:
        def record_api_witness(self, instance, *args, **kwargs):
            time.sleep(0.2)
            recorded.append(instance)
    send._api = SlowEngine()
    who = witness.Requester("p", "u", ("member",))
    errors = []

    def call(i):
        try:
            send("server-%d" % i, "delete", None, who)
        except exception.ServiceUnreachable as err:
            errors.append(str(err))
    callers = [threading.Thread(target=call, args=(i,))
               for i in range(witness.MAX_IN_FLIGHT + 4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(10)
    assert errors == [] and len(recorded) == len(callers)
