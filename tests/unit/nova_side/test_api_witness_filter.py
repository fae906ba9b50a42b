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


def _run(app, method, path, body=None, prefix="/v2.1"):
    req = webob.Request.blank(path, method=method, script_name=prefix)
    if body is not None:
        req.body = json.dumps(body).encode()
        req.content_type = "application/json"
    sent = []
    filtered = witness.WitnessFilter(app, lambda *args: sent.append(args))
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
    resp = env.get_response(witness.WitnessFilter(lazy, lambda *a: sent.append(a)))
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
